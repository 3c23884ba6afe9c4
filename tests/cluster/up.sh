#!/usr/bin/env bash
# Starts a throwaway Kubernetes cluster for fixity's tests.
#
# By default a control plane on loopback: etcd, kube-apiserver, and a
# kube-controller-manager that runs only the serviceaccount and namespace controllers. There
# is no scheduler and no kubelet: pods are stored and stay Pending, and exec/attach/
# port-forward fail after admission (no node to connect to).
#
# With --node (root only) also a node that runs pods, see node.sh: containerd and runc,
# the kubelet, kube-proxy, pod networking on a bridge, a registry the node pulls from, the
# kube-scheduler, and the controllers a Deployment needs. The API server then listens on the
# host's end of the node's link instead of loopback.
#
# Usage:
#   tests/cluster/up.sh [--node] [DIR]    start; prints DIR on stdout (a new temp dir by default)
#   . tests/cluster/up.sh [--node] [DIR]  same, then sources DIR/env into the calling bash
#   tests/cluster/down.sh DIR [--rm]      stop it again (--rm: and delete DIR)
#
# DIR must be new or empty.
# DIR/env exports KUBECONFIG (admin, system:masters), PATH (pinned kubectl/etcd bin dirs
# first), FIXITY_CLUSTER_DIR, FIXITY_APISERVER_URL, FIXITY_ETCD_URL, FIXITY_CLUSTER_CA and
# the process ids (FIXITY_ETCD_PID, FIXITY_APISERVER_PID, FIXITY_CONTROLLER_MANAGER_PID,
# FIXITY_CLUSTER_PIDS). With --node also FIXITY_NODE_NAME, FIXITY_NODE_IP, FIXITY_HOST_IP
# (where the host's services are reachable from the node and its pods), FIXITY_REGISTRY
# (HOST:PORT of the node's plain-HTTP registry), FIXITY_NODE_NETNS (for nsenter --net) and
# FIXITY_CONTAINERD_ADDRESS (for ctr). Logs: DIR/<process>.log.
# The binaries come from tests/tools/build.sh (a cache hit after the first build).
# FIXITY_CLUSTER_TIMEOUT (seconds, default 60) bounds the wait for readiness;
# FIXITY_APISERVER_EXTRA_ARGS adds kube-apiserver flags.
#
# Why a controller-manager at all: without the serviceaccount controller no namespace gets
# its "default" ServiceAccount, and the ServiceAccount admission plugin then rejects every
# pod ("error looking up service account ..."). Keeping that plugin (rather than disabling
# it) gives pods the same shape as on a real cluster: serviceAccountName is filled in and
# the service account's imagePullSecrets are copied into the pod, which fixity reads. The
# namespace controller makes `kubectl delete namespace` finish instead of hanging.
# A namespace created by a test gets its "default" ServiceAccount a moment later, as on
# a real cluster: wait for it before creating pods there.

# Sourced: run this file as a child bash (so set -e, traps and exit cannot touch the
# caller's shell), then import the environment it wrote.
if [[ ${BASH_SOURCE[0]} != "$0" ]]; then
  __fixity_node=()
  if [[ ${1:-} == --node ]]; then __fixity_node=(--node); shift; fi
  __fixity_dir=${1:-$(mktemp -d "${TMPDIR:-/tmp}/fixity-cluster.XXXXXX")}
  if "$BASH" "${BASH_SOURCE[0]}" "${__fixity_node[@]}" "$__fixity_dir" >/dev/null; then
    # shellcheck disable=SC1091 # written at run time
    . "$__fixity_dir/env"
    unset __fixity_dir __fixity_node
    return 0
  fi
  unset __fixity_dir __fixity_node
  return 1
fi

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
timeout=${FIXITY_CLUSTER_TIMEOUT:-60}
t0=$(date +%s%N)

log() { printf 'up.sh: %s\n' "$*" >&2; }

node=false
if [[ ${1:-} == --node ]]; then node=true; shift; fi
dir=${1:-$(mktemp -d "${TMPDIR:-/tmp}/fixity-cluster.XXXXXX")}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
# A fresh cluster needs a fresh directory (old etcd data, pid files and certs would mix
# with the new ones).
if [[ -n $(ls -A "$dir") ]]; then
  log "error: $dir is not empty; give up.sh a new or empty directory"
  exit 1
fi
for tool in openssl curl python3; do
  command -v "$tool" >/dev/null || { log "error: '$tool' is needed but not on PATH"; exit 1; }
done

