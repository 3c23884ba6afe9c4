#!/usr/bin/env bash
# Runs a command against a fresh throwaway cluster, then tears the cluster down.
#
# Usage: tests/cluster/with-cluster.sh [--node] CMD [ARG...]
#
# 1. builds (or finds cached) the pinned tools with tests/tools/build.sh and puts their bin
#    dirs first on PATH: kubectl here is the pinned 1.36 one, not the machine's;
#    FIXITY_TOOL_FAMILIES (space-separated, e.g. "kube etcd") limits which are built;
# 2. starts etcd + kube-apiserver + kube-controller-manager with tests/cluster/up.sh in a
#    new temp dir; with --node also a node that runs pods (kubelet, containerd, kube-proxy,
#    kube-scheduler, a registry: see up.sh and node.sh; needs root);
# 3. runs CMD with DIR/env exported (KUBECONFIG, FIXITY_CLUSTER_DIR, FIXITY_APISERVER_URL,
#    ... see up.sh);
# 4. always stops the processes (also on Ctrl-C / SIGTERM); deletes the dir when CMD
#    succeeded, keeps it and prints its path and the log tails when anything failed.
# Exits with CMD's status (or up.sh's, if the cluster did not come up).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC2317 # only called from the trap handler
log() { printf 'with-cluster.sh: %s\n' "$*" >&2; }

up_args=()
if [[ ${1:-} == --node ]]; then up_args=(--node); shift; fi
if (($# == 0)); then
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
  exit 2
fi

# shellcheck disable=SC2086 # word splitting of the family list is intended
bin_dirs=$("$here/../tools/build.sh" ${FIXITY_TOOL_FAMILIES:-})
PATH=$(paste -sd: - <<<"$bin_dirs"):$PATH
export PATH

dir=$(mktemp -d "${TMPDIR:-/tmp}/fixity-cluster.XXXXXX")

# shellcheck disable=SC2317 # invoked by trap
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  "$here/down.sh" "$dir" || status=1
  if ((status == 0)); then
    rm -rf "$dir"
  else
    local log_file
    for log_file in "$dir"/*.log; do
      [[ -s $log_file ]] || continue
      log "---- last lines of $log_file ----"
      tail -n 20 "$log_file" >&2
    done
    log "exit status $status; cluster work dir kept: $dir"
  fi
  exit "$status"
}
# CMD runs in the background and this shell waits for it, because bash defers a trapped
# signal until a foreground child exits: a SIGTERM (e.g. from a CI timeout) is passed on
# to CMD and the cluster is torn down right away instead of whenever CMD ends.
child=
# shellcheck disable=SC2317 # invoked by trap
on_signal() {
  if [[ -n $child ]]; then
    kill -TERM "$child" 2>/dev/null || true
    wait "$child" 2>/dev/null || true
  fi
  exit "$1"
}
trap cleanup EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

"$here/up.sh" "${up_args[@]}" "$dir" >/dev/null
# shellcheck disable=SC1091 # written by up.sh
. "$dir/env"

# <&0: keep the caller's stdin (a background command would otherwise get /dev/null).
"$@" <&0 &
child=$!
status=0
wait "$child" || status=$?
child=
exit "$status"
