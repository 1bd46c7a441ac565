{{/* Labels every Tollgate object carries. */}}
{{- define "tollgate.labels" -}}
app.kubernetes.io/name: tollgate
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/*
A serving certificate for a Service, as YAML {ca, cert, key} (PEM): the one in the Secret .secret
of namespace .ns when it holds all three (so upgrades keep it, and whoever trusts its CA), else a
new CA named .ca and a certificate for .svc and .svc.cluster.local, valid ten years.
*/}}
{{- define "tollgate.servingPEM" -}}
{{- $existing := lookup "v1" "Secret" .ns .secret -}}
{{- $data := dict -}}
{{- if $existing }}{{ $data = $existing.data | default dict }}{{ end -}}
{{- if and (hasKey $data "ca.crt") (hasKey $data "tls.crt") (hasKey $data "tls.key") -}}
ca: {{ index $data "ca.crt" | b64dec | quote }}
cert: {{ index $data "tls.crt" | b64dec | quote }}
key: {{ index $data "tls.key" | b64dec | quote }}
{{- else -}}
{{- $ca := genCA .ca 3650 -}}
{{- $cert := genSignedCert .svc nil (list .svc (printf "%s.cluster.local" .svc)) 3650 $ca -}}
ca: {{ $ca.Cert | quote }}
cert: {{ $cert.Cert | quote }}
key: {{ $cert.Key | quote }}
{{- end -}}
{{- end -}}
