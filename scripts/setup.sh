#!/usr/bin/env bash
# Set up a fresh clone: a virtualenv with the package and its test tools, and
# real Consul/etcd binaries under .servers/. Safe to run again.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  if ! "$python" -m venv .venv; then
    # Debian's system Python ships venv separately.
    rm -rf .venv
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    fi
    "$python" -m venv .venv
  fi
fi
stamp=.venv/.installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[all,test]'
  touch "$stamp"
fi
bash scripts/fetch-servers.sh >/dev/null
# The partition tests build test hosts with iproute2 (network namespaces, veth).
if ! command -v ip >/dev/null && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null
fi
