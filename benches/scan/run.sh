#!/usr/bin/env bash
# The background-scan benchmark: a throwaway kube-apiserver and etcd, a local registry with
# signed images, the release fixity with --scan. See BENCHMARKS.md.
#
# Usage: benches/scan/run.sh [--secs S] [--rate R] [--slice-ms MS]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"

cargo bench --locked --bench scan --no-run
export FIXITY_TOOL_FAMILIES="kube etcd registry cosign helm"
exec tests/cluster/with-cluster.sh cargo bench --locked --bench scan -- "$@"
