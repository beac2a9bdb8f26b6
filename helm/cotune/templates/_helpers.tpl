{{/* Names, labels and the shared pod/container security settings of the cotune chart. */}}

{{- define "cotune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cotune.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Names of the parts (kept short: KubeRay appends suffixes such as -head-svc). */}}
{{- define "cotune.coordinator" -}}{{ include "cotune.fullname" . | trunc 50 }}-coordinator{{- end -}}
{{- define "cotune.redis" -}}{{ include "cotune.fullname" . | trunc 56 }}-redis{{- end -}}
{{- define "cotune.ray" -}}{{ include "cotune.fullname" . | trunc 40 }}-ray{{- end -}}
{{- define "cotune.secret" -}}{{ include "cotune.fullname" . | trunc 56 }}-auth{{- end -}}
{{- define "cotune.s3secret" -}}{{ include "cotune.fullname" . | trunc 59 }}-s3{{- end -}}

{{- define "cotune.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 }}
app.kubernetes.io/name: {{ include "cotune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cotune
{{- end -}}

{{/* Selector labels of one component: `include "cotune.selector" (list . "coordinator")`. */}}
{{- define "cotune.selector" -}}
app.kubernetes.io/name: {{ include "cotune.name" (index . 0) }}
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* Every pod of the release carries this label: the NetworkPolicies admit "inside the
release" by it. */}}
{{- define "cotune.releaseSelector" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: cotune
{{- end -}}

{{/* repository:tag, or repository:tag@digest when a digest pins the exact image. */}}
{{- define "cotune.image" -}}
{{- $image := index . 0 -}}{{- $root := index . 1 -}}
{{- $ref := printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- if $image.digest -}}{{- $ref = printf "%s@%s" $ref $image.digest -}}{{- end -}}
{{- $ref -}}
{{- end -}}

{{/* Non-root pods as uid and gid `.`: 10001 is the coordinator image's user. */}}
{{- define "cotune.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
fsGroup: {{ . }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The worker image's user: ray, uid 1000 in group users (100), as in Ray's own images. */}}
{{- define "cotune.raySecurity" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 100
fsGroup: 100
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "cotune.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Where Redis is: host:port (for Ray's GCS), the URL cotune uses (its password comes in
through $(REDIS_PASSWORD)), and the password's Secret and key (empty: none). */}}
{{- define "cotune.redisHostPort" -}}
{{- if .Values.redis.enabled -}}
{{ include "cotune.redis" . }}:6379
{{- else -}}
{{ (urlParse (required "externalRedis.url is required when redis.enabled is false" .Values.externalRedis.url)).host }}
{{- end -}}
{{- end -}}

{{- define "cotune.redisPasswordSecret" -}}
{{- if .Values.redis.enabled -}}
{{ default (include "cotune.secret" .) .Values.redis.existingSecret }}
{{- else -}}
{{ .Values.externalRedis.existingSecret }}
{{- end -}}
{{- end -}}

{{- define "cotune.redisPasswordKey" -}}
{{- if .Values.redis.enabled -}}
{{ .Values.redis.existingSecretPasswordKey }}
{{- else -}}
{{ .Values.externalRedis.existingSecretPasswordKey }}
{{- end -}}
{{- end -}}

{{/* The Redis URL cotune uses, without the password (it comes from a file). */}}
{{- define "cotune.redisUrl" -}}
{{- if .Values.redis.enabled -}}
redis://{{ include "cotune.redis" . }}:6379/0
{{- else -}}
{{ required "externalRedis.url is required when redis.enabled is false" .Values.externalRedis.url }}
{{- end -}}
{{- end -}}

{{/* The S3 keys' Secret; empty when none is given (boto3's own chain: IRSA, instance roles). */}}
{{- define "cotune.s3SecretName" -}}
{{- if .Values.s3.existingSecret -}}
{{ .Values.s3.existingSecret }}
{{- else if or .Values.s3.accessKeyId .Values.s3.secretAccessKey -}}
{{ include "cotune.s3secret" . }}
{{- end -}}
{{- end -}}

{{/* The coordinator's settings. Secrets arrive as files of one projected volume
(COTUNE_<NAME>_FILE, orchestrator/settings.py), never as environment values. */}}
{{- define "cotune.secretsDir" -}}/run/secrets/cotune{{- end -}}

{{- define "cotune.coordinatorEnv" -}}
{{- $dir := include "cotune.secretsDir" . -}}
- name: COTUNE_HOME
  value: /var/lib/cotune
# Caches (Ray's client, Hugging Face) under the writable home, not the read-only root.
- name: HOME
  value: /var/lib/cotune/user
- name: COTUNE_REDIS_URL
  value: {{ include "cotune.redisUrl" . | quote }}
{{- if include "cotune.redisPasswordSecret" . }}
- name: COTUNE_REDIS_PASSWORD_FILE
  value: {{ $dir }}/redis-password
{{- end }}
- name: COTUNE_S3_ENDPOINT
  value: {{ required "s3.endpoint is required (your S3 store's URL)" .Values.s3.endpoint | quote }}
- name: COTUNE_S3_BUCKET
  value: {{ .Values.s3.bucket | quote }}
- name: COTUNE_S3_REGION
  value: {{ .Values.s3.region | quote }}
{{- if include "cotune.s3SecretName" . }}
- name: COTUNE_S3_ACCESS_KEY_FILE
  value: {{ $dir }}/s3-access-key-id
- name: COTUNE_S3_SECRET_KEY_FILE
  value: {{ $dir }}/s3-secret-access-key
{{- end }}
- name: COTUNE_ADMIN_TOKEN_FILE
  value: {{ $dir }}/admin-token
{{- if .Values.auth.createJoinToken }}
- name: COTUNE_JOIN_TOKEN_FILE
  value: {{ $dir }}/join-token
{{- end }}
{{- end -}}

{{- define "cotune.secretsVolume" -}}
- name: secrets
  projected:
    defaultMode: 0440
    sources:
      - secret:
          name: {{ include "cotune.authSecretName" . }}
          items:
            - {key: admin-token, path: admin-token}
            {{- if .Values.auth.createJoinToken }}
            - {key: join-token, path: join-token}
            {{- end }}
      {{- with include "cotune.s3SecretName" . }}
      - secret:
          name: {{ . }}
          items:
            - {key: access-key-id, path: s3-access-key-id}
            - {key: secret-access-key, path: s3-secret-access-key}
      {{- end }}
      {{- with include "cotune.redisPasswordSecret" . }}
      - secret:
          name: {{ . }}
          items:
            - {key: {{ include "cotune.redisPasswordKey" $ }}, path: redis-password}
      {{- end }}
{{- end -}}

{{/* The Ray pods' shared pieces: scratch volumes, their mounts, the environment. */}}
{{- define "cotune.rayVolumes" -}}
- name: home
  emptyDir: {}
- name: tmp
  emptyDir: {}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.rayCluster.shmSizeLimit }}
{{- end -}}
{{- define "cotune.rayMounts" -}}
# The coordinator's home path: cluster workers keep their work dirs and base-model cache here.
- name: home
  mountPath: /var/lib/cotune
# Ray's session files and logs (/tmp/ray).
- name: tmp
  mountPath: /tmp
- name: shm
  mountPath: /dev/shm
{{- end -}}
{{/* Ray pods hold no cotune secret: merges get their store access in each request,
cluster workers enroll over HTTP and move data through presigned URLs. */}}
{{- define "cotune.rayEnv" -}}
- name: COTUNE_HOME
  value: /var/lib/cotune
# Caches (Hugging Face, Triton, pip) under the writable home, not the read-only root.
- name: HOME
  value: /var/lib/cotune/user
{{- end -}}

{{/* Checks across values that the schema cannot express; included by coordinator.yaml. */}}
{{- define "cotune.checks" -}}
{{- $g := .Values.rayCluster.gpuWorkers -}}
{{- if gt (int $g.minReplicas) (int $g.maxReplicas) -}}
{{- fail (printf "rayCluster.gpuWorkers.minReplicas (%d) is above maxReplicas (%d)" (int $g.minReplicas) (int $g.maxReplicas)) -}}
{{- end -}}
{{- if or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas)) -}}
{{- fail (printf "rayCluster.gpuWorkers.replicas (%d) must lie in minReplicas..maxReplicas (%d..%d)" (int $g.replicas) (int $g.minReplicas) (int $g.maxReplicas)) -}}
{{- end -}}
{{- if and .Values.redis.enabled .Values.externalRedis.url -}}
{{- fail "externalRedis.url is set but redis.enabled is true: set redis.enabled=false to use your own Redis" -}}
{{- end -}}
{{- if and .Values.ingress.enabled (not .Values.ingress.tls.enabled) -}}
{{- fail "ingress.tls.enabled is false: volunteers send tokens to the API, so the Ingress serves HTTPS only" -}}
{{- end -}}
{{- end -}}

{{- define "cotune.authSecretName" -}}
{{ default (include "cotune.secret" .) .Values.auth.existingSecret }}
{{- end -}}
