#!/usr/bin/env bash
# The end-to-end tier: fixity as a local process behind a real kube-apiserver (with etcd and
# a node, so that pods run and an allowed exec really executes), registered by
# clientConfig.url + caBundle, driven by the real kubectl.
#
# Usage: tests/e2e/run.sh [CARGO TEST FILTER/ARGS...]
# Needs Go (the pinned apiserver, etcd, kubelet and kubectl are built on first use, then
# cached), and for the node root and Debian's containerd, runc, containernetworking-plugins,
# iptables and busybox-static (.ci/run installs them).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"

cargo build --locked --bin fixity
cargo test --locked --test e2e --no-run
cargo test --locked --test evidence_store --no-run

export FIXITY_TOOL_FAMILIES="kube etcd registry cosign"

# fixity's two ports, and two where tests run registry fronts that demand credentials (one
# for pull secrets, one for the credential provider plugin): chosen before the cluster starts,
# because the API server learns at start which client certificate to present to fixity's port.
work=$(mktemp -d "${TMPDIR:-/tmp}/fixity-e2e.XXXXXX")
trap 'rm -rf "$work"' EXIT
read -r port health_port auth_port provider_port < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(4)]
for s in ss:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in ss))
')

# The API server's client identity towards webhooks, from a CA of its own: fixity runs with
# --client-ca, so only the API server (told by its admission configuration to present this
# certificate to 127.0.0.1:$port) can send it reviews. SECURITY.md shows the same set-up.
cat >"$work/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
EOF
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=fixity-e2e-webhook-client-ca -config "$work/openssl.cnf" -extensions ca \
  -keyout "$work/client-ca.key" -out "$work/client-ca.crt" 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj /CN=kube-apiserver -config "$work/openssl.cnf" \
  -keyout "$work/apiserver-client.key" 2>/dev/null \
  | openssl x509 -req -CA "$work/client-ca.crt" -CAkey "$work/client-ca.key" \
      -set_serial "0x$(openssl rand -hex 12)" -days 2 -extfile "$work/openssl.cnf" \
      -extensions client -out "$work/apiserver-client.crt" 2>/dev/null
cat >"$work/webhook.kubeconfig" <<EOF
apiVersion: v1
kind: Config
users:
- name: "127.0.0.1:$port"
  user:
    client-certificate: $work/apiserver-client.crt
    client-key: $work/apiserver-client.key
EOF
cat >"$work/admission.yaml" <<EOF
apiVersion: apiserver.config.k8s.io/v1
kind: AdmissionConfiguration
plugins:
- name: ValidatingAdmissionWebhook
  configuration:
    apiVersion: apiserver.config.k8s.io/v1
    kind: WebhookAdmissionConfiguration
    kubeConfigFile: $work/webhook.kubeconfig
EOF
export FIXITY_APISERVER_EXTRA_ARGS="--admission-control-config-file=$work/admission.yaml"
export FIXITY_E2E_PORTS="$port $health_port $auth_port $provider_port" FIXITY_E2E_CLIENT_DIR=$work
tests/cluster/with-cluster.sh --node tests/e2e/inside.sh "$@"
