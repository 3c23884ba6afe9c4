#!/usr/bin/env bash
# fixity's whole test suite, as CI runs it:
#   1. formatting, lints and the dependency rule (no OpenSSL);
#   2. the pinned Go test tools (kube-apiserver, the node's kubelet, kube-proxy and scheduler,
#      etcd, kubectl, crane, cosign, helm, and the Sigstore services: timestamp authority,
#      Rekor v2, Fulcio), built on first use and cached;
#   3. every Rust test tier: unit, in-process router, real sockets, CLI, signatures against a
#      local registry and a private Sigstore on loopback;
#   4. a short run of every fuzz target (fuzz/run.sh; FIXITY_FUZZ_SECS per target, default 20);
#   5. the Helm chart offline (lint, renders, schema, deploy/ in sync, hadolint);
#   6. the end-to-end tier (on a cluster with a node), the background-scanner tier, faults
#      under load, and the chart installed into a real kube-apiserver;
#   7. the static musl binary the Dockerfile ships;
#   8. the node tier: that binary's image installed with the chart on a real node.
# Needs: Rust (with rustfmt, clippy and the x86_64-unknown-linux-musl target), Go, musl-gcc,
# openssl, curl, python3, strace, a C++ compiler and cargo-fuzz (the fuzz targets); root, containerd, runc, the
# CNI plugins, iptables and busybox-static for the node. .ci/run installs what a fresh machine
# lacks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Each step is a tier; the closing line counts them (a failing step stops the run).
tiers_passed=0
current=
step() {
  [[ -n $current ]] && tiers_passed=$((tiers_passed + 1))
  current=$*
  printf '\n==> %s\n' "$*" >&2
}
finish() {
  local status=$?
  if ((status == 0)); then
    echo "suite: $((tiers_passed + 1)) passed, 0 failed"
  else
    echo "failed tier: $current" >&2
    echo "suite: $tiers_passed passed, 1 failed"
  fi
}
trap finish EXIT

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --locked --all-targets -- -D warnings

step "no OpenSSL in the dependency tree"
if cargo tree --locked -i openssl-sys >/dev/null 2>&1; then
  echo "openssl-sys is in the dependency tree:" >&2
  cargo tree --locked -i openssl-sys >&2
  exit 1
fi

step "pinned test tools"
PATH=$(tests/tools/build.sh | paste -sd: -):$PATH
export PATH

step "cargo test"
cargo test --locked

# The fuzz targets build fixity and its dependencies again, instrumented for coverage, in a
# build cheap enough to run cold (fuzz/README.md has its figures); any crash or failed
# property fails the tier. Every input they found is a regression test in cargo test.
step "fuzz targets, ${FIXITY_FUZZ_SECS:-20} s each"
fuzz/run.sh "${FIXITY_FUZZ_SECS:-20}"

step "Helm chart, deploy/ and Dockerfile (offline)"
tests/chart/test.sh

step "end-to-end tier (real kube-apiserver, etcd, kubectl and a node)"
tests/e2e/run.sh

step "background scanner, reports and tainted pods (real kube-apiserver and controllers)"
tests/scan/run.sh

step "faults under load (short run)"
tests/faults/run.sh

step "chart installed into a real kube-apiserver"
FIXITY_TOOL_FAMILIES="kube etcd helm" tests/cluster/with-cluster.sh tests/chart/install.sh

step "static musl binary"
tests/static-binary.sh

step "the chart on a real node (kubelet, containerd, runc)"
tests/node/run.sh
