#!/usr/bin/env bash
# Installs the chart and the plain manifests into a real kube-apiserver and checks what the
# API server made of them. Run it under the throwaway cluster:
#
#   FIXITY_TOOL_FAMILIES="kube etcd helm" tests/cluster/with-cluster.sh tests/chart/install.sh
#
# This cluster has no node, so fixity's pods never run (tests/node/run.sh installs the chart on
# one that has, and checks fixity running): the webhook is installed with failurePolicy
# Ignore, and what is checked is the API objects themselves:
#  - helm install (selfManaged certificates, report CRDs): every object exists, the CRDs are
#    Established, the webhook configuration's rules, selectors and settings are as intended;
#  - RBAC, by asking the API server what fixity's ServiceAccount may do (kubectl auth can-i);
#  - the pod template passes the restricted Pod Security Standard (enforced, server dry-run);
#  - a caBundle written by fixity survives `helm upgrade`, also with --force-replace;
#  - the certManager-mode objects other than cert-manager's own are accepted (dry-run);
#  - after `helm uninstall`: deploy/ applies as documented (CRD, wait, manifests).
# Ends with "install: N passed, M failed"; exits 1 when anything failed.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
chart=$root/charts/fixity
cd "$root"

if [[ -z ${KUBECONFIG:-} ]]; then
  echo "install.sh: no KUBECONFIG; run it as tests/cluster/with-cluster.sh tests/chart/install.sh" >&2
  exit 2
fi
PATH=$("$root/tests/tools/build.sh" helm):$PATH
command -v kubectl >/dev/null || { echo "install.sh: kubectl is not on PATH" >&2; exit 2; }

ns=fixity
release=fixity
sa=system:serviceaccount:$ns:fixity
crd=immutabilitypolicies.fixity.dev

passed=0 failed=0
pass() { passed=$((passed + 1)); printf 'ok - %s\n' "$*"; }
fail() { failed=$((failed + 1)); printf 'not ok - %s\n' "$*"; }
step() { printf '\n==> %s\n' "$*"; }
# expect_eq WHAT EXPECTED ACTUAL
expect_eq() {
  if [[ $2 == "$3" ]]; then pass "$1"; else fail "$1: expected '$2', got '$3'"; fi
}
# run_ok WHAT CMD...: passes when CMD succeeds (its output is shown only when it fails)
run_ok() {
  local what=$1 out; shift
  if out=$("$@" 2>&1); then pass "$what"; else printf '%s\n' "$out" | tail -n 15; fail "$what"; fi
}
jp() { kubectl get "$@" 2>/dev/null || true; }

work=$(mktemp -d "${TMPDIR:-/tmp}/fixity-install-test.XXXXXX")
trap 'rm -rf "$work"' EXIT

kubectl version 2>/dev/null | sed 's/^/  /' || true
helm version --short

# ---------------------------------------------------------------------------------------
step "helm install (selfManaged certificates, failurePolicy Ignore)"
run_ok "the CRD passes server-side validation (dry-run)" kubectl apply --dry-run=server -f deploy/crd.yaml
if helm install "$release" "$chart" --namespace "$ns" --create-namespace \
    --set webhook.failurePolicy=Ignore --set reports.installCRDs=true --timeout 2m >"$work/install.log" 2>&1; then
  pass "helm install"
else
  cat "$work/install.log"
  fail "helm install"
  printf '\ninstall: %d passed, %d failed\n' "$passed" "$failed"
  exit 1
fi

helm get manifest "$release" --namespace "$ns" >"$work/manifest.yaml"
run_ok "every object of the release exists" kubectl get -f "$work/manifest.yaml"
run_ok "CRD $crd is Established" kubectl wait --for=condition=Established "crd/$crd" --timeout=30s
run_ok "the report CRDs (reports.installCRDs) are Established" kubectl wait --for=condition=Established \
  crd/reports.openreports.io crd/clusterreports.openreports.io --timeout=30s
expect_eq "release deployed" deployed "$(helm status "$release" -n "$ns" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["info"]["status"])')"

