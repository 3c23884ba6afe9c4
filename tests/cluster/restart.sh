#!/usr/bin/env bash
# Restarts one process of a cluster started by tests/cluster/up.sh, with the command line it
# was started with (same ports, same data), and waits until the API server is ready again.
#
# Usage: tests/cluster/restart.sh DIR NAME [DOWN-SECONDS]
#   NAME          kube-apiserver, etcd or kube-controller-manager
#   DOWN-SECONDS  how long it stays stopped before it starts again (default 0)
#
# For fault tests: what clients of the API server (fixity's policy watcher) see when it goes
# away and comes back. SIGTERM first, SIGKILL after 3 s (an API server with open watches takes
# longer to stop; a kill is a fault as real as a restart). DIR/pids is updated with the new pid.
set -euo pipefail

log() { printf 'restart.sh: %s\n' "$*" >&2; }

dir=${1:?usage: restart.sh DIR NAME [DOWN-SECONDS]}
name=${2:?usage: restart.sh DIR NAME [DOWN-SECONDS]}
down=${3:-0}
dir=$(cd "$dir" && pwd)
pid=$(<"$dir/$name.pid")
[[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$dir" ||
  { log "$name ($pid) is not running as part of $dir"; exit 1; }
mapfile -d '' argv <"/proc/$pid/cmdline"

kill -TERM "$pid"
for ((i = 0; i < 30; i++)); do [[ -e /proc/$pid ]] || break; sleep 0.1; done
if [[ -e /proc/$pid ]]; then
  log "$name ($pid) still running 3s after SIGTERM; killing it"
  kill -KILL "$pid"
  for ((i = 0; i < 50; i++)); do [[ -e /proc/$pid ]] || break; sleep 0.1; done
fi
sleep "$down"

detach=()
command -v setsid >/dev/null && detach=(setsid)
rm -f "$dir/$name.pid"
# shellcheck disable=SC2016 # $$, $0 and $@ belong to the inner bash
"${detach[@]}" bash -c 'echo $$ >"$0"; exec "$@"' "$dir/$name.pid" "${argv[@]}" \
  </dev/null >>"$dir/$name.log" 2>&1 &
for ((i = 0; i < 50; i++)); do [[ -s $dir/$name.pid ]] && break; sleep 0.1; done
[[ -s $dir/$name.pid ]] || { log "$name did not start again"; exit 1; }
new=$(<"$dir/$name.pid")
sed -i "s/^$name $pid\$/$name $new/" "$dir/pids"

# shellcheck disable=SC1091 # written by up.sh
. "$dir/env"
pki=$dir/pki
for ((i = 0; i < 300; i++)); do
  if curl -fsS --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
    "$FIXITY_APISERVER_URL/readyz" >/dev/null 2>&1; then
    log "$name restarted ($pid -> $new)"
    exit 0
  fi
  [[ -e /proc/$new ]] || { log "$name exited after the restart; see $dir/$name.log"; exit 1; }
  sleep 0.2
done
log "the API server is not ready 60s after $name restarted"
exit 1