# Pinned binaries (built once, then cached; build.sh explains its own failures).
families=(kube etcd)
if $node; then families+=(registry); fi
bin_dirs=$("$here/../tools/build.sh" "${families[@]}")
bin_path=$(paste -sd: - <<<"$bin_dirs")
PATH=$bin_path:$PATH

# On any failure from here on: stop what was started and show why; DIR is left for a look.
started=()
on_exit() {
  local status=$?
  ((status == 0)) && return 0
  local name
  for name in "${started[@]}"; do
    [[ -s $dir/$name.log ]] || continue
    log "---- last lines of $dir/$name.log ----"
    tail -n 25 "$dir/$name.log" >&2
  done
  if ((${#started[@]})) || [[ -f $dir/node/network.env ]]; then "$here/down.sh" "$dir" >&2 || true; fi
  log "failed (status $status); work dir kept: $dir"
}
trap on_exit EXIT

# Three free loopback ports, held open together so they are distinct; another process
# could in principle take one before etcd/apiserver bind it, which is then reported as
# "address already in use" in their logs.
read -r etcd_port peer_port api_port < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(3)]
for s in ss:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in ss))
')
etcd_url=http://127.0.0.1:$etcd_port

# The node's network comes first: the API server listens on the host's end of it, and its
# certificate names that address and the kubernetes Service's ClusterIP.
api_address=127.0.0.1
service_cidr=10.0.0.0/24
kubernetes_ip=10.0.0.1
if $node; then
  # shellcheck source=tests/cluster/node.sh
  . "$here/node.sh"
  node_network
  api_address=$host_ip
fi
api_url=https://$api_address:$api_port

# ---- throwaway PKI (ECDSA P-256: quick to generate) ----
pki=$dir/pki
mkdir -p "$pki"
cat >"$pki/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:::1,IP:@KUBERNETES_IP@,IP:@API_ADDRESS@
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
EOF
sed -i -e "s/@KUBERNETES_IP@/$kubernetes_ip/" -e "s/@API_ADDRESS@/$api_address/" "$pki/openssl.cnf"
newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
# issue NAME SUBJECT EXTENSION-SECTION: NAME.key + NAME.crt signed by the CA
issue() {
  newkey "$pki/$1.key"
  openssl req -new -key "$pki/$1.key" -subj "$2" -config "$pki/openssl.cnf" \
    | openssl x509 -req -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -set_serial "0x$(openssl rand -hex 12)" \
        -days 7 -extfile "$pki/openssl.cnf" -extensions "$3" -out "$pki/$1.crt" 2>/dev/null
}
newkey "$pki/ca.key"
openssl req -new -x509 -key "$pki/ca.key" -subj "/CN=fixity-test-ca" -days 7 \
  -config "$pki/openssl.cnf" -extensions ca -out "$pki/ca.crt"
issue apiserver "/CN=kube-apiserver" server
issue admin "/O=system:masters/CN=fixity-admin" client
# Service-account token signing pair (the apiserver issues tokens; nothing else needs it).
newkey "$pki/sa.key"
openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"

