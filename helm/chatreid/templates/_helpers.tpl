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

{{/*
Secret names: each part (S3 keys, Kafka SASL credentials, API key) comes from the chart's Secret
(<fullname>) unless that part names an existing Secret.
*/}}
{{- define "chatreid.secretName" -}}
{{- default (include "chatreid.fullname" .) .Values.s3.existingSecret }}
{{- end }}

{{- define "chatreid.kafkaSecretName" -}}
{{- default (include "chatreid.fullname" .) .Values.kafka.sasl.existingSecret }}
{{- end }}

{{- define "chatreid.apiSecretName" -}}
{{- default (include "chatreid.fullname" .) .Values.retrieval.existingSecret }}
{{- end }}

{{/* "true" when the retrieval API requires a key (CHATREID_SERVE__API_KEY), else "". */}}
{{- define "chatreid.apiKeyEnabled" -}}
{{- if and .Values.retrieval.enabled (not .Values.retrieval.insecure) }}true{{ end }}
{{- end }}

{{/* "true" when the release runs a Ray cluster (RayService or RayJobs), else "". */}}
{{- define "chatreid.rayEnabled" -}}
{{- if or .Values.retrieval.enabled .Values.training.enabled }}true{{ end }}
{{- end }}

{{/* The Secret holding the Ray token under key auth_token (KubeRay's authOptions.secretName). */}}
{{- define "chatreid.raySecretName" -}}
{{- default (include "chatreid.fullname" .) .Values.ray.auth.existingSecret }}
{{- end }}

{{/* A Ray cluster's authOptions (token auth; KubeRay authenticates its own calls with it). */}}
{{- define "chatreid.rayAuthOptions" -}}
authOptions:
  mode: token
  secretName: {{ include "chatreid.raySecretName" . }}
{{- end }}

{{/* The Ray token as environment (Ray pods, job submitters): RAY_AUTH_MODE + RAY_AUTH_TOKEN. */}}
{{- define "chatreid.rayAuthEnv" -}}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "chatreid.raySecretName" . }}
      key: auth_token
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
Pod spec fields every Deployment/Job shares: service account, pull secrets, security context.
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
Container environment. Call with (dict "root" $ "serve" bool "ray" bool "extraEnv" list):
the ConfigMap (all non-secret CHATREID_* settings; with serve, also the Serve ConfigMap), then
the secrets: the object-store keys, the Kafka SASL credentials (when kafka.sasl.enabled) and,
for Serve pods, the API key. HOME is the writable /tmp because the root filesystem is
read-only. Ray pods join their own cluster (CHATREID_RAY__ADDRESS=auto), never an in-process one,
with its token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN from the Ray auth Secret).
*/}}
{{- define "chatreid.env" -}}
{{- $root := .root }}
{{- $v := $root.Values -}}
envFrom:
  - configMapRef:
      name: {{ include "chatreid.fullname" $root }}
  {{- if .serve }}
  - configMapRef:
      name: {{ include "chatreid.fullname" $root }}-serve
  {{- end }}
env:
  - name: HOME
    value: /tmp
  {{- if .ray }}
  - name: CHATREID_RAY__ADDRESS
    value: auto
  {{- include "chatreid.rayAuthEnv" $root | nindent 2 }}
  {{- end }}
  - name: CHATREID_S3__ACCESS_KEY
    valueFrom:
      secretKeyRef:
        name: {{ include "chatreid.secretName" $root }}
        key: {{ $v.s3.accessKeyKey }}
  - name: CHATREID_S3__SECRET_KEY
    valueFrom:
      secretKeyRef:
        name: {{ include "chatreid.secretName" $root }}
        key: {{ $v.s3.secretKeyKey }}
  {{- if $v.kafka.sasl.enabled }}
  {{- if or (not $v.kafka.sasl.existingSecret) $v.kafka.sasl.usernameKey }}
  - name: CHATREID_KAFKA__SASL_USERNAME
    valueFrom:
      secretKeyRef:
        name: {{ include "chatreid.kafkaSecretName" $root }}
        key: {{ $v.kafka.sasl.usernameKey }}
  {{- end }}
  - name: CHATREID_KAFKA__SASL_PASSWORD
    valueFrom:
      secretKeyRef:
        name: {{ include "chatreid.kafkaSecretName" $root }}
        key: {{ $v.kafka.sasl.passwordKey }}
  {{- end }}
  {{- if and .serve (include "chatreid.apiKeyEnabled" $root) }}
  - name: CHATREID_SERVE__API_KEY
    valueFrom:
      secretKeyRef:
        name: {{ include "chatreid.apiSecretName" $root }}
        key: {{ $v.retrieval.apiKeyKey }}
  {{- end }}
  {{- range .extraEnv }}
  - name: {{ .name }}
    value: {{ .value | quote }}
  {{- end }}
{{- end }}

