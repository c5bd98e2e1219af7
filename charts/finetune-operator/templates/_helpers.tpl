{{/* vim: set filetype=mustache: */}}

{{/*
The chart name, truncated to 63 characters (the label value limit).
*/}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The fully qualified app name, used as the prefix of every object name. Truncated to 63
characters because some Kubernetes name fields are limited to that (DNS-1123 labels).
*/}}
{{- define "finetune-operator.fullname" -}}
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

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "finetune-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Labels that select the operator pod. Never change these between releases: a Deployment's
selector is immutable.
*/}}
{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
Common labels for every object of the release.
*/}}
{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: finetune-operator
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The ServiceAccount the operator runs as.
*/}}
{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
"true" when the operator runs namespaced (only `watchNamespaces` get Roles), "" otherwise.
*/}}
{{- define "finetune-operator.namespaced" -}}
{{- if or .Values.rbac.namespaced (gt (len .Values.watchNamespaces) 0) -}}true{{- end -}}
{{- end -}}

{{/*
The namespaces watched in namespaced mode, as a JSON list (templates parse it with fromJsonArray).
*/}}
{{- define "finetune-operator.watchNamespaces" -}}
{{- if .Values.watchNamespaces -}}
{{- .Values.watchNamespaces | uniq | toJson -}}
{{- else -}}
{{- list .Release.Namespace | toJson -}}
{{- end -}}
{{- end -}}

{{/*
The operator image reference: a digest wins over a tag; the tag defaults to appVersion.
*/}}
{{- define "finetune-operator.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
The trainer image the operator puts into trainer pods (FINETUNE_TRAINER_IMAGE).
*/}}
{{- define "finetune-operator.trainerImage" -}}
{{- default (printf "ghcr.io/finetune-operator/trainer:%s" .Chart.AppVersion) .Values.trainer.image -}}
{{- end -}}

{{/*
The NetworkPolicyPeers that may reach a trainer's metrics port (JSON, for
FINETUNE_OPERATOR_NETWORK_POLICY_METRICS_FROM): the operator pod in its namespace, and Prometheus.
*/}}
{{- define "finetune-operator.networkPolicyMetricsFrom" -}}
{{- $operatorNamespaces := .Values.networkPolicy.operatorNamespaceSelector | default (dict "matchLabels" (dict "kubernetes.io/metadata.name" .Release.Namespace)) -}}
{{- $operatorPods := dict "matchLabels" (include "finetune-operator.selectorLabels" . | fromYaml) -}}
{{- $peers := list (dict "namespaceSelector" $operatorNamespaces "podSelector" $operatorPods) -}}
{{- with .Values.networkPolicy.prometheusNamespaceSelector -}}
{{- $peers = append $peers (dict "namespaceSelector" .) -}}
{{- end -}}
{{- toJson $peers -}}
{{- end -}}

{{/*
RBAC rules for what the operator does inside a watched namespace. Shared by the ClusterRole
(cluster mode) and the per-namespace Roles (namespaced mode). Verbs are exactly the calls the
operator makes; nothing is "*".
*/}}
{{- define "finetune-operator.workloadRules" -}}
# Watch FineTunes (kopf's watch and index); get to re-read one after a write refused as stale;
# delete for spec.ttlSecondsAfterFinished (the operator removes finished FineTunes itself).
# No patch: the operator writes only .status, and holds no finalizer (its clock is its own).
- apiGroups: ["finetune.dev"]
  resources: ["finetunes"]
  verbs: ["get", "list", "watch", "delete"]
# Report phase, progress and metrics in .status (merge and JSON patches; never read apart).
- apiGroups: ["finetune.dev"]
  resources: ["finetunes/status"]
  verbs: ["patch"]
# Trainer pods (watched by label): one per worker; deleted on restart/suspend/deadline;
# patched with activeDeadlineSeconds to stop the rest of a failed run.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "create", "delete", "patch"]
# Headless Service per FineTune so workers find the rendezvous host (worker 0); created with
# the first pods (never read), removed by garbage collection with its FineTune.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create"]
{{- if .Values.networkPolicy.enabled }}
# networkPolicy.enabled: one NetworkPolicy per FineTune, created before its Service (never read).
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create"]
{{- end }}
{{- if .Values.gangScheduling.coscheduling.enabled }}
# gangScheduling.coscheduling.enabled: one PodGroup per FineTune, created with its Service (never read).
- apiGroups: ["scheduling.x-k8s.io"]
  resources: ["podgroups"]
  verbs: ["create"]
{{- end }}
{{- if .Values.gangScheduling.volcano.enabled }}
# gangScheduling.volcano.enabled: one Volcano PodGroup per FineTune, created with its Service (never read).
- apiGroups: ["scheduling.volcano.sh"]
  resources: ["podgroups"]
  verbs: ["create"]
{{- end }}
{{- if .Values.podDisruptionBudget.enabled }}
# podDisruptionBudget.enabled: one PodDisruptionBudget per FineTune that asks for it (never read).
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["create"]
{{- end }}
# Custom model configs referenced by a FineTune (read only).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get"]
# kopf posts Kubernetes events (core API, create only) about FineTunes.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{/*
RBAC rules kopf needs at cluster scope in every mode: it discovers and watches CRDs to find
the resources it serves, and lists/watches namespaces to resolve --namespace patterns.
Read-only.
*/}}
{{- define "finetune-operator.scanningRules" -}}
# kopf scans CRDs to find the FineTune and peering resources, and follows their changes.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if include "finetune-operator.namespaced" . }}
# kopf follows namespaces to match its --namespace patterns (names only, read-only). Not in
# cluster mode: --all-namespaces never reads them.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end -}}