b64() { base64 -w0 <"$1"; }
# write_kubeconfig FILE NAME: a kubeconfig for the client certificate pki/NAME.crt.
write_kubeconfig() {
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: fixity-test
  cluster:
    server: $api_url
    certificate-authority-data: $(b64 "$pki/ca.crt")
users:
- name: fixity-$2
  user:
    client-certificate-data: $(b64 "$pki/$2.crt")
    client-key-data: $(b64 "$pki/$2.key")
contexts:
- name: fixity-test
  context:
    cluster: fixity-test
    user: fixity-$2
    namespace: default
current-context: fixity-test
EOF
  chmod 600 "$1"
}
kubeconfig=$dir/admin.kubeconfig
write_kubeconfig "$kubeconfig" admin
if $node; then node_pki; fi
chmod 600 "$pki"/*.key

# start NAME CMD...: runs CMD detached (own session, so a Ctrl-C aimed at the caller or the
# caller's exit does not hit it) with output in DIR/NAME.log; the pid goes to DIR/pids.
# The pid is written by the process itself right before exec, so it is the server's own.
start() {
  local name=$1; shift
  local detach=()
  command -v setsid >/dev/null && detach=(setsid)
  # shellcheck disable=SC2016 # $$, $0 and $@ belong to the inner bash
  "${detach[@]}" bash -c 'echo $$ >"$0"; exec "$@"' "$dir/$name.pid" "$@" \
    </dev/null >"$dir/$name.log" 2>&1 &
  local i
  for ((i = 0; i < 50; i++)); do [[ -s $dir/$name.pid ]] && break; sleep 0.1; done
  [[ -s $dir/$name.pid ]] || { log "error: $name did not start"; return 1; }
  started+=("$name")
  echo "$name $(<"$dir/$name.pid")" >>"$dir/pids"
}

# wait_for NAME CHECK...: polls CHECK until it succeeds, failing early if NAME exited.
wait_for() {
  local name=$1; shift
  local pid deadline=$((SECONDS + timeout))
  pid=$(<"$dir/$name.pid")
  until "$@" >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then log "error: $name exited during startup"; return 1; fi
    if ((SECONDS >= deadline)); then log "error: $name not ready after ${timeout}s"; return 1; fi
    sleep 0.2
  done
}

# ---- etcd ----
start etcd etcd \
  --name fixity-test \
  --data-dir "$dir/etcd-data" \
  --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "fixity-test=http://127.0.0.1:$peer_port" \
  --unsafe-no-fsync \
  --log-level warn
wait_for etcd curl -fsS "$etcd_url/health"

# ---- kube-apiserver ----
# Admission plugins: the defaults (ServiceAccount, MutatingAdmissionWebhook,
# ValidatingAdmissionWebhook, ValidatingAdmissionPolicy, PodSecurity, ...) are kept.
# FIXITY_APISERVER_EXTRA_ARGS adds flags (space-separated), e.g. the end-to-end tier's
# --admission-control-config-file, which gives the API server a client certificate for
# fixity.
# shellcheck disable=SC2206 # the extra flags are meant to split
extra_args=(${FIXITY_APISERVER_EXTRA_ARGS:-})
mode_flags=(--authorization-mode RBAC)
if $node; then mapfile -t mode_flags < <(node_apiserver_flags); fi
start kube-apiserver kube-apiserver \
  --etcd-servers "$etcd_url" \
  --bind-address "$api_address" --advertise-address "$api_address" --secure-port "$api_port" \
  --cert-dir "$dir/apiserver-certs" \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" \
  "${mode_flags[@]}" \
  --service-cluster-ip-range "$service_cidr" \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$pki/sa.pub" \
  --service-account-signing-key-file "$pki/sa.key" \
  --allow-privileged=true \
  --profiling=false \
  "${extra_args[@]}"
curl_api() {
  curl -fsS --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" "$api_url$1"
}
wait_for kube-apiserver curl_api /readyz

# ---- kube-controller-manager (serviceaccount + namespace controllers; more for a node) ----
# --secure-port 0: it serves nothing (no port to pick, no authn delegation lookups).
controllers=serviceaccount,namespace
if $node; then controllers=$node_controllers; fi
start kube-controller-manager kube-controller-manager \
  --kubeconfig "$kubeconfig" \
  --controllers "$controllers" \
  --root-ca-file "$pki/ca.crt" \
  --leader-elect=false \
  --secure-port 0
# Ready once the "default" namespace has its "default" ServiceAccount.
wait_for kube-controller-manager curl_api /api/v1/namespaces/default/serviceaccounts/default

if $node; then node_start; fi

pid_of() { cat "$dir/$1.pid"; }
{
  printf 'export %s=%q\n' \
    FIXITY_CLUSTER_DIR "$dir" \
    KUBECONFIG "$kubeconfig" \
    FIXITY_APISERVER_URL "$api_url" \
    FIXITY_ETCD_URL "$etcd_url" \
    FIXITY_CLUSTER_CA "$pki/ca.crt" \
    FIXITY_ETCD_PID "$(pid_of etcd)" \
    FIXITY_APISERVER_PID "$(pid_of kube-apiserver)" \
    FIXITY_CONTROLLER_MANAGER_PID "$(pid_of kube-controller-manager)" \
    FIXITY_CLUSTER_PIDS "$(pid_of etcd) $(pid_of kube-apiserver) $(pid_of kube-controller-manager)"
  if $node; then
    printf 'export %s=%q\n' \
      FIXITY_NODE_NAME "$node_name" \
      FIXITY_NODE_IP "$node_ip" \
      FIXITY_HOST_IP "$host_ip" \
      FIXITY_REGISTRY "$registry" \
      FIXITY_NODE_NETNS "$dir/node/netns" \
      FIXITY_CONTAINERD_ADDRESS "$dir/node/containerd/containerd.sock"
  fi
  # shellcheck disable=SC2016 # $PATH expands when the file is sourced
  printf 'export PATH=%q:"$PATH"\n' "$bin_path"
} >"$dir/env"

ms=$((($(date +%s%N) - t0) / 1000000))
what=cluster
if $node; then what="cluster with node $node_name ($node_ip, registry $registry)"; fi
log "$what up in $((ms / 1000)).$((ms % 1000 / 100))s: $api_url (etcd $etcd_url); . $dir/env"
echo "$dir"