{{/* A float the way Python writes it (1 -> 1.0), so YAML reads it back as a float. */}}
{{- define "chatreid.float" -}}
{{- $v := float64 . }}
{{- if eq $v (floor $v) }}{{ printf "%.1f" $v }}{{ else }}{{ $v }}{{ end }}
{{- end }}

{{/*
The main ConfigMap's data (YAML map): every non-secret, non-Serve setting, plus extraConfig.
*/}}
{{- define "chatreid.configData" -}}
{{- $v := .Values }}
{{- $d := dict }}
{{- $_ := set $d "CHATREID_SITE" (toString $v.site) }}
{{- $_ := set $d "CHATREID_KAFKA__BOOTSTRAP_SERVERS" (toString (required "kafka.bootstrapServers is required" $v.kafka.bootstrapServers)) }}
{{- $_ := set $d "CHATREID_KAFKA__TOPIC_PREFIX" (toString $v.kafka.topicPrefix) }}
{{- $_ := set $d "CHATREID_KAFKA__PARTITIONS" (toString (int $v.kafka.partitions)) }}
{{- $_ := set $d "CHATREID_KAFKA__REPLICATION_FACTOR" (toString (int $v.kafka.replicationFactor)) }}
{{- if $v.kafka.sasl.enabled }}
{{- $_ := set $d "CHATREID_KAFKA__SECURITY_PROTOCOL" (toString $v.kafka.sasl.securityProtocol) }}
{{- $_ := set $d "CHATREID_KAFKA__SASL_MECHANISM" (toString $v.kafka.sasl.mechanism) }}
{{- if and $v.kafka.sasl.existingSecret (not $v.kafka.sasl.usernameKey) }}
{{- $_ := set $d "CHATREID_KAFKA__SASL_USERNAME" (toString (required "kafka.sasl.username is required when kafka.sasl.existingSecret has no usernameKey" $v.kafka.sasl.username)) }}
{{- end }}
{{- end }}
{{- $_ := set $d "CHATREID_S3__ENDPOINT" (toString (required "s3.endpoint is required" $v.s3.endpoint)) }}
{{- $_ := set $d "CHATREID_S3__SECURE" (toString $v.s3.secure) }}
{{- $_ := set $d "CHATREID_S3__BUCKET" (toString $v.s3.bucket) }}
{{- with $v.s3.region }}
{{- $_ := set $d "CHATREID_S3__REGION" (toString .) }}
{{- end }}
{{- with $v.s3.publicEndpoint }}
{{- $_ := set $d "CHATREID_S3__PUBLIC_ENDPOINT" (toString .) }}
{{- end }}
{{- $_ := set $d "CHATREID_INGESTOR__HTTP_HOST" "0.0.0.0" }}
{{- $_ := set $d "CHATREID_INGESTOR__HTTP_PORT" (toString (int $v.ingestor.port)) }}
{{- $_ := set $d "CHATREID_EMBEDDER__DEVICE" (toString $v.embedder.device) }}
{{- $_ := set $d "CHATREID_EMBEDDER__BATCH_SIZE" (toString (int $v.embedder.batchSize)) }}
{{- $_ := set $d "CHATREID_EMBEDDER__TORCH_THREADS" (toString (int $v.embedder.torchThreads)) }}
{{- with $v.embedder.weights }}
{{- $_ := set $d "CHATREID_EMBEDDER__WEIGHTS" (toString .) }}
{{- end }}
{{- $_ := set $d "CHATREID_RETENTION__CROP_DAYS" (include "chatreid.float" $v.retention.cropDays) }}
{{- /* Only with shards: one shard renders what it did before shards existed. */}}
{{- if gt (int $v.retrieval.prefilterShards) 1 }}
{{- $_ := set $d "CHATREID_INDEX__SHARDS" (toString (int $v.retrieval.prefilterShards)) }}
{{- end }}
{{- $serve := dict }}
{{- if $v.retrieval.enabled }}
{{- $serve = include "chatreid.serveConfigData" . | fromYaml }}
{{- end }}
{{- $managed := list "CHATREID_SERVE__API_KEY" "CHATREID_S3__ACCESS_KEY" "CHATREID_S3__SECRET_KEY" "CHATREID_KAFKA__SASL_USERNAME" "CHATREID_KAFKA__SASL_PASSWORD" "CHATREID_RAY__ADDRESS" "CHATREID_RAY__AUTH_TOKEN" "CHATREID_ACCESS__INSECURE" "CHATREID_INDEX__SHARDS" "CHATREID_SERVE__PREFILTER_SHARD_RESOURCE" }}
{{- range $key, $value := $v.extraConfig }}
{{- if not (hasPrefix "CHATREID_" $key) }}
{{- fail (printf "extraConfig key %q must start with CHATREID_" $key) }}
{{- end }}
{{- if or (hasKey $d $key) (hasKey $serve $key) (has $key $managed) }}
{{- fail (printf "extraConfig key %q is set by the chart from other values (see values.yaml); set those instead" $key) }}
{{- end }}
{{- $_ := set $d $key (toString $value) }}
{{- end }}
{{- toYaml $d }}
{{- end }}

