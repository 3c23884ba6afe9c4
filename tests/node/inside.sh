#!/usr/bin/env bash
# Runs inside `tests/cluster/with-cluster.sh --node` (tests/node/run.sh does that): fixity as
# its Helm chart deploys it, on a real node, checked through kubectl and helm.
#
#  1. images built here without a container engine (tests/cluster/image.sh): fixity's from
#     the static musl binary, twice (two digests of one binary, for the upgrade), and a
#     busybox workload, signed with cosign, plus an unsigned one;
#  2. helm install with that digest: the pods run the image as user 65532 with no shell, are
#     Running and Ready, serve admission through the Service, and manage their certificate
#     (the Secret, the caBundle, the Lease) with two replicas;
#  3. a Deployment of the signed, pinned image gets Running pods; the unsigned one is denied
#     at the Deployment and never gets a pod;
#  4. kubectl exec is denied, and runs for real through the break-glass group; kubectl debug
#     and kubectl cp are denied;
#  5. helm upgrade to the other digest while a client creates and deletes pods all along:
#     every one of those admissions succeeds (the count is printed);
#  6. no fixity pod left (scaled to zero): pod creation fails closed; back: it recovers;
#  7. helm uninstall removes the webhook.
# Prints the node's figures (time to Ready, rollout, admissions during it) and ends with
# "node: N passed, M failed"; exits 1 when anything failed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
: "${KUBECONFIG:?run me through tests/node/run.sh}"
: "${FIXITY_REGISTRY:?no node registry: run me through tests/node/run.sh (a cluster with --node)}"

binary=target/x86_64-unknown-linux-musl/release/fixity
[[ -x $binary ]] || { echo "inside.sh: $binary is missing (tests/node/run.sh builds it)" >&2; exit 2; }

work=$FIXITY_CLUSTER_DIR/node-tier
mkdir -p "$work"
ns=fixity
release=fixity
app=node-tier
registry=$FIXITY_REGISTRY
selector=app.kubernetes.io/name=fixity,app.kubernetes.io/instance=$release

passed=0 failed=0
pass() { passed=$((passed + 1)); printf 'ok - %s\n' "$*"; }
fail() { failed=$((failed + 1)); printf 'not ok - %s\n' "$*"; }
step() { printf '\n==> %s\n' "$*"; }
figure() { printf '  figure: %s\n' "$*"; }
expect_eq() { if [[ $2 == "$3" ]]; then pass "$1"; else fail "$1: expected '$2', got '$3'"; fi; }
# expect_in WHAT NEEDLE HAYSTACK
expect_in() { if [[ $3 == *"$2"* ]]; then pass "$1"; else fail "$1: no '$2' in: $3"; fi; }
run_ok() {
  local what=$1 out; shift
  if out=$("$@" 2>&1); then pass "$what"; else printf '%s\n' "$out" | tail -n 15; fail "$what"; fi
}
jp() { kubectl get "$@" 2>/dev/null || true; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }
secs() { local ms=$1; printf '%d.%d s' $((ms / 1000)) $((ms % 1000 / 100)); }
# poll SECONDS CMD...: true once CMD succeeds, false if it never does in time.
poll() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}
finish() {
  local status=$?
  if ((status != 0 && failed == 0)); then fail "inside.sh stopped early (status $status)"; fi
  if ((failed)); then
    printf '\n---- fixity pods ----\n'
    kubectl get pods -A -o wide 2>&1 || true
    local pod
    for pod in $(jp pods -n "$ns" -l "$selector" -o name); do
      printf -- '---- last lines of %s ----\n' "$pod"
      kubectl logs -n "$ns" "$pod" --tail 20 2>&1 || true
    done
  fi
  printf '\nnode: %d passed, %d failed\n' "$passed" "$failed"
  ((failed == 0)) || exit 1
}
trap finish EXIT

kubectl version 2>/dev/null | sed 's/^/  /' || true
helm version --short

# ---------------------------------------------------------------------------------------
step "images, built without a container engine"
t=$(now_ms)
fixity_a=$(tests/cluster/image.sh fixity "$registry/fixity" "$binary")
fixity_b=$(tests/cluster/image.sh fixity "$registry/fixity" "$binary" \
  org.opencontainers.image.revision=upgrade)
