#!/usr/bin/env bash
# Stops a cluster started by tests/cluster/up.sh.
#
# Usage: tests/cluster/down.sh DIR [--rm]
#   --rm  also delete DIR afterwards
#
# Processes are stopped in reverse start order (controller-manager, apiserver, etcd):
# SIGTERM, up to 10 s to exit, then SIGKILL. A pid is only signalled while its command
# line still mentions DIR, so a pid reused by some unrelated process is left alone.
set -euo pipefail

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

if [[ -f $dir/pids ]]; then
  mapfile -t entries < <(tac "$dir/pids")
  for entry in "${entries[@]}"; do
    read -r name pid <<<"$entry"
    ours "$pid" || continue
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do ours "$pid" || break; sleep 0.1; done
    if ours "$pid"; then
      log "$name ($pid) ignored SIGTERM for 10s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  # Renamed rather than removed: keeps the record for a post-mortem, and lets up.sh reuse DIR.
  mv "$dir/pids" "$dir/pids.stopped"
fi

if $remove; then rm -rf "$dir"; fi
