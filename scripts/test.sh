#!/usr/bin/env bash
# Set up everything, then lint, type-check and run the whole test suite
# (unit tests and integration tests against real Consul and etcd).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
export PATH="$root/.venv/bin:$PATH"
echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy"
mypy
echo "== pytest"
# pytest exits 5 when it collected no test: that is a failure here too.
# 4 workers on 2 cores: the tests mostly wait on real servers' timers (the CPU is
# ~70% idle at 4 workers); worksteal keeps a 97 s Consul reaping test from leaving
# one worker a long tail.
pytest -n 4 --dist worksteal -p no:cacheprovider --durations=5 "$@"
