#!/usr/bin/env bash
# The node tier: fixity's image, built here without a container engine, installed with its
# Helm chart into a throwaway cluster with a real node, and driven through kubectl and helm
# (tests/node/inside.sh says what is checked).
#
# Usage: tests/node/run.sh
# Needs root, Debian's containerd, runc, containernetworking-plugins, iptables and
# busybox-static (.ci/run installs them), the musl target with musl-gcc (the image holds the
# static binary), and Go for the pinned tools (built on first use, then cached).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"

cargo build --release --locked --target x86_64-unknown-linux-musl --bin fixity

export FIXITY_TOOL_FAMILIES="kube etcd registry cosign helm"
exec tests/cluster/with-cluster.sh --node tests/node/inside.sh "$@"
