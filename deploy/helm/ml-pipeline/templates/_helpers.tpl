{{/* Names, labels and the pieces every workload shares. */}}

{{- define "ml-pipeline.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ml-pipeline.brokerName" -}}
{{- default (printf "%s-rabbitmq" .Release.Name | trunc 50 | trimSuffix "-") .Values.broker.cluster.name -}}
{{- end -}}

{{- define "ml-pipeline.adminTokenSecret" -}}
{{- default (printf "%s-trainer-token" (include "ml-pipeline.fullname" .)) .Values.trainer.adminToken.existingSecret -}}
{{- end -}}

{{/* Labels of one component: `include "ml-pipeline.labels" (list . "metric")`. */}}
{{- define "ml-pipeline.labels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: ml-pipeline
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
app.kubernetes.io/part-of: ml-pipeline
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version }}
{{- end -}}

{{- define "ml-pipeline.selector" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: ml-pipeline
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* The broker and stream settings of every workload. */}}
{{- define "ml-pipeline.commonEnv" -}}
{{- $v := .Values -}}
{{- if $v.broker.cluster.enabled }}
- name: AMQP_URL
  value: {{ printf "%s://%s.%s.svc:%s/%%2f" (ternary "amqps" "amqp" $v.broker.tls.enabled) (include "ml-pipeline.brokerName" .) .Release.Namespace (ternary "5671" "5672" $v.broker.tls.enabled) | quote }}
- name: AMQP_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ include "ml-pipeline.brokerName" . }}-default-user
      key: username
- name: AMQP_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "ml-pipeline.brokerName" . }}-default-user
      key: password
{{- else }}
- name: AMQP_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "broker.existingSecret is required when broker.cluster.enabled is false" $v.broker.existingSecret }}
      key: {{ $v.broker.existingSecretKey }}
{{- end }}
{{- if $v.broker.tls.caSecret }}
- name: AMQP_CA_FILE
  value: /etc/ml-pipeline/broker-ca/ca.crt
{{- end }}
- name: QUEUE_TYPE
  value: {{ $v.common.queueType | quote }}
- name: PARTITIONS
  value: {{ $v.partitions | quote }}
- name: FEATURES_QUEUE
  value: {{ $v.common.queues.features | quote }}
- name: Y_TRUE_QUEUE
  value: {{ $v.common.queues.yTrue | quote }}
- name: Y_PRED_QUEUE
  value: {{ $v.common.queues.yPred | quote }}
- name: LOG_FORMAT
  value: {{ $v.common.logFormat | quote }}
- name: RUST_LOG
  value: {{ $v.common.rustLog | quote }}
{{- range $name, $value := $v.common.extraEnv }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{/* DATA_PATH (and TARGET_COLUMN) for features, model and trainer. */}}
{{- define "ml-pipeline.dataEnv" -}}
- name: DATA_PATH
  value: {{ ternary (printf "/etc/ml-pipeline/data/%s" .Values.data.key) "/app/data/diabetes.csv" (ne .Values.data.configMap "") | quote }}
{{- if .Values.data.targetColumn }}
- name: TARGET_COLUMN
  value: {{ .Values.data.targetColumn | quote }}
{{- end }}
{{- end -}}

{{/* A workload's own `env` map. */}}
{{- define "ml-pipeline.extraEnv" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{- define "ml-pipeline.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.broker.tls.caSecret }}
- name: broker-ca
  mountPath: /etc/ml-pipeline/broker-ca
  readOnly: true
{{- end }}
{{- end -}}

{{- define "ml-pipeline.dataMount" -}}
{{- if .Values.data.configMap }}
- name: data
  mountPath: /etc/ml-pipeline/data
  readOnly: true
{{- end }}
{{- end -}}

{{- define "ml-pipeline.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if .Values.broker.tls.caSecret }}
- name: broker-ca
  secret:
    secretName: {{ .Values.broker.tls.caSecret }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- if .Values.data.configMap }}
- name: data
  configMap:
    name: {{ .Values.data.configMap }}
{{- end }}
{{- end -}}

{{- define "ml-pipeline.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* Readiness and liveness on /healthz of the named port. */}}
{{- define "ml-pipeline.probes" -}}
readinessProbe:
  httpGet:
    path: /healthz
    port: http
  periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
  failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
  timeoutSeconds: 3
livenessProbe:
  httpGet:
    path: /healthz
    port: http
  initialDelaySeconds: {{ .Values.probes.liveness.initialDelaySeconds }}
  periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
  failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
  timeoutSeconds: 5
{{- end -}}

{{/* Pod-level settings every workload shares. */}}
{{- define "ml-pipeline.podSpec" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "ml-pipeline.image" -}}
image: {{ printf "%s:%s" .Values.image.repository .Values.image.tag | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
{{- end -}}
