{{/* Names ------------------------------------------------------------------------------------ */}}
{{- define "rb.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rb.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "rb.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "rb.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "rb.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "rb.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "rb.secretName" -}}
{{- default (printf "%s-app" (include "rb.fullname" .)) .Values.secrets.name -}}
{{- end -}}

{{- define "rb.authKeysSecretName" -}}
{{- default (printf "%s-auth-keys" (include "rb.fullname" .)) .Values.authKeys.secretName -}}
{{- end -}}

{{/* Labels: common ones, and the selector of one component (api, worker, migrations, ...) ----- */}}
{{- define "rb.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "rb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: roomly-billing
{{- end -}}

{{- define "rb.selector" -}}
app.kubernetes.io/name: {{ include "rb.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Images, by digest unless image.requireDigest is off ---------------------------------------- */}}
{{- define "rb.image" -}}
{{- $repo := printf "%s/%s" .root.Values.image.registry .name -}}
{{- if .digest -}}
{{- if not (regexMatch "^sha256:[0-9a-f]{64}$" .digest) -}}
{{- fail (printf "image digest %q is not sha256:<64 hex digits>" .digest) -}}
{{- end -}}
{{- printf "%s@%s" $repo .digest -}}
{{- else if .root.Values.image.requireDigest -}}
{{- fail (printf "image.%s is required (image.requireDigest): deploy the digest build-image.yml printed" .key) -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .root.Chart.AppVersion .root.Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "rb.apiImage" -}}
{{- include "rb.image" (dict "root" . "name" .Values.image.api "digest" .Values.image.apiDigest "key" "apiDigest") -}}
{{- end -}}

{{- define "rb.workerImage" -}}
{{- include "rb.image" (dict "root" . "name" .Values.image.worker "digest" .Values.image.workerDigest "key" "workerDigest") -}}
{{- end -}}

{{/* The app's settings: config, the Secret's keys, the documents folder -------------------------- */}}
{{- define "rb.env" -}}
{{- range $name, $value := .Values.config }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- range .Values.secrets.keys }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "rb.secretName" $ }}
      key: {{ .name }}
      {{- if .optional }}
      optional: true
      {{- end }}
{{- end }}
- name: DATA_DIR
  value: /var/lib/roomly
{{- if .Values.documents.persistence.enabled }}
- name: DOCUMENTS_DIR
  value: {{ .Values.documents.mountPath | quote }}
{{- end }}
{{- end -}}

{{- define "rb.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end -}}

{{- define "rb.securityContext" -}}
{{- toYaml .Values.securityContext }}
{{- end -}}

{{/* Spread over zones (hard) and nodes (soft) when topologySpread.enabled; prefer other nodes. */}}
{{- define "rb.placement" -}}
{{- if .root.Values.topologySpread.enabled }}
topologySpreadConstraints:
  - maxSkew: {{ .root.Values.topologySpread.maxSkew }}
    topologyKey: {{ .root.Values.topologySpread.zoneKey }}
    whenUnsatisfiable: DoNotSchedule
    labelSelector:
      matchLabels:
        {{- include "rb.selector" . | nindent 8 }}
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "rb.selector" . | nindent 8 }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "rb.selector" . | nindent 14 }}
{{- end }}
{{- end -}}

{{/* A hook that must exist before the Jobs: a lower weight runs first. ------------------------- */}}
{{- define "rb.preHook" -}}
helm.sh/hook: pre-install,pre-upgrade
helm.sh/hook-weight: {{ . | quote }}
helm.sh/hook-delete-policy: before-hook-creation
{{- end -}}
