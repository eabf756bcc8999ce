#!/usr/bin/env bash
# Provision real Consul and etcd binaries for the tests, without installing
# any system service: Debian packages are downloaded with a throwaway apt
# configuration and unpacked with `dpkg -x` into .servers/ (git-ignored).
#
#   consul 1.8.7   from suite bullseye (package consul)
#   etcd   3.5.16  from suite trixie   (package etcd-server)
#   etcdctl 3.5.16 from suite trixie   (package etcd-client: the benches' floor)
#   prometheus 2.42 from suite bookworm (package prometheus: the scrape test)
#
# The mirror is read from this machine's own apt sources; no host name is
# written here. A second run is a no-op. Prints the bin directory on stdout.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${REGISTRY_AGENT_SERVERS_DIR:-$root/.servers}"
bin="$dest/bin"
mkdir -p "$bin"

log() { echo "fetch-servers: $*" >&2; }

have() { # name: binary already usable (on PATH or provisioned)
  [[ -x "$bin/$1" ]] && return 0
  local found
  if found="$(command -v "$1" 2>/dev/null)"; then
    ln -sf "$found" "$bin/$1"
    return 0
  fi
  return 1
}

mirror_uri() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -r "$f" ]] || continue
    # deb822: first URIs line of a stanza that lists a Debian suite
    uri="$(awk '/^URIs:/ {u=$2} /^Suites:/ && u != "" && u !~ /security/ {print u; exit}' "$f")"
    [[ -n "$uri" && "$uri" != *security* ]] && { echo "$uri"; return; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -r "$f" ]] || continue
    uri="$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' "$f")"
    [[ -n "$uri" ]] && { echo "$uri"; return; }
  done
  return 1
}

fetch_pkg() { # suite package version binary-path-in-package target-name
  local suite="$1" pkg="$2" version="$3" inner="$4" name="$5"
  local work="$dest/apt-$suite"
  local uri
  uri="$(mirror_uri)" || { log "cannot find a Debian mirror in /etc/apt sources"; exit 1; }
  mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/pkgs"
  printf 'deb [trusted=yes] %s %s main\n' "$uri" "$suite" >"$work/sources.list"
  local opts=(
    -o "Dir::Etc::SourceList=$work/sources.list"
    -o "Dir::Etc::SourceParts=-"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::Cache=$work/cache"
    -o "APT::Get::List-Cleanup=0"
    -o "Acquire::Check-Valid-Until=false"
    -o "Acquire::Languages=none"
    -o "APT::Sandbox::User=root"
    -o "APT::Architecture=$(dpkg --print-architecture)"
  )
  log "apt-get update ($suite)"
  apt-get "${opts[@]}" -qq update >&2
  log "downloading $pkg=$version"
  (cd "$work/pkgs" && apt-get "${opts[@]}" -qq download "$pkg=$version" >&2 2>&1) ||
    (cd "$work/pkgs" && apt-get "${opts[@]}" -qq download "$pkg" >&2)
  local debs=("$work/pkgs/${pkg}"_*.deb)
  local deb="${debs[0]}"
  dpkg -x "$deb" "$work/root"
  install -m 0755 "$work/root/$inner" "$bin/$name"
  rm -rf "$work/root" "$work/cache" "$work/lists"
  log "installed $bin/$name from $(basename "$deb")"
}

if ! have consul; then
  fetch_pkg bullseye consul '1.8.7*' usr/bin/consul consul
fi
if ! have etcd; then
  fetch_pkg trixie etcd-server '3.5.16*' usr/bin/etcd etcd
fi
if ! have etcdctl; then
  fetch_pkg trixie etcd-client '3.5.16*' usr/bin/etcdctl etcdctl
fi
if ! have prometheus; then
  fetch_pkg bookworm prometheus '2.42*' usr/bin/prometheus prometheus
fi
# sed reads to the end: `head` would close the pipe early, and under pipefail the
# writer's SIGPIPE (exit 141) would fail this script at random.
"$bin/consul" version | sed -n 1p >&2
"$bin/etcd" --version | sed -n 1p >&2
echo "$bin"
