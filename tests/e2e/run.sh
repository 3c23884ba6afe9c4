#!/usr/bin/env bash
# The end-to-end tier: fixity as a local process behind a real kube-apiserver (with etcd),
# registered by clientConfig.url + caBundle, driven by the real kubectl.
#
# Usage: tests/e2e/run.sh [CARGO TEST FILTER/ARGS...]
# Needs Go (the pinned apiserver, etcd and kubectl are built on first use, then cached).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"

cargo build --locked --bin fixity
cargo test --locked --test e2e --no-run

export FIXITY_TOOL_FAMILIES="kube etcd registry cosign"
exec tests/cluster/with-cluster.sh tests/e2e/inside.sh "$@"
