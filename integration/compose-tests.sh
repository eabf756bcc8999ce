#!/usr/bin/env bash
# Run the integration suite against the servers of docker-compose.yml instead
# of throwaway local ones. Tests that must stop, wipe or freeze a server skip
# here (they need a server of their own); everything else runs, one at a time.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
docker compose up -d --wait consul etcd
trap 'docker compose down' EXIT
export REGISTRY_AGENT_CONSUL_URL=consul://127.0.0.1:8500
export REGISTRY_AGENT_ETCD_URL=etcd://127.0.0.1:2379
.venv/bin/pytest -p no:cacheprovider -p no:xdist integration "$@"
