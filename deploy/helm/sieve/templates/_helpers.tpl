{{/* Names and labels. */}}
{{- define "sieve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sieve.fullname" -}}
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

{{- define "sieve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sieve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sieve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "sieve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sieve
{{- end }}

{{- define "sieve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sieve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image: the CPU build, or the CUDA build (tag + cudaTagSuffix) when "gpu" is true. */}}
{{- define "sieve.image" -}}
{{- $tag := default .root.Chart.AppVersion .root.Values.image.tag }}
{{- if .gpu }}{{ $tag = printf "%s%s" $tag .root.Values.image.cudaTagSuffix }}{{ end }}
{{- printf "%s:%s" .root.Values.image.repository $tag }}
{{- end }}

{{/* Topology and route-set files: the shipped ones, overridden or extended by values. */}}
{{- define "sieve.topologyFiles" -}}
{{- $files := dict }}
{{- range $path, $_ := .Files.Glob "files/topologies/*.yaml" }}
{{- $_ := set $files (base $path) ($.Files.Get $path) }}
{{- end }}
{{- range $name, $text := .Values.topologies }}
{{- $_ := set $files $name $text }}
{{- end }}
{{- toJson $files }}
{{- end }}

{{/* The list files beside the shipped route sets (routes/lists/*.yaml), by file name. */}}
{{- define "sieve.listFiles" -}}
{{- $files := dict }}
{{- range $path, $_ := .Files.Glob "files/routes/lists/*.yaml" }}
{{- $_ := set $files (base $path) ($.Files.Get $path) }}
{{- end }}
{{- toJson $files }}
{{- end }}

{{- define "sieve.routeFiles" -}}
{{- $files := dict }}
{{- range $path, $_ := .Files.Glob "files/routes/*.yaml" }}
{{- $_ := set $files (base $path) ($.Files.Get $path) }}
{{- end }}
{{- range $name, $text := .Values.routeSets }}
{{- $_ := set $files $name $text }}
{{- end }}
{{- toJson $files }}
{{- end }}

{{/* The selected topology, parsed: `include "sieve.topology" . | fromJson`. */}}
{{- define "sieve.topology" -}}
{{- $files := include "sieve.topologyFiles" . | fromJson }}
{{- if not (hasKey $files .Values.topology) }}
{{- fail (printf "topology %q is neither in files/topologies nor in .Values.topologies (have: %s)" .Values.topology (keys $files | sortAlpha | join ", ")) }}
{{- end }}
{{- $topology := index $files .Values.topology | fromYaml }}
{{- if hasKey $topology "Error" }}
{{- fail (printf "topology %q is not valid YAML: %s" .Values.topology $topology.Error) }}
{{- end }}
{{- toJson $topology }}
{{- end }}

{{- define "sieve.partitions" -}}
{{- $topology := include "sieve.topology" . | fromJson }}
{{- $input := default dict $topology.input }}
{{- default 4 $input.partitions | int }}
{{- end }}

{{- define "sieve.consumerGroup" -}}
{{- $topology := include "sieve.topology" . | fromJson }}
{{- default (printf "sieve-%s" $topology.name) $topology.group_id }}
{{- end }}

{{/* The routers' replica ceiling: autoscaling.maxReplicas, or the partition count; never above it. */}}
{{- define "sieve.maxReplicas" -}}
{{- $partitions := include "sieve.partitions" . | int }}
{{- $max := .Values.autoscaling.maxReplicas | int }}
{{- if eq $max 0 }}{{ $max = $partitions }}{{ end }}
{{- if gt $max $partitions }}
{{- fail (printf "autoscaling.maxReplicas (%d) is above the input partition count (%d) of topology %q: routers beyond it would sit idle. Raise input.partitions in the topology (and on the topic) first." $max $partitions .Values.topology) }}
{{- end }}
{{- if gt (.Values.autoscaling.minReplicas | int) $max }}
{{- fail (printf "autoscaling.minReplicas (%d) is above maxReplicas (%d)" (.Values.autoscaling.minReplicas | int) $max) }}
{{- end }}
{{- $max }}
{{- end }}

{{/* Environment shared by every Sieve container. */}}
{{- define "sieve.env" -}}
- name: SIEVE_KAFKA__BOOTSTRAP_SERVERS
  value: {{ .Values.kafka.bootstrapServers | quote }}
- name: SIEVE_KAFKA__SECURITY_PROTOCOL
  value: {{ .Values.kafka.securityProtocol | quote }}
{{- if .Values.kafka.saslMechanism }}
- name: SIEVE_KAFKA__SASL_MECHANISM
  value: {{ .Values.kafka.saslMechanism | quote }}
{{- end }}
{{- with .Values.kafka.sasl.existingSecret }}
- name: SIEVE_KAFKA__SASL_USERNAME
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $.Values.kafka.sasl.usernameKey | quote }}}
- name: SIEVE_KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $.Values.kafka.sasl.passwordKey | quote }}}
{{- end }}
{{- if .Values.kafka.tls.existingSecret }}
- name: SIEVE_KAFKA__SSL_CAFILE
  value: /etc/sieve/kafka-tls/{{ .Values.kafka.tls.caKey }}
{{- if .Values.kafka.tls.certKey }}
- name: SIEVE_KAFKA__SSL_CERTFILE
  value: /etc/sieve/kafka-tls/{{ .Values.kafka.tls.certKey }}
{{- end }}
{{- if .Values.kafka.tls.keyKey }}
- name: SIEVE_KAFKA__SSL_KEYFILE
  value: /etc/sieve/kafka-tls/{{ .Values.kafka.tls.keyKey }}
{{- end }}
{{- end }}
- name: SIEVE_QDRANT__URL
  value: {{ .Values.qdrant.url | quote }}
{{- with .Values.qdrant.apiKey.existingSecret }}
- name: SIEVE_QDRANT__API_KEY
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $.Values.qdrant.apiKey.key | quote }}}
{{- end }}
- name: SIEVE_METRICS_PORT
  value: {{ .Values.metrics.port | quote }}