step "the webhook configuration as the API server stored it"
vwc=validatingwebhookconfiguration/fixity
hook='{.webhooks[?(@.name=="workloads.fixity.dev")]'
pol='{.webhooks[?(@.name=="policies.fixity.dev")]'
expect_eq "webhook names" "workloads.fixity.dev policies.fixity.dev" "$(jp "$vwc" -o jsonpath='{.webhooks[*].name}')"
expect_eq "workloads: failurePolicy" Ignore "$(jp "$vwc" -o jsonpath="$hook.failurePolicy}")"
expect_eq "workloads: sideEffects" NoneOnDryRun "$(jp "$vwc" -o jsonpath="$hook.sideEffects}")"
expect_eq "workloads: timeoutSeconds" 10 "$(jp "$vwc" -o jsonpath="$hook.timeoutSeconds}")"
expect_eq "workloads: matchPolicy" Equivalent "$(jp "$vwc" -o jsonpath="$hook.matchPolicy}")"
expect_eq "workloads: admissionReviewVersions" v1 "$(jp "$vwc" -o jsonpath="$hook.admissionReviewVersions[*]}")"
expect_eq "workloads: service" "fixity/fixity:443/validate" \
  "$(jp "$vwc" -o jsonpath="$hook.clientConfig.service.namespace}/$hook.clientConfig.service.name}:$hook.clientConfig.service.port}$hook.clientConfig.service.path}")"
expect_eq "workloads: namespaces excluded" "kubernetes.io/metadata.name NotIn kube-system fixity" \
  "$(jp "$vwc" -o jsonpath="$hook.namespaceSelector.matchExpressions[0].key} $hook.namespaceSelector.matchExpressions[0].operator} $hook.namespaceSelector.matchExpressions[0].values[*]}")"
# One line per rule: operations | groups | resources | scope
rules=$(jp "$vwc" -o jsonpath="$hook.rules[*]}" | python3 -c '
import json, sys
text = sys.stdin.read().strip()
dec, i, out = json.JSONDecoder(), 0, []
while i < len(text):
    obj, j = dec.raw_decode(text, i)
    out.append(" ".join(obj["operations"]) + " | " + " ".join(obj["apiGroups"]) + " | "
               + " ".join(obj["resources"]) + " | " + obj.get("scope", ""))
    i = j
    while i < len(text) and text[i].isspace():
        i += 1
print("\n".join(out))')
expected_rules='CREATE UPDATE |  | pods podtemplates replicationcontrollers | Namespaced
CREATE UPDATE | apps | deployments replicasets statefulsets daemonsets | Namespaced
CREATE UPDATE | batch | jobs cronjobs | Namespaced
CONNECT |  | pods/exec pods/attach pods/portforward | Namespaced
UPDATE |  | pods/ephemeralcontainers | Namespaced
CONNECT |  | nodes/proxy | Cluster'
if [[ $rules == "$expected_rules" ]]; then
  pass "workloads: rules as intended"
else
  fail "workloads: rules as intended; got:"
  printf '%s\n' "$rules" | sed 's/^/    /'
fi
expect_eq "policies: rule" "CREATE UPDATE fixity.dev immutabilitypolicies Cluster" \
  "$(jp "$vwc" -o jsonpath="$pol.rules[0].operations[*]} $pol.rules[0].apiGroups[*]} $pol.rules[0].resources[*]} $pol.rules[0].scope}")"
expect_eq "policies: no namespaceSelector constraint" "" \
  "$(jp "$vwc" -o jsonpath="$pol.namespaceSelector.matchExpressions}")"
expect_eq "no caBundle before fixity writes one" "" "$(jp "$vwc" -o jsonpath='{.webhooks[*].clientConfig.caBundle}')"
expect_eq "default policy installed, in Audit mode" Audit "$(jp immutabilitypolicy fixity-baseline -o jsonpath='{.spec.mode}')"

