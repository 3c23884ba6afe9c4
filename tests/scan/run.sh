#!/usr/bin/env bash
# The background-scanner tier: each test starts its own fixity (`serve --scan`) against a real
# kube-apiserver and etcd, with the RBAC the chart grants, and drives workloads with the real
# kubectl. A second kube-controller-manager runs the replicaset, deployment, disruption and
# garbage-collector controllers, so Deployments have pods, PodDisruptionBudgets have a status
# and deletions cascade, as on a real cluster; there is no kubelet, so the tests write pod
# statuses (Running, imageID) as a kubelet would.
#
# Usage: tests/scan/run.sh [CARGO TEST FILTER/ARGS...]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"

cargo build --locked --bin fixity
cargo test --locked --test scan --no-run

export FIXITY_TOOL_FAMILIES="kube etcd registry cosign helm"
exec tests/cluster/with-cluster.sh tests/scan/inside.sh "$@"
