{{/*
Names. Kubernetes names are at most 63 characters where they end up in labels or DNS.
*/}}
{{- define "fixity.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the release name, suffixed with the chart name unless it already contains it, so
that `helm install fixity ...` gives objects named plainly "fixity".
*/}}
{{- define "fixity.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fixity.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Version shown to people: the image tag if given, else the chart's appVersion. */}}
{{- define "fixity.version" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "fixity.labels" -}}
helm.sh/chart: {{ include "fixity.chart" . }}
{{ include "fixity.selectorLabels" . }}
app.kubernetes.io/version: {{ include "fixity.version" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fixity
{{- end }}

{{/* Labels that select fixity's pods; never change them (Deployment selectors are immutable). */}}
{{- define "fixity.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fixity.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fixity.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fixity.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image, always by digest: fixity's own policy denies mutable tags. */}}
{{- define "fixity.image" -}}
{{- $digest := required "image.digest is required: fixity runs its own image by digest (sha256:<64 hex>)" .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository $digest }}
{{- end }}

{{- define "fixity.serviceName" -}}
{{- include "fixity.fullname" . }}
{{- end }}

{{- define "fixity.webhookName" -}}
{{- .Values.webhook.name }}
{{- end }}

{{- define "fixity.certSecretName" -}}
{{- default (printf "%s-tls" (include "fixity.fullname" .)) .Values.certificates.secretName }}
{{- end }}

{{- define "fixity.certLeaseName" -}}
{{- default (printf "%s-certs" (include "fixity.fullname" .)) .Values.certificates.selfManaged.leaseName }}
{{- end }}

{{/* Name of the cert-manager Certificate whose CA the cainjector copies into the caBundle. */}}
{{- define "fixity.servingCertificateName" -}}
{{- printf "%s-serving" (include "fixity.fullname" .) }}
{{- end }}

{{- define "fixity.selfManaged" -}}
{{- if eq .Values.certificates.mode "selfManaged" }}true{{ end }}
{{- end }}

{{/*
Namespaces the webhook never sees: kube-system, the release namespace (so fixity itself can
always start, whatever the failurePolicy) and any listed in values. Emitted as a JSON list.
*/}}
{{- define "fixity.excludedNamespaces" -}}
{{- $ns := list "kube-system" .Release.Namespace }}
{{- range .Values.webhook.excludeNamespaces }}
{{- $ns = append $ns . }}
{{- end }}
{{- $ns | uniq | toJson }}
{{- end }}

{{/* The Service's DNS names, as the certificate must carry them. */}}
{{- define "fixity.dnsNames" -}}
{{- $svc := include "fixity.serviceName" . }}
{{- $ns := .Release.Namespace }}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) | toJson }}
{{- end }}

{{/* The schema of a core/v1 ObjectReference, for the report CRDs. */}}
{{- define "fixity.objectReferenceSchema" -}}
type: object
properties:
  apiVersion: {type: string}
  kind: {type: string}
  name: {type: string}
  namespace: {type: string}
  uid: {type: string}
  resourceVersion: {type: string}
  fieldPath: {type: string}
x-kubernetes-map-type: atomic
{{- end }}

{{/* The schema of a meta/v1 LabelSelector, for the report CRDs. */}}
{{- define "fixity.labelSelectorSchema" -}}
type: object
properties:
  matchLabels:
    type: object
    additionalProperties: {type: string}
  matchExpressions:
    type: array
    items:
      type: object
      required: [key, operator]
      properties:
        key: {type: string}
        operator: {type: string}
        values:
          type: array
          items: {type: string}
x-kubernetes-map-type: atomic
{{- end }}

{{/* The Lease that lets one replica at a time scan and evict. */}}
{{- define "fixity.scanLeaseName" -}}
{{- default (printf "%s-scan" (include "fixity.fullname" .)) .Values.scanner.leaseName }}
{{- end }}
