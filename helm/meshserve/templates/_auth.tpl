{{/*
Authentication of the router's public port (docs/SECURITY.md "Authentication and scopes"):
the bootstrap admin token digest from a Secret, anonymous mode, certificate admins.
*/}}
{{- define "meshserve.authEnv" -}}
{{- $a := .Values.auth }}
{{- if $a.adminTokenSecret }}
- name: MESH_ROUTER_ADMIN_TOKEN_SHA256
  valueFrom:
    secretKeyRef:
      name: {{ $a.adminTokenSecret | quote }}
      key: {{ $a.adminTokenKey | quote }}
{{- end }}
- name: MESH_ROUTER_ALLOW_ANONYMOUS
  value: {{ $a.allowAnonymous | toString | quote }}
{{- if $a.certAdmins }}
- name: MESH_ROUTER_CERT_ADMINS
  value: {{ join "," $a.certAdmins | quote }}
{{- end }}
{{- end }}
