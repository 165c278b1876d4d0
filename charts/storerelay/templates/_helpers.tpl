{{- define "storerelay.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "storerelay.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "storerelay.labels" -}}
app.kubernetes.io/name: {{ include "storerelay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "storerelay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "storerelay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "storerelay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "storerelay.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "storerelay.webhookService" -}}
{{- printf "%s-webhook" (include "storerelay.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "storerelay.webhookSecret" -}}
{{- printf "%s-webhook-tls" (include "storerelay.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* repository@digest, or repository:tag (default: appVersion). */}}
{{- define "storerelay.imageRef" -}}
{{- $image := index . 0 -}}{{- $root := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "storerelay.certManager" -}}
{{- eq .Values.webhook.certificates.mode "certManager" -}}
{{- end -}}