signed=$(tests/cluster/image.sh busybox "$registry/workload/app")
unsigned=$(tests/cluster/image.sh busybox "$registry/workload/app" \
  /bin/sh -c "trap 'exit 0' TERM; while :; do sleep 2 & wait; done")
figure "four images built and pushed in $(secs $(($(now_ms) - t)))"
printf '  %s\n' "$fixity_a" "$fixity_b" "$signed" "$unsigned"
if [[ ${fixity_a#*@} != "${fixity_b#*@}" ]]; then
  pass "the upgrade image has a digest of its own"
else
  fail "both fixity images have one digest"
fi
config=$(crane config --insecure "$fixity_a")
expect_eq "fixity's image: user, entrypoint, command" '65532:65532 ["/fixity"] ["serve"]' \
  "$(python3 -c 'import json,sys; c=json.load(sys.stdin)["config"]; print(c["User"], json.dumps(c["Entrypoint"]), json.dumps(c["Cmd"]))' <<<"$config")"
files=$(crane export --insecure "$fixity_a" - | tar -t | sort | tr '\n' ' ')
expect_eq "fixity's image: the binary, users, CA certificates; no shell" \
  "etc etc/group etc/passwd etc/ssl etc/ssl/certs etc/ssl/certs/ca-certificates.crt fixity home home/nonroot tmp " \
  "$files"

export COSIGN_PASSWORD=''
rm -f "$work/cosign.key" "$work/cosign.pub"
if (cd "$work" && cosign generate-key-pair && cosign sign --key cosign.key --tlog-upload=false \
    --use-signing-config=false --allow-http-registry -y "$signed") >"$work/cosign.log" 2>&1; then
  pass "the workload image is signed with cosign"
else
  cat "$work/cosign.log"
  fail "cosign sign"
fi

# ---------------------------------------------------------------------------------------
step "helm install with that digest"
t0=$(now_ms)
if helm install "$release" charts/fixity --namespace "$ns" --create-namespace \
    --set image.repository="$registry/fixity" --set image.digest="${fixity_a#*@}" \
    --set-json "extraArgs=[\"--insecure-registry=$registry\"]" --timeout 3m >"$work/install.log" 2>&1; then
  pass "helm install"
else
  cat "$work/install.log"
  fail "helm install"
  exit 1
fi
if kubectl rollout status deployment/fixity -n "$ns" --timeout=180s >/dev/null; then
  pass "the Deployment rolled out"
else
  fail "the Deployment rolled out"
fi
ready_ms=$(($(now_ms) - t0))
bundle_set() {
  local b
  b=$(jp validatingwebhookconfiguration fixity -o jsonpath='{.webhooks[*].clientConfig.caBundle}')
  [[ $b == ?*' '?* ]]
}
if poll 60 bundle_set; then pass "fixity wrote the caBundle of both webhooks"; else fail "caBundle written"; fi
serving_ms=$(($(now_ms) - t0))
figure "helm install to 2 pods Ready: $(secs "$ready_ms"); to the caBundle in place: $(secs "$serving_ms")"

pods=$(jp pods -n "$ns" -l "$selector" -o jsonpath='{range .items[*]}{.metadata.name} {end}')
read -r -a pod_list <<<"$pods"
expect_eq "two fixity pods" 2 "${#pod_list[@]}"
expect_eq "both Running and Ready, never restarted, on the node, with the image" \
  "$(printf "Running True 0 $FIXITY_NODE_NAME $fixity_a\n%.0s" 1 2)" \
  "$(jp pods -n "$ns" -l "$selector" -o jsonpath="{range .items[*]}{.status.phase} {.status.conditions[?(@.type==\"Ready\")].status} {.status.containerStatuses[0].restartCount} {.spec.nodeName} {.spec.containers[0].image}{\"\\n\"}{end}")"
expect_eq "the Service's endpoints are the two pods" \
  "$(jp pods -n "$ns" -l "$selector" -o jsonpath='{range .items[*]}{.status.podIP}{"\n"}{end}' | sort | tr '\n' ' ')" \
  "$(jp endpointslices -n "$ns" -l kubernetes.io/service-name=fixity -o jsonpath='{range .items[*].endpoints[?(@.conditions.ready==true)]}{.addresses[0]}{"\n"}{end}' | sort | tr '\n' ' ')"

# The container processes, seen from the node: the image's user, not root.
uids=''
for pid in $(ctr --address "$FIXITY_CONTAINERD_ADDRESS" --namespace k8s.io tasks ls 2>/dev/null \
    | awk 'NR > 1 { print $2 }'); do
  if [[ $(tr '\0' ' ' 2>/dev/null </proc/"$pid"/cmdline) == "/fixity serve "* ]]; then
    uids+="$(stat -c %u "/proc/$pid") "
  fi
done
expect_eq "both fixity processes run as uid 65532" "65532 65532 " "$uids"
run=$(kubectl exec -n "$ns" "${pod_list[0]}" -- sh -c true 2>&1 || true)
expect_in "no shell in fixity's image" 'executable file not found' "$run"

step "self-managed certificates, two replicas, one Lease"
jp secret fixity-tls -n "$ns" -o jsonpath='{.data.ca\.crt}' | base64 -d >"$work/ca.crt"
jp secret fixity-tls -n "$ns" -o jsonpath='{.data.tls\.crt}' | base64 -d >"$work/tls.crt"
jp validatingwebhookconfiguration fixity -o jsonpath='{.webhooks[0].clientConfig.caBundle}' \
  | base64 -d >"$work/bundle.crt"
run_ok "the caBundle is the CA in the Secret" cmp "$work/ca.crt" "$work/bundle.crt"
run_ok "the serving certificate chains to it and names the Service" \
  openssl verify -CAfile "$work/bundle.crt" -verify_hostname fixity.fixity.svc "$work/tls.crt"
if [[ -n $(jp lease fixity-certs -n "$ns" -o jsonpath='{.spec.acquireTime}') ]]; then
  pass "the Lease fixity-certs was taken"
else
  fail "the Lease fixity-certs was taken"
fi
issued=''
for pod in "${pod_list[@]}"; do
  issued+="$(kubectl logs -n "$ns" "$pod" | grep -c '"serving certificate issued"' || true) "
done
expect_in "one replica issued the certificate, the other did not" "$issued" "1 0 |0 1 "
fingerprint() { openssl x509 -noout -fingerprint -sha256; }
want=$(fingerprint <"$work/tls.crt")
served=''
for ip in $(jp pods -n "$ns" -l "$selector" -o jsonpath='{.items[*].status.podIP}'); do
  served+="$(openssl s_client -connect "$ip:8443" -servername fixity.fixity.svc </dev/null 2>/dev/null \
    | fingerprint) "
done
expect_eq "both replicas serve the Secret's certificate" "$want $want " "$served"

# ---------------------------------------------------------------------------------------
step "admission through the Service"
kubectl create namespace "$app" >/dev/null
kubectl label namespace "$app" fixity-node-tier=enforce >/dev/null
pem=$(sed 's/^/                /' "$work/cosign.pub")
kubectl apply -f - >/dev/null <<EOF
apiVersion: fixity.dev/v1alpha1
kind: ImmutabilityPolicy
metadata: {name: node-tier}
spec:
  mode: Enforce
  match:
    namespaceSelector: {matchLabels: {fixity-node-tier: enforce}}
  images:
    verify:
      - images: ["$registry/workload/**"]
        authorities:
          - key:
              publicKey: |
$pem
  exemptions:
    - groups: ["fixity:break-glass"]
EOF
policy_ready() {
  [[ $(jp immutabilitypolicy node-tier -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}') == True ]]
}
if poll 60 policy_ready; then pass "fixity's pods report the policy Ready"; else fail "policy Ready"; fi
for _ in $(seq 100); do kubectl get serviceaccount default -n "$app" >/dev/null 2>&1 && break; sleep 0.2; done

run=$(kubectl run tagged -n "$app" --image=nginx:1.27 2>&1 || true)
expect_in "a tagged pod is denied by fixity, called through its Service" \
  'admission webhook "workloads.fixity.dev" denied the request: fixity:' "$run"
expect_in "with the reason" MutableTag "$run"
# The API server keeps one connection to the Service, so one replica may get every review;
# each replica answers one sent to its own address, with the certificate of the caBundle.
fixture=tests/fixtures/admission/pod-create-tagged.json
uid=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["request"]["uid"])' "$fixture")
answers=''
for ip in $(jp pods -n "$ns" -l "$selector" -o jsonpath='{.items[*].status.podIP}'); do
  answers+="$(curl -sS --cacert "$work/bundle.crt" --resolve "fixity.fixity.svc:8443:$ip" \
    -H 'content-type: application/json' --data-binary @"$fixture" \
    https://fixity.fixity.svc:8443/validate 2>&1 \
    | python3 -c 'import json, sys; r = json.load(sys.stdin)["response"]; print(r["uid"])' 2>&1) "
done
expect_eq "each replica answers an AdmissionReview sent to it" "$uid $uid " "$answers"

# ---------------------------------------------------------------------------------------
step "a signed, pinned Deployment runs; an unsigned one is denied"
deployment() {
  cat <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: $1, namespace: $app}
spec:
  replicas: 2
  selector: {matchLabels: {app: $1}}
  template:
    metadata: {labels: {app: $1}}
    spec:
      terminationGracePeriodSeconds: 5
      containers: [{name: app, image: "$2"}]
EOF
}
t=$(now_ms)
run_ok "the signed Deployment is admitted" kubectl apply -f - <<<"$(deployment signed "$signed")"
run_ok "its pods become Ready" kubectl rollout status deployment/signed -n "$app" --timeout=120s
figure "signed Deployment applied to 2 pods Ready: $(secs $(($(now_ms) - t)))"
expect_eq "two Running pods of the signed image" "Running Running " \
  "$(jp pods -n "$app" -l app=signed -o jsonpath='{range .items[*]}{.status.phase} {end}')"
run=$(kubectl apply -f - 2>&1 <<<"$(deployment unsigned "$unsigned")" || true)
expect_in "the unsigned Deployment is denied when it is applied" \
  'error when creating "STDIN": admission webhook "workloads.fixity.dev" denied the request: fixity:' "$run"
expect_in "as unsigned" UnsignedImage "$run"
sleep 3
expect_eq "no Deployment, ReplicaSet or pod of it exists" "" \
  "$(jp deployment,replicaset,pod -n "$app" -l app=unsigned -o name)$(jp deployment unsigned -n "$app" -o name)"

# ---------------------------------------------------------------------------------------
step "kubectl exec, debug and cp"
target=$(jp pods -n "$app" -l app=signed -o jsonpath='{.items[0].metadata.name}')
run=$(kubectl exec -n "$app" "$target" -- echo hello 2>&1 || true)
expect_in "kubectl exec is denied" 'denied the request: fixity:' "$run"
expect_in "as ExecDenied" ExecDenied "$run"
kubectl create role exec -n "$app" --verb=get,create --resource=pods,pods/exec >/dev/null
kubectl create rolebinding exec -n "$app" --role=exec --user=oncall >/dev/null
# shellcheck disable=SC2016 # expanded by the pod's shell
run=$(kubectl exec -n "$app" "$target" --as=oncall --as-group=fixity:break-glass -- \
  sh -c 'echo "ran as $(id -u) in $(hostname)"' 2>&1 || true)
expect_eq "through the break-glass group the command really runs in the pod" "ran as 0 in $target" "$run"
run=$(kubectl exec -n "$app" "$target" --as=oncall -- echo hello 2>&1 || true)
expect_in "the same user without the group is denied" ExecDenied "$run"
run=$(kubectl debug -n "$app" "$target" --image="$signed" -c debugger --attach=false 2>&1 || true)
expect_in "kubectl debug is denied" EphemeralContainerDenied "$run"
expect_eq "the pod has no ephemeral container" "" \
  "$(jp pod "$target" -n "$app" -o jsonpath='{.spec.ephemeralContainers}')"
run=$(kubectl cp /etc/hostname "$app/$target:/tmp/copied" 2>&1 || true)
expect_in "kubectl cp is denied" ExecDenied "$run"

# ---------------------------------------------------------------------------------------
step "helm upgrade to a new digest while a client creates and deletes pods"
# The client: one pod after another, each created then deleted, every answer counted.
churn() {
  local i=0 out
  : >"$work/churn.ok"; : >"$work/churn.failed"
  while [[ ! -e $work/churn.stop ]]; do
    i=$((i + 1))
    if out=$(kubectl run "churn-$i" -n "$app" --image="$signed" --labels=churn=1 2>&1); then
      echo "$i" >>"$work/churn.ok"
    else
      printf '%s: %s\n' "$i" "$out" >>"$work/churn.failed"
    fi
    kubectl delete pod "churn-$i" -n "$app" --wait=false >/dev/null 2>&1 || true
  done
}
rm -f "$work/churn.stop"
churn &
churn_pid=$!
sleep 3
t=$(now_ms)
if helm upgrade "$release" charts/fixity --namespace "$ns" --reuse-values \
    --set image.digest="${fixity_b#*@}" --timeout 3m >"$work/upgrade.log" 2>&1; then
  pass "helm upgrade"
else
  cat "$work/upgrade.log"
  fail "helm upgrade"
fi
run_ok "the rollout completes" kubectl rollout status deployment/fixity -n "$ns" --timeout=180s
old_gone() { [[ -z $(jp pods -n "$ns" -l "$selector" -o jsonpath="{.items[?(@.spec.containers[0].image==\"$fixity_a\")].metadata.name}") ]]; }
if poll 120 old_gone; then pass "the old pods are gone"; else fail "the old pods are gone"; fi
rollout_ms=$(($(now_ms) - t))
sleep 3
touch "$work/churn.stop"
wait "$churn_pid" || true
ok=$(wc -l <"$work/churn.ok")
bad=$(wc -l <"$work/churn.failed")
figure "rollout $(secs "$rollout_ms"); pod creations during it: $bad failed out of $((ok + bad))"
expect_eq "no failed admission through the rolling update" 0 "$bad"
((bad == 0)) || sed 's/^/    /' "$work/churn.failed" | head -n 10
if ((ok >= 10)); then pass "the client kept creating pods all along ($ok)"; else fail "too few pods created ($ok)"; fi
expect_eq "both pods now run the new image" "$fixity_b $fixity_b " \
  "$(jp pods -n "$ns" -l "$selector" -o jsonpath='{range .items[*]}{.spec.containers[0].image} {end}')"
kubectl delete pods -n "$app" -l churn=1 --wait=false >/dev/null 2>&1 || true

# ---------------------------------------------------------------------------------------
step "no fixity pod left: creation fails closed, then recovers"
kubectl scale deployment fixity -n "$ns" --replicas=0 >/dev/null
no_pods() { [[ -z $(jp pods -n "$ns" -l "$selector" -o name) ]]; }
if poll 120 no_pods; then pass "every fixity pod is deleted"; else fail "fixity pods deleted"; fi
run=$(kubectl run closed -n "$app" --image="$signed" 2>&1 || true)
expect_in "pod creation fails closed" 'failed calling webhook "workloads.fixity.dev"' "$run"
expect_eq "and no pod was created" "" "$(jp pod closed -n "$app" -o name)"
t=$(now_ms)
kubectl scale deployment fixity -n "$ns" --replicas=2 >/dev/null
admitted() { kubectl run recovered -n "$app" --image="$signed"; }
if poll 120 admitted; then pass "creation recovers once fixity's pods are back"; else fail "creation recovers"; fi
figure "scaled back to 2 replicas: pods admitted again after $(secs $(($(now_ms) - t)))"

# ---------------------------------------------------------------------------------------
step "helm uninstall"
run_ok "helm uninstall" helm uninstall "$release" --namespace "$ns" --wait --timeout 2m
expect_eq "the webhook configuration is gone" "" "$(jp validatingwebhookconfiguration fixity -o name)"
run_ok "pods are no longer reviewed" kubectl run after -n "$app" --image=nginx:1.27 --dry-run=server
