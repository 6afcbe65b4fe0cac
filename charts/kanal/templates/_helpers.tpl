{{/* Names. */}}
{{- define "kanal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kanal.fullname" -}}
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

{{- define "kanal.operatorName" -}}{{ include "kanal.fullname" . | trunc 54 | trimSuffix "-" }}-operator{{- end }}
{{- define "kanal.dataplaneName" -}}{{ include "kanal.fullname" . | trunc 53 | trimSuffix "-" }}-dataplane{{- end }}
{{- define "kanal.configServiceName" -}}{{ include "kanal.fullname" . | trunc 56 | trimSuffix "-" }}-config{{- end }}
{{- define "kanal.webhookServiceName" -}}{{ include "kanal.fullname" . | trunc 55 | trimSuffix "-" }}-webhook{{- end }}
{{- define "kanal.webhookCertSecret" -}}{{ include "kanal.fullname" . | trunc 50 | trimSuffix "-" }}-webhook-tls{{- end }}
{{- define "kanal.tokenSecret" -}}
{{- if .Values.token.existingSecret }}{{ .Values.token.existingSecret }}{{ else }}{{ include "kanal.fullname" . | trunc 57 | trimSuffix "-" }}-token{{ end }}
{{- end }}

{{- define "kanal.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "kanal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: include "kanal.selectorLabels" (list . "operator") */}}
{{- define "kanal.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "kanal.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "kanal.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "kanal.sidecarImage" -}}
{{ .Values.sidecar.image.repository | default .Values.image.repository }}:{{ .Values.sidecar.image.tag | default .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Where dataplanes and sidecars subscribe. */}}
{{- define "kanal.controlPlaneURL" -}}
http://{{ include "kanal.configServiceName" . }}.{{ .Release.Namespace }}.svc:{{ .Values.operator.configPort }}
{{- end }}

{{/* The hardened container securityContext every Kanal container runs with. */}}
{{- define "kanal.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "kanal.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Probes on /live and /ready of the admin port named "admin". */}}
{{- define "kanal.probes" -}}
livenessProbe:
  httpGet: {path: /live, port: admin}
  {{- toYaml .Values.probes.liveness | nindent 2 }}
readinessProbe:
  httpGet: {path: /ready, port: admin}
  {{- toYaml .Values.probes.readiness | nindent 2 }}
{{- end }}

{{/* The pod's own name and namespace, for `kanal dataplane` ($POD_NAME, $POD_NAMESPACE). */}}
{{- define "kanal.podEnv" -}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- end }}

{{/* The namespaces the operator's rights are granted in (namespaced RBAC). */}}
{{- define "kanal.rbacNamespaces" -}}
{{- toJson .Values.watchNamespaces -}}
{{- end }}
