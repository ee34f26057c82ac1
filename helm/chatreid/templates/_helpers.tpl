{{/*
Names: <release>-<chart> unless overridden, truncated to the 63 characters DNS labels allow.
*/}}
{{- define "chatreid.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "chatreid.fullname" -}}
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

{{- define "chatreid.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "chatreid.labels" -}}
helm.sh/chart: {{ include "chatreid.chart" . }}
{{ include "chatreid.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels; components add app.kubernetes.io/component. */}}
{{- define "chatreid.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chatreid.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "chatreid.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "chatreid.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "chatreid.secretName" -}}
{{- default (include "chatreid.fullname" .) .Values.s3.existingSecret }}
{{- end }}

{{/*
Image reference. Call with (dict "root" $ "variant" "cpu"|"cuda"); cuda uses the "-cuda" tag.
*/}}
{{- define "chatreid.image" -}}
{{- $root := .root }}
{{- $tag := default $root.Chart.AppVersion $root.Values.image.tag }}
{{- if eq .variant "cuda" }}
{{- $tag = printf "%s-cuda" $tag }}
{{- else if ne .variant "cpu" }}
{{- fail (printf "image variant must be cpu or cuda, got %q" .variant) }}
{{- end }}
{{- printf "%s:%s" $root.Values.image.repository $tag }}
{{- end }}

{{/*
Pod spec fields every workload shares: service account, pull secrets, security context.
*/}}
{{- define "chatreid.podCommon" -}}
serviceAccountName: {{ include "chatreid.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automount }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/*
Container environment: the ConfigMap (all non-secret CHATREID_* settings) plus the object-store
keys from the Secret. HOME is the writable /tmp because the root filesystem is read-only.
*/}}
{{- define "chatreid.env" -}}
envFrom:
  - configMapRef:
      name: {{ include "chatreid.fullname" . }}
env:
  - name: HOME
    value: /tmp
  - name: CHATREID_S3__ACCESS_KEY
    valueFrom:
      secretKeyRef:
        name: {{ include "chatreid.secretName" . }}
        key: {{ .Values.s3.accessKeyKey }}
  - name: CHATREID_S3__SECRET_KEY
    valueFrom:
      secretKeyRef:
        name: {{ include "chatreid.secretName" . }}
        key: {{ .Values.s3.secretKeyKey }}
{{- end }}

{{/* Roll pods when the configuration they read at start-up changes. */}}
{{- define "chatreid.configChecksum" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}
