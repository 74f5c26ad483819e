{{/* The InferenceService's name: .Values.name or the release name. */}}
{{- define "inferenceservice.name" -}}
{{- default .Release.Name .Values.name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "inferenceservice.labels" -}}
app.kubernetes.io/name: inferenceservice
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: splitserve
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* A pool (prefill, decode, router) without its empty optional fields. */}}
{{- define "inferenceservice.pool" -}}
{{- $pool := dict -}}
{{- range $key, $value := . -}}
{{- if or (kindIs "int" $value) (kindIs "int64" $value) (kindIs "float64" $value) (kindIs "bool" $value) $value -}}
{{- $_ := set $pool $key $value -}}
{{- end -}}
{{- end -}}
{{- toYaml $pool -}}
{{- end -}}
