{{/* Names and labels, the prometheus-community way. */}}
{{- define "eventaudit.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "eventaudit.fullname" -}}
{{- if contains (include "eventaudit.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "eventaudit.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "eventaudit.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ include "eventaudit.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: eventaudit
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "exporter") */}}
{{- define "eventaudit.selector" -}}
app.kubernetes.io/name: {{ include "eventaudit.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "eventaudit.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "eventaudit.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "eventaudit.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}

{{/* The environment every service reads (its settings are EVENTAUDIT_<NAME>). */}}
{{- define "eventaudit.env" -}}
- name: EVENTAUDIT_PROJECT
  value: {{ .ctx.Values.project | quote }}
- name: EVENTAUDIT_DATABASE
  value: {{ .ctx.Values.mongo.database | quote }}
- name: EVENTAUDIT_MONGO_URI
  valueFrom:
    secretKeyRef:
      name: {{ .ctx.Values.mongo.existingSecret }}
      key: {{ .ctx.Values.mongo.uriKey }}
- name: EVENTAUDIT_LISTEN_ADDRESS
  value: {{ printf "0.0.0.0:%v" .port | quote }}
{{- end -}}

{{/* The container's probes: /healthz, 503 while not serving. */}}
{{- define "eventaudit.probes" -}}
readinessProbe:
  httpGet: {path: /healthz, port: http}
  periodSeconds: 10
  failureThreshold: 3
livenessProbe:
  tcpSocket: {port: http}
  periodSeconds: 20
  failureThreshold: 6
{{- end -}}
