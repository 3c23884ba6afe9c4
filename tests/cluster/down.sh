#!/usr/bin/env bash
# Stops a cluster started by tests/cluster/up.sh.
#
# Usage: tests/cluster/down.sh DIR [--rm]
#   --rm  also delete DIR afterwards
#
# Processes are stopped in reverse start order (controller-manager, apiserver, etcd):
# SIGTERM, up to 10 s to exit, then SIGKILL. A pid is only signalled while its command
# line still mentions DIR, so a pid reused by some unrelated process is left alone.
# A cluster with a node (up.sh --node) stops its kubelet first and every container through
# containerd, then the processes, then removes what the node leaves on the machine: mounts
# under DIR, the pod cgroups, its network namespace and interface (node.sh, node_cleanup).
# Exits 1 when any of that could not be removed, naming it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { printf 'down.sh: %s\n' "$*" >&2; }

dir=${1:?usage: down.sh DIR [--rm]}
remove=false
[[ ${2:-} == --rm ]] && remove=true
[[ -d $dir ]] || { log "no such directory: $dir"; exit 1; }
dir=$(cd "$dir" && pwd)

# True while pid $1 is alive and is one of this cluster's processes.
ours() {
  [[ -r /proc/$1/cmdline ]] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF -- "$dir"
}

# stop NAME PID: SIGTERM, then SIGKILL after 10 s.
stop() {
  local name=$1 pid=$2 i
  ours "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do ours "$pid" || break; sleep 0.1; done
  if ours "$pid"; then
    log "$name ($pid) ignored SIGTERM for 10s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
}

# stop_entry NAME: stops the process recorded under NAME, if it runs.
stop_entry() {
  local name pid
  [[ -f $dir/pids ]] || return 0
  while read -r name pid; do
    if [[ $name == "$1" ]]; then stop "$name" "$pid"; fi
  done <"$dir/pids"
}

node=false
if [[ -f $dir/node/network.env ]]; then
  node=true
  # shellcheck source=tests/cluster/node.sh
  . "$here/node.sh"
  node_stop_containers
fi

if [[ -f $dir/pids ]]; then
  mapfile -t entries < <(tac "$dir/pids")
  for entry in "${entries[@]}"; do
    read -r name pid <<<"$entry"
    stop "$name" "$pid"
  done
  # Renamed rather than removed: keeps the record for a post-mortem, and lets up.sh reuse DIR.
  mv "$dir/pids" "$dir/pids.stopped"
fi

status=0
if $node; then node_cleanup || status=1; fi

if $remove && ((status == 0)); then rm -rf "$dir"; fi
exit "$status"