{{/*
The Serve settings (YAML map) of the Ray pods of the retrieval RayService: ConfigMap
<fullname>-serve. serveConfigV2 is rendered from the same values (chatreid.serveConfig).
*/}}
{{- define "chatreid.serveConfigData" -}}
{{- $r := .Values.retrieval }}
{{- $d := dict }}
{{- $_ := set $d "CHATREID_SERVE__HTTP_HOST" "0.0.0.0" }}
{{- $_ := set $d "CHATREID_SERVE__HTTP_PORT" (toString (int $r.port)) }}
{{- $_ := set $d "CHATREID_SERVE__MODEL" (toString (required "retrieval.model is required" $r.model)) }}
{{- $_ := set $d "CHATREID_SERVE__STAGE" (toString $r.stage) }}
{{- $_ := set $d "CHATREID_SERVE__FALLBACK_MODEL" (toString $r.fallbackModel) }}
{{- with $r.publicUrl }}
{{- $_ := set $d "CHATREID_SERVE__PUBLIC_URL" (toString .) }}
{{- end }}
{{- $_ := set $d "CHATREID_SERVE__INGRESS_REPLICAS" (toString (int $r.ingressReplicas)) }}
{{- $_ := set $d "CHATREID_SERVE__PREFILTER_REPLICAS" (toString (int $r.prefilterReplicas)) }}
{{- $_ := set $d "CHATREID_SERVE__RERANK_REPLICAS" (toString (int $r.rerankReplicas)) }}
{{- $_ := set $d "CHATREID_SERVE__RERANK_AUTOSCALING" (toString $r.rerankAutoscaling.enabled) }}
{{- $_ := set $d "CHATREID_SERVE__RERANK_MIN_REPLICAS" (toString (int $r.rerankAutoscaling.minReplicas)) }}
{{- $_ := set $d "CHATREID_SERVE__RERANK_MAX_REPLICAS" (toString (int $r.rerankAutoscaling.maxReplicas)) }}
{{- $_ := set $d "CHATREID_SERVE__RERANK_TARGET_ONGOING_REQUESTS" (include "chatreid.float" $r.rerankAutoscaling.targetOngoingRequests) }}
{{- $_ := set $d "CHATREID_SERVE__RERANK_NUM_CPUS" (include "chatreid.float" $r.rerankNumCpus) }}
{{- $_ := set $d "CHATREID_SERVE__RERANK_NUM_GPUS" (include "chatreid.float" $r.rerankNumGpus) }}
{{- $_ := set $d "CHATREID_SERVE__RERANK_MAX_ONGOING_REQUESTS" (toString (int $r.rerankMaxOngoingRequests)) }}
{{- $_ := set $d "CHATREID_SERVE__LIGHT_NUM_CPUS" (include "chatreid.float" $r.lightNumCpus) }}
{{- if gt (int $r.prefilterShards) 1 }}
{{- $_ := set $d "CHATREID_SERVE__PREFILTER_SHARD_RESOURCE" (toString $r.prefilterWorkers.rayResource) }}
{{- end }}
{{- $_ := set $d "CHATREID_SERVE__TORCH_THREADS" (toString (int $r.torchThreads)) }}
{{- $_ := set $d "CHATREID_ACCESS__RATE_PER_MINUTE" (toString (int (required "retrieval.ratePerMinute is required" $r.ratePerMinute))) }}
{{- $_ := set $d "CHATREID_CONSOLE__IDLE_HOURS" (include "chatreid.float" $r.sessionIdleHours) }}
{{- if $r.insecure }}
{{- $_ := set $d "CHATREID_ACCESS__INSECURE" "true" }}
{{- end }}
{{- toYaml $d }}
{{- end }}

