{{/* NetworkPolicy rules shared by several components (see networkpolicy.yaml). Called with
     (dict "root" $ "sel" <selector labels by component> "etcdPorts" <list> "redisPort" <int>). */}}

{{- define "meshserve.np.etcdEgress" }}
{{- $root := .root }}
{{- if $root.Values.etcd.bundled }}
    - to:
        - podSelector:
            matchLabels:
              {{- .sel.etcd | nindent 14 }}
      ports:
        - {port: {{ $root.Values.etcd.clientPort }}, protocol: TCP}
{{- else }}
    - {{- with $root.Values.etcd.external.cidrs }}
      to:
        {{- range . }}
        - ipBlock: {cidr: {{ . }}}
        {{- end }}
      {{- end }}
      ports:
        {{- range .etcdPorts }}
        - {port: {{ . }}, protocol: TCP}
        {{- end }}
{{- end }}
{{- end }}
{{- define "meshserve.np.redisEgress" }}
{{- $root := .root }}
{{- if $root.Values.redis.bundled }}
    - to:
        - podSelector:
            matchLabels:
              {{- .sel.redis | nindent 14 }}
      ports:
        - {port: {{ .redisPort }}, protocol: TCP}
{{- else if $root.Values.redis.external.address }}
    - {{- with $root.Values.redis.external.cidrs }}
      to:
        {{- range . }}
        - ipBlock: {cidr: {{ . }}}
        {{- end }}
      {{- end }}
      ports:
        - {port: {{ .redisPort }}, protocol: TCP}
{{- end }}
{{- end }}
{{- define "meshserve.np.metricsIngress" }}
{{- $root := .root }}
{{- if $root.Values.metrics.port }}
    - from:
        {{- if $root.Values.networkPolicy.prometheus }}
        {{- toYaml $root.Values.networkPolicy.prometheus | nindent 8 }}
        {{- else }}
        - namespaceSelector:
            matchLabels:
              kubernetes.io/metadata.name: monitoring
        {{- end }}
      ports:
        - {port: {{ $root.Values.metrics.port }}, protocol: TCP}
{{- end }}
{{- end }}