- name: SIEVE_HEALTH__STALL_S
  value: {{ .Values.health.stallSeconds | quote }}
- name: SIEVE_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: SIEVE_WORKER_NAME
  valueFrom:
    fieldRef: {fieldPath: metadata.name}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volumes shared by every Sieve pod: topologies, route sets, a writable /tmp, Kafka TLS. */}}
{{- define "sieve.volumes" -}}
- name: topologies
  configMap: {name: {{ include "sieve.fullname" . }}-topologies}
- name: routes
  configMap:
    name: {{ include "sieve.fullname" . }}-routes
    items:
      {{- range $name, $_ := include "sieve.routeFiles" . | fromJson }}
      - {key: {{ $name | quote }}, path: {{ $name | quote }}}
      {{- end }}
      {{- range $name, $_ := include "sieve.listFiles" . | fromJson }}
      - {key: {{ printf "list.%s" $name | quote }}, path: {{ printf "lists/%s" $name | quote }}}
      {{- end }}
- name: tmp
  emptyDir: {}
{{- with .Values.kafka.tls.existingSecret }}
- name: kafka-tls
  secret: {secretName: {{ . | quote }}}
{{- end }}
{{- end }}

{{- define "sieve.volumeMounts" -}}
- {name: topologies, mountPath: /app/topologies, readOnly: true}
- {name: routes, mountPath: /app/routes, readOnly: true}
- {name: tmp, mountPath: /tmp}
{{- if .Values.kafka.tls.existingSecret }}
- {name: kafka-tls, mountPath: /etc/sieve/kafka-tls, readOnly: true}
{{- end }}
{{- end }}

{{/* Probes on the worker's own endpoints (workers/sieve/health.py). */}}
{{- define "sieve.probes" -}}
startupProbe:
  httpGet: {path: /healthz, port: metrics}
  {{- toYaml .Values.probes.startup | nindent 2 }}
livenessProbe:
  httpGet: {path: /healthz, port: metrics}
  {{- toYaml .Values.probes.liveness | nindent 2 }}
readinessProbe:
  httpGet: {path: /readyz, port: metrics}
  {{- toYaml .Values.probes.readiness | nindent 2 }}
{{- end }}

{{/* The reviewer's input (the needs-review topic), consumer group and partition count. */}}
{{- define "sieve.review" -}}
{{- $topology := include "sieve.topology" . | fromJson }}
{{- $review := default dict $topology.review }}
{{- $output := default dict $topology.output }}
{{- $topics := default dict $output.outcome_topics }}
{{- $topic := $review.input_topic }}
{{- if not $topic }}{{ $topic = $topics.needs_review }}{{ end }}
{{- if and (not $topic) $output.outcome_topic_template }}
{{- $topic = replace "{outcome}" "needs-review" $output.outcome_topic_template }}
{{- end }}
{{- if not $topic }}{{ $topic = "sieve.needs-review" }}{{ end }}
{{- $group := default (printf "%s-review" (include "sieve.consumerGroup" .)) $review.group_id }}
{{- toJson (dict "topic" $topic "group" $group "partitions" (default 4 $output.partitions | int)) }}
{{- end }}
