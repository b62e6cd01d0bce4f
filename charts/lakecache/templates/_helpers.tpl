{{/*
Names and labels shared by every template.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "lakecache.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: fullnameOverride, else the release name (with the chart name
appended unless the release name already contains it). Trimmed so that suffixes such as
"-operator" and "-csi-node" keep names within 63 characters.
*/}}
{{- define "lakecache.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart: name-version, as the helm.sh/chart label wants it. */}}
{{- define "lakecache.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "lakecache.labels" -}}
helm.sh/chart: {{ include "lakecache.chart" . }}
app.kubernetes.io/name: {{ include "lakecache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lakecache
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "operator"). */}}
{{- define "lakecache.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lakecache.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Names of the two components. */}}
{{- define "lakecache.operator.fullname" -}}
{{- printf "%s-operator" (include "lakecache.fullname" .) }}
{{- end }}
{{- define "lakecache.csi.fullname" -}}
{{- printf "%s-csi-node" (include "lakecache.fullname" .) }}
{{- end }}

{{/* The image of every lakecache container (tag defaults to the chart's appVersion). */}}
{{- define "lakecache.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The CSI plugin's directory on the node, where kubelet finds its socket. */}}
{{- define "lakecache.csi.pluginDir" -}}
{{- printf "%s/plugins/csi.lakecache.io" (trimSuffix "/" .Values.csi.kubeletDir) }}
{{- end }}

{{/* kubelet's root directory without a trailing slash. */}}
{{- define "lakecache.csi.kubeletDir" -}}
{{- trimSuffix "/" .Values.csi.kubeletDir }}
{{- end }}

{{/*
The CSI plugin's state directory (every volume's token, the mounter's socket), shared by the
plugin and the mounter only: beside the plugin directory, not in it, because that one is also
mounted into the registrar container. It stays under kubelet's directory, which the plugin and
the mounter mount with Bidirectional propagation, so that the FUSE mounts of inline volumes made
there by the mounter reach the plugin (and the pods).
*/}}
{{- define "lakecache.csi.stateDir" -}}
{{- printf "%s/plugins/csi.lakecache.io-state" (include "lakecache.csi.kubeletDir" .) }}
{{- end }}

{{/* Labels of the monitoring objects: every object's, and monitoring.labels for Prometheus. */}}
{{- define "lakecache.monitoring.labels" -}}
{{ include "lakecache.labels" . }}
{{- with .Values.monitoring.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The `job` label of each scraped component, set by the monitors and used by the alerts:
(dict "ctx" $ "component" "worker").
*/}}
{{- define "lakecache.monitoring.job" -}}
{{- printf "%s-%s" (include "lakecache.fullname" .ctx) .component }}
{{- end }}

{{/* The scrape interval and timeout of an endpoint of a ServiceMonitor or a PodMonitor. */}}
{{- define "lakecache.monitoring.scrape" -}}
{{- with .Values.monitoring.interval }}
interval: {{ . }}
{{- end }}
{{- with .Values.monitoring.scrapeTimeout }}
scrapeTimeout: {{ . }}
{{- end }}
{{- end }}
