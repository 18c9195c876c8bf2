{{/* The chart's name, or nameOverride. */}}
{{- define "pggovernor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The objects' name: fullnameOverride, or the release name with the chart's name. */}}
{{- define "pggovernor.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "pggovernor.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "pggovernor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pggovernor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pggovernor.labels" -}}
{{ include "pggovernor.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "pggovernor.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pggovernor.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "pggovernor.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* The port of a host:port address. */}}
{{- define "pggovernor.port" -}}
{{- regexReplaceAll "^.*:" . "" -}}
{{- end -}}

{{/*
The whole seconds of a Go duration such as "30s", "1m30s" or "1h" (a
fraction, and ms, µs, ns parts, are rounded up to a second).
*/}}
{{- define "pggovernor.seconds" -}}
{{- $total := 0.0 -}}
{{- range regexFindAll "[0-9.]+(h|ms|m|s|us|µs|ns)" (toString .) -1 -}}
{{- $n := regexFind "^[0-9.]+" . | float64 -}}
{{- $u := regexReplaceAll "^[0-9.]+" . "" -}}
{{- if eq $u "h" }}{{ $total = addf $total (mulf $n 3600) }}
{{- else if eq $u "m" }}{{ $total = addf $total (mulf $n 60) }}
{{- else if eq $u "s" }}{{ $total = addf $total $n }}
{{- else }}{{ $total = addf $total (divf $n 1000) }}
{{- end -}}
{{- end -}}
{{- ceil $total | int -}}
{{- end -}}

{{/* Where the Secrets are mounted. */}}
{{- define "pggovernor.secretsDir" -}}/etc/pggovernor/secrets{{- end -}}

{{/*
The configuration file: .Values.config with the chart's own settings (the
*_file keys of the mounted Secrets, IAM, the cluster default), as YAML.
Fails on what would put a secret in the ConfigMap or cannot start.
*/}}
{{- define "pggovernor.config" -}}
{{- $c := deepCopy .Values.config -}}
{{- $dir := include "pggovernor.secretsDir" . -}}
{{- $s := .Values.secrets -}}
{{- if not $c.upstream.url -}}
{{- fail "config.upstream.url is required: the database pggovernor connects to, e.g. postgres://coder@db.internal:5432/coder?sslmode=verify-full" -}}
{{- end -}}
{{- if regexMatch "^[a-z]+://[^/@]*:[^/@]*@" $c.upstream.url -}}
{{- fail "config.upstream.url has a password in it, which would land in the ConfigMap: remove it and put the password in a Secret named by secrets.upstreamPassword.name" -}}
{{- end -}}
{{- if regexMatch "(^|\\s)password\\s*=" $c.upstream.url -}}
{{- fail "config.upstream.url has a password= in it, which would land in the ConfigMap: remove it and put the password in a Secret named by secrets.upstreamPassword.name" -}}
{{- end -}}
{{- if $s.upstreamPassword.name -}}
{{- if $c.upstream.password_file -}}
{{- fail "set secrets.upstreamPassword.name or config.upstream.password_file, not both" -}}
{{- end -}}
{{- $_ := set $c.upstream "password_file" (printf "%s/upstream-password/%s" $dir $s.upstreamPassword.key) -}}
{{- end -}}
{{- if $s.upstreamTLS.name -}}
{{- if $s.upstreamTLS.caKey -}}
{{- $_ := set $c.upstream.ssl "root_cert_file" (printf "%s/upstream-tls/%s" $dir $s.upstreamTLS.caKey) -}}
{{- end -}}
{{- if or $s.upstreamTLS.certKey $s.upstreamTLS.keyKey -}}
{{- if not (and $s.upstreamTLS.certKey $s.upstreamTLS.keyKey) -}}
{{- fail "secrets.upstreamTLS: set both certKey and keyKey for mTLS, or neither" -}}
{{- end -}}
{{- $_ := set $c.upstream.ssl "cert_file" (printf "%s/upstream-tls/%s" $dir $s.upstreamTLS.certKey) -}}
{{- $_ := set $c.upstream.ssl "key_file" (printf "%s/upstream-tls/%s" $dir $s.upstreamTLS.keyKey) -}}
{{- end -}}
{{- end -}}
{{- if $s.clientUsers.name -}}
{{- $_ := set $c.clients "users_file" (printf "%s/client-users/%s" $dir $s.clientUsers.key) -}}
{{- else if and (has $c.clients.auth (list "scram-sha-256" "md5")) (not $c.clients.users_file) -}}
{{- fail (printf "secrets.clientUsers.name is required with config.clients.auth %s: a Secret holding the clients' userlist.txt (\"user\" \"password\" per line)" $c.clients.auth) -}}
{{- end -}}
{{- if $s.clientTLS.name -}}
{{- $_ := set $c.clients.tls "cert_file" (printf "%s/client-tls/%s" $dir $s.clientTLS.certKey) -}}
{{- $_ := set $c.clients.tls "key_file" (printf "%s/client-tls/%s" $dir $s.clientTLS.keyKey) -}}
{{- if $s.clientTLS.caKey -}}
{{- $_ := set $c.clients.tls "client_ca_file" (printf "%s/client-tls/%s" $dir $s.clientTLS.caKey) -}}
{{- end -}}
{{- if eq $c.clients.tls.mode "disable" -}}
{{- $_ := set $c.clients.tls "mode" "require" -}}
{{- end -}}
{{- else if ne $c.clients.tls.mode "disable" -}}
{{- if not $c.clients.tls.cert_file -}}
{{- fail (printf "secrets.clientTLS.name is required with config.clients.tls.mode %s: a kubernetes.io/tls Secret with the certificate pggovernor presents" $c.clients.tls.mode) -}}
{{- end -}}
{{- end -}}
{{- if $s.clientHBA.name -}}
{{- if $c.clients.hba_file -}}
{{- fail "set secrets.clientHBA.name or config.clients.hba_file, not both" -}}
{{- end -}}
{{- $_ := set $c.clients "hba_file" (printf "%s/client-hba/%s" $dir $s.clientHBA.key) -}}
{{- end -}}
{{- if $s.clusterSecret.name -}}
{{- if $c.budget.cluster.secret_file -}}
{{- fail "set secrets.clusterSecret.name or config.budget.cluster.secret_file, not both" -}}
{{- end -}}
{{- $_ := set $c.budget.cluster "secret_file" (printf "%s/cluster-secret/%s" $dir $s.clusterSecret.key) -}}
{{- end -}}
{{- if $s.controlPassword.name -}}
{{- if not $c.budget.cluster.control_user -}}
{{- fail "secrets.controlPassword is the password of config.budget.cluster.control_user: set that role too" -}}
{{- end -}}
{{- if $c.budget.cluster.control_password_file -}}
{{- fail "set secrets.controlPassword.name or config.budget.cluster.control_password_file, not both" -}}
{{- end -}}
{{- $_ := set $c.budget.cluster "control_password_file" (printf "%s/control-password/%s" $dir $s.controlPassword.key) -}}
{{- end -}}
{{- if .Values.iam.enabled -}}
{{- $_ := set $c.upstream "connector" "awsiamrds" -}}
{{- if .Values.iam.region -}}
{{- $_ := set $c.upstream "aws_region" .Values.iam.region -}}
{{- end -}}
{{- end -}}
{{- if kindIs "invalid" $c.budget.cluster.enabled -}}
{{- $_ := set $c.budget.cluster "enabled" (gt (int .Values.replicaCount) 1) -}}
{{- end -}}
{{- toYaml $c -}}
{{- end -}}

{{/* Whether the cluster budget is on (after the replicaCount default). */}}
{{- define "pggovernor.clusterEnabled" -}}
{{- $e := .Values.config.budget.cluster.enabled -}}
{{- if kindIs "invalid" $e -}}{{ gt (int .Values.replicaCount) 1 }}{{- else -}}{{ $e }}{{- end -}}
{{- end -}}

{{/* The grace period: terminationGracePeriodSeconds, or derived; checked. */}}
{{- define "pggovernor.gracePeriod" -}}
{{- $drain := include "pggovernor.seconds" .Values.config.timeouts.shutdown_drain | int -}}
{{- $pre := int .Values.lifecycle.preStopSleepSeconds -}}
{{- $grace := .Values.terminationGracePeriodSeconds -}}
{{- if kindIs "invalid" $grace -}}
{{- add $pre $drain 15 -}}
{{- else -}}
{{- if le (int $grace) (add $pre $drain) -}}
{{- fail (printf "terminationGracePeriodSeconds %d leaves no time for the drain: it must exceed lifecycle.preStopSleepSeconds (%d) + config.timeouts.shutdown_drain (%ds), or the kubelet kills pggovernor while transactions still run" (int $grace) $pre $drain) -}}
{{- end -}}
{{- int $grace -}}
{{- end -}}
{{- end -}}

{{/*
GOMEMLIMIT from resources.limits.memory and goMemLimitPercent, in bytes;
empty when either is unset or the limit is not in Ki, Mi or Gi.
*/}}
{{- define "pggovernor.goMemLimit" -}}
{{- $pct := int .Values.goMemLimitPercent -}}
{{- $lim := "" -}}
{{- with .Values.resources }}{{ with .limits }}{{ $lim = toString (.memory | default "") }}{{ end }}{{ end -}}
{{- $own := false -}}
{{- range .Values.extraEnv }}{{ if eq .name "GOMEMLIMIT" }}{{ $own = true }}{{ end }}{{ end -}}
{{- if and (gt $pct 0) (regexMatch "^[0-9]+(Ki|Mi|Gi)$" $lim) (not $own) -}}
{{- if gt $pct 100 -}}
{{- fail "goMemLimitPercent must be at most 100: GOMEMLIMIT above the container's memory limit lets the kernel kill the process first" -}}
{{- end -}}
{{- $n := regexFind "^[0-9]+" $lim | int64 -}}
{{- $unit := get (dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824) (regexFind "(Ki|Mi|Gi)$" $lim) | int64 -}}
{{- div (mul $n $unit $pct) 100 -}}
{{- end -}}
{{- end -}}
