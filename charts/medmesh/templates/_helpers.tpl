{{/* Base name of the operator's objects; the operator's defaults assume medmesh-operator. */}}
{{- define "medmesh.fullname" -}}
{{- .Values.fullnameOverride | default "medmesh-operator" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "medmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: stable for the life of a release (Deployment selectors are immutable). */}}
{{- define "medmesh.selectorLabels" -}}
app.kubernetes.io/name: medmesh-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "medmesh.labels" -}}
{{ include "medmesh.selectorLabels" . }}
app.kubernetes.io/part-of: medmesh
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "medmesh.chart" . }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "medmesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "medmesh.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/* repository:tag or repository@digest; an empty tag means the chart's appVersion. */}}
{{- define "medmesh.image" -}}
{{- $tag := .image.tag | default .root.Chart.AppVersion -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "medmesh.servingSecret" -}}
{{- printf "%s-serving" (include "medmesh.fullname" .) -}}
{{- end -}}

{{- define "medmesh.identityURL" -}}
{{- if .Values.identity.url -}}
{{- .Values.identity.url -}}
{{- else -}}
{{- /* The Service maps 443 to the pods' 8443; sidecars go through the Service. */ -}}
{{- printf "https://%s.%s.svc:443" (include "medmesh.fullname" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}
