#!/usr/bin/env bash
# Set up (venv, real servers) and run every benchmark; prints Markdown tables.
# `bash bench/run.sh --quick` for a shorter, rougher run;
# `bash bench/run.sh soak --minutes 10 [--seed N]` for the chaos soak (bench/soak.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
exec .venv/bin/python -m bench "$@"
