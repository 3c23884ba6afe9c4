#!/usr/bin/env bash
# Runs inside tests/cluster/with-cluster.sh for tests/scan/run.sh: the extra controllers, the
# chart's RBAC for fixity's ServiceAccount (a token kubeconfig fixity runs with, so a missing
# permission fails a test), the report CRDs as the chart installs them, then the tests, one at
# a time (each runs its own fixity, and one scanner at a time holds the Lease).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
: "${KUBECONFIG:?run me through tests/cluster/with-cluster.sh}"

work=$FIXITY_CLUSTER_DIR/scan
mkdir -p "$work"

kube-controller-manager --kubeconfig "$KUBECONFIG" \
  --controllers replicaset,deployment,disruption,garbagecollector \
  --leader-elect=false --secure-port 0 >"$work/controllers.log" 2>&1 &
controllers_pid=$!
on_exit() {
  local status=$?
  kill "$controllers_pid" 2>/dev/null || true
  wait "$controllers_pid" 2>/dev/null || true
  if ((status != 0)); then
    echo "---- last lines of $work/controllers.log ----" >&2
    tail -n 20 "$work/controllers.log" >&2
  fi
  exit "$status"
}
trap on_exit EXIT

kubectl apply -f charts/fixity/crds/ >/dev/null
kubectl create namespace fixity >/dev/null
# Two installs' worth of RBAC: the default (OpenReports) and one writing PolicyReports.
for release in "fixity|openreports" "fixity-pr|policyreport"; do
  name=${release%%|*}
  format=${release#*|}
  helm template "$name" charts/fixity --namespace fixity --set reports.format="$format" \
    --show-only templates/serviceaccount.yaml --show-only templates/rbac.yaml \
    | kubectl apply -f - >/dev/null
  helm template "$name" charts/fixity --namespace fixity --set reports.format="$format" \
    --set reports.installCRDs=true --show-only templates/report-crds.yaml \
    | kubectl apply -f - >/dev/null
  token=$(kubectl create token "$name" -n fixity --duration=4h)
  cat >"$work/$name.kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: $FIXITY_APISERVER_URL
    certificate-authority-data: $(base64 -w0 <"$FIXITY_CLUSTER_CA")
users:
- name: $name
  user:
    token: $token
contexts:
- name: test
  context: {cluster: test, user: $name, namespace: fixity}
current-context: test
KUBECONFIG
done
kubectl wait --for condition=Established --timeout=30s crd/immutabilitypolicies.fixity.dev \
  crd/verifiedevidences.fixity.dev \
  crd/reports.openreports.io crd/clusterreports.openreports.io \
  crd/policyreports.wgpolicyk8s.io crd/clusterpolicyreports.wgpolicyk8s.io >/dev/null

export FIXITY_SCAN_KUBECONFIG=$work/fixity.kubeconfig
export FIXITY_SCAN_PR_KUBECONFIG=$work/fixity-pr.kubeconfig
started=$(date +%s)
cargo test --locked --test scan -- --ignored --test-threads=1 "$@"
echo "inside.sh: scanner tests took $(($(date +%s) - started)) s" >&2
