#!/usr/bin/env bash
# Set up everything, then: start throwaway Consul and etcd servers on loopback,
# register an instance in each, list it with the CLI, deregister, stop.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py
