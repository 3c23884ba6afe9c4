#!/usr/bin/env bash
# Runs inside `tests/cluster/with-cluster.sh --node`: starts fixity against the cluster,
# registers it, and runs the end-to-end tests. fixity's log is kept in the cluster work dir on
# failure.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
: "${KUBECONFIG:?run me through tests/cluster/with-cluster.sh --node}"
: "${FIXITY_REGISTRY:?the end-to-end tests need a cluster with a node: tests/e2e/run.sh}"

work=$FIXITY_CLUSTER_DIR/fixity
mkdir -p "$work"
# fixity's two ports, and two where tests run registry fronts that demand credentials
# (run.sh chose them, and the API server's client certificate for fixity's port).
: "${FIXITY_E2E_PORTS:?run me through tests/e2e/run.sh}" "${FIXITY_E2E_CLIENT_DIR:?}"
read -r port health_port auth_port provider_port <<<"$FIXITY_E2E_PORTS"

# The kubelet's credential provider set-up, with the test plugin: it gives the front on
# $provider_port its credentials for images under provided/, and nothing else.
cat >"$work/credential-providers.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
  - name: fixity-test-credential-provider
    matchImages: ["127.0.0.1:$provider_port/provided"]
    defaultCacheDuration: 5m
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    args: [answer]
    env:
      - {name: TEST_PROVIDER_USERNAME, value: robot}
      - {name: TEST_PROVIDER_PASSWORD, value: s3cret}
      - {name: TEST_PROVIDER_LOG, value: "$work/credential-provider.log"}
EOF

# The node's registry holds the signed images (plain HTTP, so fixity is told it is insecure)
# and the busybox image of the pods that really run.
registry=$FIXITY_REGISTRY
runnable=$(tests/cluster/image.sh busybox "$registry/e2e/busybox")

target/debug/fixity serve --dev --dev-cert-dir "$work/certs" --watch-cluster \
  --addr "127.0.0.1:$port" --health-addr "127.0.0.1:$health_port" --log-format json \
  --insecure-registry "$registry" --insecure-registry "127.0.0.1:$auth_port" \
  --insecure-registry "127.0.0.1:$provider_port" \
  --image-credential-provider-config "$work/credential-providers.yaml" \
  --image-credential-provider-bin-dir "$root/tests/credential_provider" \
  --registry-credentials --reference-refresh-secs 2 \
  --client-ca "$FIXITY_E2E_CLIENT_DIR/client-ca.crt" \
  2>"$work/fixity.log" &
fixity_pid=$!
on_exit() {
  local status=$?
  kill "$fixity_pid" 2>/dev/null || true
  wait "$fixity_pid" 2>/dev/null || true
  if ((status != 0)); then
    echo "---- last lines of $work/fixity.log ----" >&2
    tail -n 30 "$work/fixity.log" >&2
  fi
  exit "$status"
}
trap on_exit EXIT

t0=$(date +%s%N)
kubectl apply -f charts/fixity/crds/ >/dev/null
kubectl wait --for condition=Established --timeout=30s crd/immutabilitypolicies.fixity.dev \
  crd/verifiedevidences.fixity.dev >/dev/null
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$health_port/readyz" >/dev/null && break
  kill -0 "$fixity_pid" || { echo "fixity exited" >&2; exit 1; }
  sleep 0.2
done
curl -fs "http://127.0.0.1:$health_port/readyz" >/dev/null
sed -e "s|@URL@|https://127.0.0.1:$port/validate|" \
    -e "s|@CA_BUNDLE@|$(base64 -w0 <"$work/certs/ca.crt")|" tests/e2e/webhook.yaml \
  | kubectl apply -f - >/dev/null
echo "inside.sh: fixity registered and ready in $((($(date +%s%N) - t0) / 1000000)) ms" >&2

export FIXITY_E2E_ADDR=127.0.0.1:$port FIXITY_E2E_HEALTH=127.0.0.1:$health_port
export FIXITY_E2E_LOG=$work/fixity.log FIXITY_E2E_REGISTRY=$registry \
  FIXITY_E2E_AUTH_REGISTRY=127.0.0.1:$auth_port FIXITY_E2E_RUNNABLE=$runnable \
  FIXITY_E2E_PROVIDER_REGISTRY=127.0.0.1:$provider_port \
  FIXITY_E2E_PROVIDER_LOG=$work/credential-provider.log \
  FIXITY_E2E_CLIENT_CERT=$FIXITY_E2E_CLIENT_DIR/apiserver-client.crt \
  FIXITY_E2E_CLIENT_KEY=$FIXITY_E2E_CLIENT_DIR/apiserver-client.key
started=$(date +%s)
cargo test --locked --test e2e -- --ignored "$@"
# The evidence store: fixity processes of their own against the same cluster, one test at a
# time (garbage collection deletes what any of them wrote).
cargo test --locked --test evidence_store -- --ignored --test-threads 1 "$@"
echo "inside.sh: end-to-end tests took $(($(date +%s) - started)) s" >&2