step "RBAC: what fixity's ServiceAccount may do"
# can_i EXPECTED VERB RESOURCE [FLAGS...]
can_i() {
  local want=$1; shift
  local got
  got=$(kubectl auth can-i --as="$sa" "$@" 2>/dev/null || true)
  expect_eq "can-i $* -> $want" "$want" "$got"
}
can_i yes list immutabilitypolicies.fixity.dev
can_i yes watch immutabilitypolicies.fixity.dev
can_i yes patch immutabilitypolicies.fixity.dev/fixity-baseline --subresource=status
can_i no update immutabilitypolicies.fixity.dev/fixity-baseline
can_i no delete immutabilitypolicies.fixity.dev/fixity-baseline
can_i yes watch namespaces
can_i no update namespaces/default
can_i yes create events.events.k8s.io -n default
can_i yes patch validatingwebhookconfigurations/fixity
can_i yes get validatingwebhookconfigurations/fixity
can_i no patch validatingwebhookconfigurations/someone-else
can_i no delete validatingwebhookconfigurations/fixity
can_i no create validatingwebhookconfigurations
can_i no patch mutatingwebhookconfigurations/fixity
can_i yes create secrets -n "$ns"
can_i yes get secrets/fixity-tls -n "$ns"
can_i yes update secrets/fixity-tls -n "$ns"
can_i no get secrets/other -n "$ns"
can_i no list secrets -n "$ns"
can_i no get secrets/fixity-tls -n default
can_i no create secrets -n default
can_i yes create leases.coordination.k8s.io -n "$ns"
can_i yes update leases.coordination.k8s.io/fixity-certs -n "$ns"
can_i no update leases.coordination.k8s.io/other -n "$ns"
can_i no create pods -n default
# The evidence store: its own objects cluster-wide, and the garbage collection Lease by name.
for verb in get list watch create update patch delete; do
  can_i yes "$verb" verifiedevidences.fixity.dev
done
can_i no delete immutabilitypolicies.fixity.dev
can_i yes update leases.coordination.k8s.io/fixity-evidence -n "$ns"
can_i no update leases.coordination.k8s.io/fixity-evidence -n default
# The scanner (on by default): list what runs, mark tainted pods, evict them, write reports.
can_i yes list pods -n default
can_i yes get pods -n default
can_i yes patch pods -n default
can_i no update pods -n default
can_i no delete pods -n default
can_i yes create pods --subresource=eviction -n default
can_i no watch pods -n default
can_i yes list deployments.apps -n default
can_i no get deployments.apps -n default
can_i no patch deployments.apps -n default
can_i yes list cronjobs.batch -n default
can_i yes create reports.openreports.io -n default
can_i yes patch reports.openreports.io -n default
can_i yes delete reports.openreports.io -n default
can_i no update reports.openreports.io -n default
can_i yes patch clusterreports.openreports.io
can_i no patch policyreports.wgpolicyk8s.io -n default
can_i yes update leases.coordination.k8s.io/fixity-scan -n "$ns"
can_i no update leases.coordination.k8s.io/fixity-scan -n default

step "the pod template meets the restricted Pod Security Standard"
kubectl create namespace fixity-pss >/dev/null
kubectl label namespace fixity-pss pod-security.kubernetes.io/enforce=restricted \
  pod-security.kubernetes.io/enforce-version=latest >/dev/null
# Pods need the namespace's "default" ServiceAccount, which its controller adds a moment later.
for _ in $(seq 1 100); do kubectl get serviceaccount default -n fixity-pss >/dev/null 2>&1 && break; sleep 0.2; done
kubectl get deployment fixity -n "$ns" -o json | python3 -c '
import json, sys
tpl = json.load(sys.stdin)["spec"]["template"]
tpl["spec"]["serviceAccountName"] = "default"
print(json.dumps({"apiVersion": "v1", "kind": "Pod",
                  "metadata": {"name": "fixity-pss", "namespace": "fixity-pss",
                               "labels": tpl["metadata"]["labels"]},
                  "spec": tpl["spec"]}))' >"$work/pod.json"
run_ok "a pod from the Deployment's template is admitted under enforce=restricted (dry-run)" \
  kubectl create --dry-run=server -f "$work/pod.json"
kubectl delete namespace fixity-pss --wait=false >/dev/null

