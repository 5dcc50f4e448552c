{{- define "loraplex.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "loraplex.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "loraplex.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end -}}

{{/* The Secret holding the API keys, or nothing when the server runs without keys. */}}
{{- define "loraplex.keysSecret" -}}
{{- if .Values.apiKeys.existingSecret -}}
{{- .Values.apiKeys.existingSecret -}}
{{- else if or .Values.apiKeys.keys .Values.apiKeys.adminKey .Values.apiKeys.scoped -}}
{{- printf "%s-keys" (include "loraplex.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* "true" when the keys Secret holds a keys file for --api-keys-file. */}}
{{- define "loraplex.scopedKeys" -}}
{{- if .Values.apiKeys.existingSecret -}}
{{- if .Values.apiKeys.scopedKeysInSecret }}true{{ end -}}
{{- else if .Values.apiKeys.scoped -}}
true
{{- end -}}
{{- end -}}

{{- define "loraplex.adaptersClaim" -}}
{{- .Values.adapters.pvc.existingClaim | default (printf "%s-adapters" (include "loraplex.fullname" .)) -}}
{{- end -}}

{{/* The aws-cli container that copies the S3 registry into /adapters (init container and sidecar). */}}
{{- define "loraplex.s3sync" -}}
image: {{ .root.Values.adapters.s3.image }}
command: ["/bin/sh", "-c"]
args:
  - |
    pull() { aws s3 sync "$ADAPTERS_URI" /adapters --delete --only-show-errors ${ENDPOINT_URL:+--endpoint-url "$ENDPOINT_URL"}; }
    # Once (init container: a failure keeps the pod from starting), or every SYNC_INTERVAL seconds (sidecar:
    # a failed round is retried). Each file lands whole (aws renames it into place); an adapter whose files are
    # still partly missing is refused by the server's checks until a later scan finds it complete.
    if [ "$SYNC_INTERVAL" -eq 0 ]; then pull; exit; fi
    while true; do
      sleep "$SYNC_INTERVAL"
      pull || echo "adapter sync failed; retrying in $SYNC_INTERVAL s" >&2
    done
env:
  - name: ADAPTERS_URI
    value: {{ required "adapters.s3.uri is required with adapters.source=s3" .root.Values.adapters.s3.uri | quote }}
  - name: ENDPOINT_URL
    value: {{ .root.Values.adapters.s3.endpointUrl | quote }}
  - name: SYNC_INTERVAL
    value: {{ .interval | quote }}
  - name: HOME
    value: /tmp
  {{- with .root.Values.adapters.s3.region }}
  - name: AWS_DEFAULT_REGION
    value: {{ . | quote }}
  {{- end }}
{{- with .root.Values.adapters.s3.credentialsSecret }}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
securityContext:
  runAsNonRoot: true
  runAsUser: 1000
  allowPrivilegeEscalation: false
volumeMounts:
  - name: adapters
    mountPath: /adapters
{{- end -}}

{{/* A value as environment-variable text: whole numbers as integers (values files give floats, which
     toString writes as 1.048576e+06). */}}
{{- define "loraplex.envText" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}