{{/*
Serve settings that only reach the app through serveConfigV2, which KubeRay applies in place:
changing them must not roll the Ray pods (they are left out of the pods' checksum). Every
other setting is read from the pod environment when the app is built, so it does.
*/}}
{{- define "chatreid.serveInPlaceKeys" -}}
CHATREID_SERVE__MODEL CHATREID_SERVE__INGRESS_REPLICAS CHATREID_SERVE__PREFILTER_REPLICAS CHATREID_SERVE__RERANK_REPLICAS CHATREID_SERVE__RERANK_AUTOSCALING CHATREID_SERVE__RERANK_MIN_REPLICAS CHATREID_SERVE__RERANK_MAX_REPLICAS CHATREID_SERVE__RERANK_TARGET_ONGOING_REQUESTS CHATREID_SERVE__RERANK_NUM_CPUS CHATREID_SERVE__RERANK_MAX_ONGOING_REQUESTS CHATREID_SERVE__LIGHT_NUM_CPUS
{{- end }}

{{/*
serveConfigV2 of the RayService: the portable Serve config, exactly what
`deploy_config(settings, portable=True)` (services/retrieval/app.py, `chatreid serve
--print-config`) returns for the settings in <fullname>-serve; tests/test_deploy.py compares
the two. Constants here (app name, route, import path, health and shutdown periods) mirror it;
so do the shard deployments (`shard_options`: with a shard resource, no CPUs and one unit of it).
*/}}
{{- define "chatreid.serveConfig" -}}
{{- $r := .Values.retrieval -}}
http_options:
  host: 0.0.0.0
  port: {{ int $r.port }}
