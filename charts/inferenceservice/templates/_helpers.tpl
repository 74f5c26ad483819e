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

{{/*
Label keys the operator puts on the pods and Services it creates (splitserve/protocol/labels.py).
The monitors select by these, so they must stay equal: tests/operator/test_monitoring.py
compares the rendered selectors with the operator's builders.
*/}}
{{- define "inferenceservice.instanceLabel" -}}serving.splitserve.io/inferenceservice{{- end -}}
{{- define "inferenceservice.roleLabel" -}}serving.splitserve.io/role{{- end -}}
{{- define "inferenceservice.rolloutHashLabel" -}}serving.splitserve.io/rollout-hash{{- end -}}

{{/* Prometheus' name for a pod label in service discovery (non-alphanumerics become _). */}}
{{- define "inferenceservice.podLabelMeta" -}}
{{- printf "__meta_kubernetes_pod_label_%s" (regexReplaceAll "[^a-zA-Z0-9_]" . "_") -}}
{{- end -}}

{{/*
The selector of a monitor: this InferenceService's engine and router objects. Only the
instance and role labels: they never change during a rollout (model and hash labels do).
*/}}
{{- define "inferenceservice.monitorSelector" -}}
matchLabels:
  {{ include "inferenceservice.instanceLabel" . }}: {{ include "inferenceservice.name" . }}
matchExpressions:
  - key: {{ include "inferenceservice.roleLabel" . }}
    operator: In
    values: [prefill, decode, router]
{{- end -}}

{{/*
Target labels every scraped series gets: the InferenceService and, on engines, the generation
(rollout hash). The router and KV-transfer metrics carry no model_name, so the dashboard scopes
them by `inferenceservice`. No `role` or `pod` label is added: engine and router metrics carry
their own `role`, and a target label of the same name would rename theirs to exported_role.
*/}}
{{- define "inferenceservice.targetRelabelings" -}}
- action: replace
  sourceLabels: [{{ include "inferenceservice.podLabelMeta" (include "inferenceservice.instanceLabel" .) }}]
  targetLabel: inferenceservice
- action: replace
  sourceLabels: [{{ include "inferenceservice.podLabelMeta" (include "inferenceservice.rolloutHashLabel" .) }}]
  targetLabel: rollout_hash
{{- end -}}

{{/*
The scrape endpoints of a monitor, given (dict "root" $ "config" <monitor values>).
Engines serve /metrics on their port named `metrics`; the router on its port named `http`.
The router's endpoint honours its own labels: splitserve_router_routed{pod} names the engine pod
a sample went to, which the target's own `pod` label would otherwise rename to exported_pod.
*/}}
{{- define "inferenceservice.scrapeEndpoints" -}}
{{- $config := .config -}}
{{- range $endpoint := list (dict "port" "metrics" "honor" false) (dict "port" "http" "honor" true) }}
- port: {{ $endpoint.port }}
  path: /metrics
  {{- with $config.interval }}
  interval: {{ . }}
  {{- end }}
  {{- with $config.scrapeTimeout }}
  scrapeTimeout: {{ . }}
  {{- end }}
  honorLabels: {{ $endpoint.honor }}
  relabelings:
    {{- include "inferenceservice.targetRelabelings" $.root | nindent 4 }}
{{- end }}
{{- end -}}

{{/* Metadata labels of a monitoring object: the chart's plus the given extra ones. */}}
{{- define "inferenceservice.monitoringLabels" -}}
{{- $chart := include "inferenceservice.labels" .root | fromYaml -}}
{{- toYaml (merge (deepCopy (.extra | default dict)) $chart) -}}
{{- end -}}

{{/*
An external autoscaler writes spec.decode.replicas (the scale subresource): the operator must
leave decode's size to it (decode.autoscaling.external), or both would set it.
*/}}
{{- define "inferenceservice.requireExternalDecode" -}}
{{- $a := .Values.decode.autoscaling | default dict -}}
{{- if not $a.external -}}
{{- fail "externalAutoscaler needs decode.autoscaling.external: true (with its minReplicas and maxReplicas): the operator's autoscaler and an external one must not both size decode" -}}
{{- end -}}
{{- end -}}

{{/* What HPA and KEDA scale: this InferenceService, through its scale subresource (decode). */}}
{{- define "inferenceservice.scaleTargetRef" -}}
apiVersion: serving.splitserve.io/v1alpha1
kind: InferenceService
name: {{ include "inferenceservice.name" . }}
{{- end -}}