step "a caBundle written by fixity survives helm upgrade"
ca=$(base64 -w0 <"$FIXITY_CLUSTER_CA")
# Written as fixity would, with its own identity: proves RBAC allows it, too.
run_ok "fixity's ServiceAccount can write the caBundle" \
  kubectl --as="$sa" patch "$vwc" --type=json -p "[
    {\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$ca\"},
    {\"op\":\"add\",\"path\":\"/webhooks/1/clientConfig/caBundle\",\"value\":\"$ca\"}]"
run_ok "helm upgrade" helm upgrade "$release" "$chart" --namespace "$ns" --reuse-values --set replicas=3 --timeout 2m
expect_eq "upgrade applied (replicas 3)" 3 "$(jp deployment fixity -n "$ns" -o jsonpath='{.spec.replicas}')"
expect_eq "caBundle kept on both webhooks" "$ca $ca" "$(jp "$vwc" -o jsonpath='{.webhooks[*].clientConfig.caBundle}')"
# Replacing objects instead of patching them is where a chart without the lookup of the
# current caBundle loses it (checked: both server-side and client-side apply keep it anyway).
run_ok "helm upgrade --force-replace" helm upgrade "$release" "$chart" --namespace "$ns" --reuse-values \
  --set replicas=2 --force-replace --server-side=false --timeout 2m
expect_eq "caBundle kept through --force-replace" "$ca $ca" "$(jp "$vwc" -o jsonpath='{.webhooks[*].clientConfig.caBundle}')"

step "certManager mode: everything but cert-manager's own objects is accepted (dry-run)"
helm template "$release" "$chart" --namespace "$ns" --set certificates.mode=certManager \
  --set webhook.failurePolicy=Ignore >"$work/cm.yaml"
# The test cluster has no cert-manager: leave its kinds out, keep the rest.
python3 - "$work/cm.yaml" >"$work/cm-core.yaml" <<'EOF'
import re, sys
docs = re.split(r"(?m)^---[ \t]*$", open(sys.argv[1]).read())
print("\n---".join(d for d in docs if d.strip() and "apiVersion: cert-manager.io/" not in d))
EOF
if grep -q 'kind: Deployment' "$work/cm-core.yaml" && ! grep -q 'cert-manager.io/v1' "$work/cm-core.yaml"; then
  run_ok "certManager-mode objects accepted by the API server (dry-run)" \
    kubectl apply --dry-run=server -f "$work/cm-core.yaml"
else
  fail "certManager render split into core objects"
fi

step "helm uninstall"
run_ok "helm uninstall" helm uninstall "$release" --namespace "$ns" --timeout 2m
expect_eq "webhook configuration removed" "" "$(jp "$vwc" -o name)"
expect_eq "ClusterRole removed" "" "$(jp clusterrole fixity -o name)"
expect_eq "default policy removed" "" "$(jp immutabilitypolicy fixity-baseline -o name)"
expect_eq "CRD kept (helm never deletes crds/)" "customresourcedefinition.apiextensions.k8s.io/$crd" "$(jp "crd/$crd" -o name)"
expect_eq "report CRDs (templates) removed with the release" "" "$(jp crd/reports.openreports.io -o name)"

step "plain manifests: deploy/ as documented"
# The image digest is a placeholder, which does not matter here: no pod is ever run.
run_ok "kubectl apply -f deploy/crd.yaml" kubectl apply -f deploy/crd.yaml
run_ok "CRDs Established" kubectl wait --for=condition=Established "crd/$crd" \
  crd/verifiedevidences.fixity.dev --timeout=30s
# failurePolicy Ignore, as for the chart: nothing answers the webhook here.
sed 's/failurePolicy: Fail/failurePolicy: Ignore/' deploy/fixity.yaml >"$work/fixity.yaml"
run_ok "kubectl apply --dry-run=server -f deploy/fixity.yaml" kubectl apply --dry-run=server -f "$work/fixity.yaml"
run_ok "kubectl apply -f deploy/fixity.yaml" kubectl apply -f "$work/fixity.yaml"
run_ok "every object of deploy/fixity.yaml exists" kubectl get -f "$work/fixity.yaml"
expect_eq "namespace held to the restricted Pod Security Standard" restricted \
  "$(jp namespace "$ns" -o jsonpath='{.metadata.labels.pod-security\.kubernetes\.io/enforce}')"
run_ok "kubectl delete -f deploy/fixity.yaml" kubectl delete -f "$work/fixity.yaml" --wait=false

printf '\ninstall: %d passed, %d failed\n' "$passed" "$failed"
((failed == 0))