applications:
  - name: chatreid
    route_prefix: /
    import_path: services.retrieval.app:build_app
    args: {}
    deployments:
      - name: Ingress
        num_replicas: {{ int $r.ingressReplicas }}
        ray_actor_options:
          num_cpus: {{ include "chatreid.float" $r.lightNumCpus }}
      - name: Prefilter
        num_replicas: {{ int $r.prefilterReplicas }}
        ray_actor_options:
          num_cpus: {{ include "chatreid.float" $r.lightNumCpus }}
        health_check_period_s: 10
      {{- if gt (int $r.prefilterShards) 1 }}
      {{- range $i := until (int $r.prefilterShards) }}
      - name: PrefilterShard{{ $i }}
        num_replicas: {{ int $r.prefilterReplicas }}
        ray_actor_options:
          num_cpus: 0.0
          resources:
            {{ $r.prefilterWorkers.rayResource }}: 1.0
        health_check_period_s: 10
      {{- end }}
      {{- end }}
      - name: Rerank
        user_config:
          model: {{ $r.model | toString | quote }}
        max_ongoing_requests: {{ int $r.rerankMaxOngoingRequests }}
        ray_actor_options:
          num_cpus: {{ include "chatreid.float" $r.rerankNumCpus }}
          {{- if gt (float64 $r.rerankNumGpus) 0.0 }}
          num_gpus: {{ include "chatreid.float" $r.rerankNumGpus }}
          {{- end }}
        health_check_period_s: 10
        graceful_shutdown_timeout_s: 120
        {{- if $r.rerankAutoscaling.enabled }}
        autoscaling_config:
          min_replicas: {{ int $r.rerankAutoscaling.minReplicas }}
          max_replicas: {{ int $r.rerankAutoscaling.maxReplicas }}
          target_ongoing_requests: {{ include "chatreid.float" $r.rerankAutoscaling.targetOngoingRequests }}
        {{- else }}
        num_replicas: {{ int $r.rerankReplicas }}
        {{- end }}
{{- end }}

{{/* Roll Deployment/Job pods when the configuration they read at start-up changes. */}}
{{- define "chatreid.configChecksum" -}}
checksum/config: {{ include "chatreid.configData" . | sha256sum }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}

{{/*
Ray pods: the same, plus (Serve pods) the Serve settings the app reads from the environment.
A changed checksum changes the RayService's cluster spec, which KubeRay rolls out as a new
cluster (upgradeStrategy NewCluster); in-place Serve settings are left out on purpose.
Call with (dict "root" $ "serve" bool).
*/}}
{{- define "chatreid.rayChecksum" -}}
{{- $root := .root }}
{{- include "chatreid.configChecksum" $root }}
{{- if .serve }}
{{- $serve := include "chatreid.serveConfigData" $root | fromYaml }}
{{- range splitList " " (include "chatreid.serveInPlaceKeys" $root) }}
{{- $_ := unset $serve . }}
{{- end }}
checksum/serve: {{ toYaml $serve | sha256sum }}
{{- end }}
{{- end }}

