#!/usr/bin/env bash
# Faults under load: two `fixity serve` replicas watching a real kube-apiserver take a steady
# rate of AdmissionReviews while the serving certificate rotates, policies are applied,
# edited and deleted, the API server restarts, and the replica taking the traffic gets
# SIGTERM (the other takes over). Prints, per phase, reviews sent, failed requests, wrong
# decisions, retries and latency; fails on any failed request or wrong decision.
# tests/faults.rs says what each of these counts.
#
# Usage: tests/faults/run.sh [--full] [SECONDS] [RATE]
#   default  the short run of the test command: the debug build, 15 s at 200 reviews/s
#   --full   the release build, 60 s at 2,000 reviews/s (or SECONDS and RATE): the figures
#            in BENCHMARKS.md
# Needs what tests/cluster/up.sh needs (the pinned kube-apiserver, etcd and kubectl).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

profile=()
seconds=15 rate=200
if [[ ${1:-} == --full ]]; then
  shift
  profile=(--release)
  seconds=60 rate=2000
  cargo build --locked --release --bin fixity
  export FIXITY_FAULTS_BIN=$PWD/target/release/fixity
fi
export FIXITY_FAULTS_SECONDS=${1:-$seconds} FIXITY_FAULTS_RATE=${2:-$rate}
cargo test --locked "${profile[@]}" --test faults --no-run
export FIXITY_TOOL_FAMILIES="kube etcd"
# shellcheck disable=SC2016 # expanded by the inner bash, inside the cluster's environment
tests/cluster/with-cluster.sh bash -c '
  kubectl apply -f charts/fixity/crds/immutabilitypolicies.fixity.dev.yaml >/dev/null
  kubectl wait --for condition=Established --timeout=30s \
    crd/immutabilitypolicies.fixity.dev >/dev/null
  exec cargo test --locked "$@" --test faults -- --ignored --nocapture
' faults "${profile[@]}"