{{/*
A name KubeRay accepts for a RayService/RayJob: a DNS-1035 label of at most 47 characters
(KubeRay appends 6 to name the RayCluster, itself at most 53).
*/}}
{{- define "chatreid.rayName" -}}
{{- if or (gt (len .) 47) (not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" .)) }}
{{- fail (printf "%q is not a valid KubeRay object name (a DNS-1035 label of at most 47 characters): shorten it with fullnameOverride" .) }}
{{- end }}
{{- . }}
{{- end }}

{{/*
Health probe of a Ray container, in Python (the image has no wget, which KubeRay's default
probes use): the raylet, plus the GCS on the head and the Serve proxy on Serve workers.
Call with (dict "head" bool "proxyPort" int-or-empty "agentPort" string).
*/}}
{{- define "chatreid.rayProbeExec" -}}
exec:
  command:
    - python
    - -c
    - "import sys, urllib.request; [urllib.request.urlopen(u, timeout=4).close() for u in sys.argv[1:]]"
    - http://127.0.0.1:{{ .agentPort }}/api/local_raylet_healthz
    {{- if .head }}
    - http://127.0.0.1:8265/api/gcs_healthz
    {{- end }}
    {{- with .proxyPort }}
    - http://127.0.0.1:{{ . }}/-/healthz
    {{- end }}
{{- end }}

{{/*
Pod template of a Ray node (head or worker group) for a RayService or RayJob. Call with dict:
  root, component ("retrieval"|"training"), kind ("head"|"worker"), group (the values of the
  head or worker group: resources, rayStartParams, shmSize, nodeSelector, tolerations,
  affinity), variant ("cpu"|"cuda"), serve (bool: a retrieval pod), autoscaler (bool: the head
  runs KubeRay's autoscaler sidecar), extraEnv (list of name/value), podAnnotations.
KubeRay replaces the container's command with `ray start ...` (the chatreid ENTRYPOINT does
not matter here), adds the worker's wait-for-GCS init container and, with autoscaling, the
autoscaler sidecar. The restart policy stays unset (autoscaler v2 needs Never or unset).
*/}}
{{- define "chatreid.rayPodTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $group := .group }}
{{- $isHead := eq .kind "head" }}
{{- $agentPort := default "52365" (index ($group.rayStartParams | default dict) "dashboard-agent-listen-port") -}}
metadata:
  labels:
    {{- include "chatreid.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
  annotations:
    {{- include "chatreid.rayChecksum" (dict "root" $root "serve" .serve) | nindent 4 }}
    {{- with .podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- if and $isHead .autoscaler }}
  # The autoscaler sidecar scales the RayCluster through the Kubernetes API: it needs a token,
  # of the ServiceAccount (and Role) KubeRay creates for this cluster.
  automountServiceAccountToken: true
  {{- else }}
  serviceAccountName: {{ include "chatreid.serviceAccountName" $root }}
  automountServiceAccountToken: {{ $v.serviceAccount.automount }}
  {{- end }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  containers:
    - name: ray-{{ .kind }}
      image: {{ include "chatreid.image" (dict "root" $root "variant" .variant) }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- include "chatreid.env" (dict "root" $root "serve" .serve "ray" true "extraEnv" .extraEnv) | nindent 6 }}
      {{- if or $isHead .serve }}
      ports:
        {{- if $isHead }}
        - name: gcs-server
          containerPort: 6379
          protocol: TCP
        - name: dashboard
          containerPort: 8265
          protocol: TCP
        {{- end }}
        {{- if .serve }}
        - name: serve
          containerPort: {{ int $v.retrieval.port }}
          protocol: TCP
        {{- end }}
      {{- end }}
      {{- $serveWorker := and .serve (not $isHead) }}
      readinessProbe:
        {{- include "chatreid.rayProbeExec" (dict "head" $isHead "agentPort" $agentPort "proxyPort" (and $serveWorker (int $v.retrieval.port))) | nindent 8 }}
        initialDelaySeconds: 10
        periodSeconds: 5
        timeoutSeconds: 5
        # A Serve worker leaves the serve Service at its proxy's first failed check (a draining
        # proxy), as with KubeRay's own probe; other nodes get some slack.
        failureThreshold: {{ if $serveWorker }}1{{ else }}10{{ end }}
      livenessProbe:
        {{- include "chatreid.rayProbeExec" (dict "head" $isHead "agentPort" $agentPort "proxyPort" "") | nindent 8 }}
        initialDelaySeconds: 30
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 30
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      resources:
        {{- toYaml $group.resources | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: shm
          mountPath: /dev/shm
  volumes:
    - name: tmp
      emptyDir: {}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $group.shmSize }}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
rayStartParams as KubeRay wants them: a map of strings.
*/}}
{{- define "chatreid.rayStartParams" -}}
{{- $out := dict }}
{{- range $k, $val := . }}
{{- $_ := set $out $k (toString $val) }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/*
rayStartParams of the `prefilter` worker group: its values plus `resources`, one unit of the
shard resource per pod, in the form KubeRay documents (a JSON map inside literal quotes,
backslashes included: "{\"prefilter_shard\": 1}").
*/}}
{{- define "chatreid.prefilterStartParams" -}}
{{- $w := .Values.retrieval.prefilterWorkers }}
{{- $params := deepCopy ($w.rayStartParams | default dict) }}
{{- $_ := set $params "resources" (printf `"{\"%s\": 1}"` (toString $w.rayResource)) }}
{{- include "chatreid.rayStartParams" $params }}
{{- end }}

{{/*
PodDisruptionBudget spec fields from (dict "pdb" <values> "where" "<values path>"): exactly
one of minAvailable / maxUnavailable.
*/}}
{{- define "chatreid.pdbBudget" -}}
{{- $min := .pdb.minAvailable }}
{{- $max := .pdb.maxUnavailable }}
{{- $hasMin := not (or (kindIs "invalid" $min) (eq (toString $min) "")) }}
{{- $hasMax := not (or (kindIs "invalid" $max) (eq (toString $max) "")) }}
{{- if eq $hasMin $hasMax }}
{{- fail (printf "%s.pdb: set exactly one of minAvailable and maxUnavailable" .where) }}
{{- end }}
{{- if $hasMin -}}
minAvailable: {{ if kindIs "string" $min }}{{ $min | quote }}{{ else }}{{ int $min }}{{ end }}
{{- else -}}
maxUnavailable: {{ if kindIs "string" $max }}{{ $max | quote }}{{ else }}{{ int $max }}{{ end }}
{{- end }}
{{- end }}

{{/* "true" when the embedder runs scaled out (workers + a separate snapshot replica). */}}
{{- define "chatreid.embedderScaled" -}}
{{- if or .Values.embedder.autoscaling.enabled (gt (int .Values.embedder.replicas) 1) }}true{{ end }}
{{- end }}

{{/*
Checks on combinations of values; included by configmap.yaml so every render runs them.
*/}}
{{- define "chatreid.validate" -}}
{{- $v := .Values }}
{{- $partitions := int $v.kafka.partitions }}
{{- range $name := list "ingestor" "embedder" }}
{{- $c := index $v $name }}
{{- if and $c.enabled $c.autoscaling.enabled }}
{{- if gt (int $c.autoscaling.minReplicas) (int $c.autoscaling.maxReplicas) }}
{{- fail (printf "%s.autoscaling: minReplicas (%d) is above maxReplicas (%d)" $name (int $c.autoscaling.minReplicas) (int $c.autoscaling.maxReplicas)) }}
{{- end }}
{{- if lt (int $c.autoscaling.minReplicas) 1 }}
{{- fail (printf "%s.autoscaling.minReplicas must be at least 1" $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- if $v.embedder.enabled }}
{{- $e := $v.embedder }}
{{- $workers := int $e.replicas }}
{{- $what := printf "embedder.replicas=%d" $workers }}
{{- if $e.autoscaling.enabled }}
{{- $workers = int $e.autoscaling.maxReplicas }}
{{- $what = printf "embedder.autoscaling.maxReplicas=%d" $workers }}
{{- end }}
{{- $consumers := $workers }}
{{- if include "chatreid.embedderScaled" . }}
{{- $consumers = add1 $workers }}
{{- $what = printf "%s workers + 1 snapshot replica" $what }}
{{- end }}
{{- if gt $consumers $partitions }}
{{- fail (printf "embedder: %d consumers (%s) exceed kafka.partitions=%d; consumers beyond the partition count sit idle. Lower the replicas or raise kafka.partitions (for existing topics, add partitions in Kafka first)" $consumers $what $partitions) }}
{{- end }}
{{- end }}
{{- if le (float64 $v.retention.cropDays) 0.0 }}
{{- fail "retention.cropDays must be a positive number of days (to keep crops longer, raise it or set retention.enabled=false)" }}
{{- end }}
{{- if $v.kafka.sasl.enabled }}
{{- $s := $v.kafka.sasl }}
{{- if not (has $s.securityProtocol (list "SASL_SSL" "SASL_PLAINTEXT")) }}
{{- fail (printf "kafka.sasl.securityProtocol must be SASL_SSL or SASL_PLAINTEXT, got %q" $s.securityProtocol) }}
{{- end }}
{{- if not (has $s.mechanism (list "PLAIN" "SCRAM-SHA-256" "SCRAM-SHA-512")) }}
{{- fail (printf "kafka.sasl.mechanism must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512, got %q" $s.mechanism) }}
{{- end }}
{{- if not $s.existingSecret }}
{{- if not (and $s.usernameKey $s.passwordKey) }}
{{- fail "kafka.sasl.usernameKey and passwordKey must be set (they are keys of the chart's Secret)" }}
{{- end }}
{{- end }}
{{- if not $s.passwordKey }}
{{- fail "kafka.sasl.passwordKey must be set" }}
{{- end }}
{{- end }}
{{- if $v.retrieval.enabled }}
{{- $r := $v.retrieval }}
{{- $_ := include "chatreid.rayName" (printf "%s-retrieval" (include "chatreid.fullname" .)) }}
{{- if not (has $r.upgradeStrategy (list "NewCluster" "None")) }}
{{- fail (printf "retrieval.upgradeStrategy must be NewCluster or None, got %q" $r.upgradeStrategy) }}
{{- end }}
{{- if and (gt (float64 $r.rerankNumGpus) 0.0) (not $r.gpuWorkers.enabled) }}
{{- fail "retrieval.rerankNumGpus > 0 needs retrieval.gpuWorkers.enabled (see values-gpu.yaml): no Rerank replica would find a GPU" }}
{{- end }}
{{- if and $r.rerankAutoscaling.enabled (gt (int $r.rerankAutoscaling.minReplicas) (int $r.rerankAutoscaling.maxReplicas)) }}
{{- fail "retrieval.rerankAutoscaling: minReplicas is above maxReplicas" }}
{{- end }}
{{- $shards := int $r.prefilterShards }}
{{- if or (lt $shards 1) (gt $shards 64) }}
{{- fail (printf "retrieval.prefilterShards must be between 1 and 64, got %d" $shards) }}
{{- end }}
{{- if gt $shards $partitions }}
{{- fail (printf "retrieval.prefilterShards=%d exceeds kafka.partitions=%d: shard i follows the indexed topic's partitions p with p mod shards = i, so some shards would own none. Lower it, or raise kafka.partitions before `chatreid init` creates the topics (never add partitions to an existing indexed topic of a sharded tier: cameras would move between shards; docs/scale.md)" $shards $partitions) }}
{{- end }}
{{- if and (gt $shards 1) (not (regexMatch "^[A-Za-z0-9_]+$" (toString $r.prefilterWorkers.rayResource))) }}
{{- fail (printf "retrieval.prefilterWorkers.rayResource must be a Ray resource name (letters, digits, underscores), got %q" (toString $r.prefilterWorkers.rayResource)) }}
{{- end }}
{{- range $group := list "cpuWorkers" "gpuWorkers" }}
{{- $g := index $r $group }}
{{- if or (eq $group "cpuWorkers") $g.enabled }}
{{- if not (and (le (int $g.minReplicas) (int $g.replicas)) (le (int $g.replicas) (int $g.maxReplicas))) }}
{{- fail (printf "retrieval.%s: need minReplicas <= replicas <= maxReplicas, got %d, %d, %d" $group (int $g.minReplicas) (int $g.replicas) (int $g.maxReplicas)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- if $v.training.enabled }}
{{- $t := $v.training }}
{{- if and $t.gpu (not $t.gpuWorkers.enabled) }}
{{- fail "training.gpu needs training.gpuWorkers.enabled (see values-gpu.yaml)" }}
{{- end }}
{{- if le (int $t.activeDeadlineSeconds) 0 }}
{{- fail "training.activeDeadlineSeconds must be positive" }}
{{- end }}
{{- range $name, $job := $t.jobs }}
{{- if $job.enabled }}
{{- if not (has (toString $job.stage) (list "embedder" "1" "2" "3" "all")) }}
{{- fail (printf "training.jobs.%s.stage must be embedder, 1, 2, 3 or all, got %q" $name (toString $job.stage)) }}
{{- end }}
{{- if and $job.suspend (not $t.shutdownAfterJobFinishes) }}
{{- fail (printf "training.jobs.%s.suspend needs training.shutdownAfterJobFinishes (KubeRay refuses to suspend a RayJob that keeps its cluster)" $name) }}
{{- end }}
{{- $_ := include "chatreid.rayName" (include "chatreid.trainJobName" (dict "root" $ "name" $name)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of the RayJob for training.jobs.<name>: (dict "root" $ "name" name). */}}
{{- define "chatreid.trainJobName" -}}
{{- $base := printf "%s-train-%s" (include "chatreid.fullname" .root) .name }}
{{- with .root.Values.training.runId }}
{{- $base = printf "%s-%s" $base (toString .) }}
{{- end }}
{{- $base }}
{{- end }}
