"""What the CRD schema cannot check (Kubernetes 1.20 has no CEL), checked before any pod exists.

Every problem is one sentence that names the field, what is wrong and how to fix it; the
operator joins them into the FineTune's Failed condition. The model config comes from
``finetune.models.config``, hyperparameter ranges from ``finetune.hyperparameters`` and the
trainer's own checks from ``finetune.config.TrainConfig`` (all torch-free), the same code the
trainer uses, so a FineTune the operator accepts is not rejected by the trainer.
"""

from __future__ import annotations

import re
from typing import Any, Collection, Mapping

import yaml

from finetune import hyperparameters as hyperparameter_table
from finetune.config import FREEZE_AUTO
from finetune.errors import FinetuneError
from finetune.models import config as model_config

from . import manifests

# Service names are DNS-1035 labels; pod hostnames are DNS-1123 labels (63 characters).
_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_NUMBER = re.compile(r"^-?[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$")
_MAX_LABEL = 63

# Every volume source type of core/v1 VolumeSource (image: Kubernetes >= 1.31).
VOLUME_TYPES = frozenset({
    "awsElasticBlockStore", "azureDisk", "azureFile", "cephfs", "cinder", "configMap", "csi",
    "downwardAPI", "emptyDir", "ephemeral", "fc", "flexVolume", "flocker", "gcePersistentDisk",
    "gitRepo", "glusterfs", "hostPath", "image", "iscsi", "nfs", "persistentVolumeClaim",
    "photonPersistentDisk", "portworxVolume", "projected", "quobyte", "rbd", "scaleIO", "secret",
    "storageos", "vsphereVolume",
})
# The pods run with the operator's identity, so a FineTune may not mount what its author could
# not read (hostPath, secret, projected service-account tokens). The chart's allowedVolumeTypes.
DEFAULT_ALLOWED_VOLUME_TYPES = ("persistentVolumeClaim", "configMap", "emptyDir", "csi", "ephemeral")


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return isinstance(value, str) and bool(_NUMBER.match(value.strip()))


def _divisible_suggestions(batch: int, world: int) -> str:
    lower = (batch // world) * world
    upper = lower + world
    options = [str(v) for v in (lower, upper) if v > 0]
    return " or ".join(options)


def parse_allowed_volume_types(text: str) -> tuple[str, ...]:
    """The operator's allowlist from a comma-separated setting; empty means the default."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in VOLUME_TYPES]
    if unknown:
        raise ValueError(f"unknown volume type(s) {', '.join(unknown)} in the allowed volume types; "
                         f"known: {', '.join(sorted(VOLUME_TYPES))}")
    return names or DEFAULT_ALLOWED_VOLUME_TYPES


def volume_problems(spec: Mapping[str, Any], allowed: Collection[str]) -> list[str]:
    """Each volume source the author chose must set exactly one allowed type."""
    allowed_text = ", ".join(allowed)
    problems = []
    for field, source in manifests.user_volume_sources(spec).items():
        if not isinstance(source, Mapping):
            problems.append(f"{field} must be a volume source object such as "
                            "{persistentVolumeClaim: {claimName: data}}; fix it")
            continue
        types = sorted(source)
        if len(types) != 1:
            problems.append(f"{field} sets {len(types)} volume types ({', '.join(types) or 'none'}); "
                            f"set exactly one of {allowed_text}")
            continue
        (kind,) = types
        if kind not in VOLUME_TYPES:
            problems.append(f"{field}: {kind!r} is not a Kubernetes volume type; use one of {allowed_text}")
        elif kind not in allowed:
            problems.append(f"{field}: volume type {kind!r} is not allowed on this cluster (allowed: "
                            f"{allowed_text}); use one of those, or ask the platform team to allow it (the "
                            "chart's allowedVolumeTypes)")
        elif not isinstance(source[kind], Mapping):
            problems.append(f"{field}.{kind} must be an object (e.g. {{}}), not {source[kind]!r}; fix it")
    return problems


# Label and annotation keys: an optional DNS-subdomain prefix and '/', then a name of at most 63.
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
_DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def parse_allowed_pod_references(text: str) -> frozenset[str]:
    """The chart's allowedPodReferences (comma-separated); empty allows none."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in manifests.POD_REFERENCES]
    if unknown:
        raise ValueError(f"unknown pod reference(s) {', '.join(unknown)} in the allowed pod references; "
                         f"known: {', '.join(manifests.POD_REFERENCES)}")
    return frozenset(names)


def _key_problem(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if (slash and not (prefix and len(prefix) <= 253 and _DNS_1123_SUBDOMAIN.match(prefix))) \
            or not (len(name) <= _MAX_LABEL and _QUALIFIED_NAME.match(name)):
        return ("is not a valid key (an optional DNS subdomain prefix and '/', then at most 63 letters, digits, "
                "'-', '_' or '.', starting and ending with a letter or digit)")
    if key in manifests.RESERVED_KEYS or key.startswith(manifests.RESERVED_KEY_PREFIXES):
        return ("is reserved: the operator sets it (finetune.dev/*, app.kubernetes.io/name, instance, component "
                "and managed-by, kueue.x-k8s.io/*, scheduling.x-k8s.io/pod-group, scheduling.k8s.io/group-name, "
                "scheduling.volcano.sh/*); use another key, and spec.scheduling for queues and gangs")
    return None


def pod_problems(spec: Mapping[str, Any], allowed_references: Collection[str]) -> list[str]:
    """spec.pod: keys the operator owns stay its own, and references only as the chart allows."""
    template = spec.get("pod") or {}
    allowed_text = ", ".join(sorted(allowed_references)) or "none"

    def not_allowed(field: str, what: str, reference: str) -> str:
        return (f"{field}: {what} is not allowed on this cluster (allowed pod references: {allowed_text}); "
                f"{'use a plain value, ' if reference.endswith('KeyRef') else 'remove it, '}or ask the platform "
                f"team to allow {reference} (the chart's allowedPodReferences)")

    problems = []
    for field in ("labels", "annotations"):
        for key, value in (template.get(field) or {}).items():
            why = _key_problem(str(key))
            if why:
                problems.append(f"spec.pod.{field} key {key!r} {why}")
            elif field == "labels" and not (len(str(value)) <= _MAX_LABEL and _LABEL_VALUE.match(str(value))):
                problems.append(f"spec.pod.labels.{key}: {value!r} is not a label value (at most 63 letters, "
                                "digits, '-', '_' or '.', starting and ending with a letter or digit); fix it")
    seen: set[str] = set()
    for i, item in enumerate(template.get("env") or []):
        name = str(item.get("name", ""))
        field = f"spec.pod.env[{i}] ({name})"
        if name in manifests.OPERATOR_ENV:
            problems.append(f"{field}: the operator sets {name} itself; remove it")
        elif name in seen:
            problems.append(f"{field}: {name} is set twice; keep one")
        seen.add(name)
        source = item.get("valueFrom") or {}
        if source and "value" in item:
            problems.append(f"{field} sets both value and valueFrom; keep one")
        for reference in ("configMapKeyRef", "secretKeyRef"):
            if reference in source and reference not in allowed_references:
                what = f"{reference} {(source[reference] or {}).get('name')!r}"
                problems.append(not_allowed(f"{field}.valueFrom", what, reference))
    account = template.get("serviceAccountName")
    if account and "serviceAccountName" not in allowed_references:
        problems.append(not_allowed("spec.pod.serviceAccountName", f"ServiceAccount {account!r}", "serviceAccountName"))
    return problems


def gang_problems(spec: Mapping[str, Any], settings: manifests.PlatformSettings) -> list[str]:
    """spec.scheduling.gang and spec.podDisruptionBudget against what the chart enabled."""
    scheduling = spec.get("scheduling") or {}
    gang = scheduling.get("gang") or {}
    policy = manifests.gang_policy(spec)
    problems = []
    if policy == manifests.GANG_KUEUE and not scheduling.get("queueName"):
        problems.append("spec.scheduling.gang.policy Kueue needs spec.scheduling.queueName (the LocalQueue); "
                        "set it, or choose another gang policy")
    if policy in manifests.POD_GROUP_API_VERSIONS:
        if policy not in settings.scheduler_names:
            problems.append(f"spec.scheduling.gang.policy {policy}: PodGroups for {policy} are not enabled on this "
                            f"cluster; ask the platform team to enable them (the chart's "
                            f"gangScheduling.{policy.lower()}.enabled), or use policy Kueue or None")
        if scheduling.get("queueName"):
            problems.append(f"spec.scheduling.queueName with gang policy {policy}: Kueue would admit each worker on "
                            "its own while the PodGroup waits for all; remove queueName, or use policy Kueue")
    for key, only in (("scheduleTimeoutSeconds", manifests.GANG_COSCHEDULING), ("queue", manifests.GANG_VOLCANO)):
        if gang.get(key) is not None and policy != only:
            problems.append(f"spec.scheduling.gang.{key} applies to policy {only} only (this one is {policy}); "
                            "remove it")
    if (spec.get("podDisruptionBudget") or {}).get("enabled") and not settings.pod_disruption_budgets:
        problems.append("spec.podDisruptionBudget: PodDisruptionBudgets are not enabled on this cluster; remove "
                        "it, or ask the platform team to enable them (the chart's podDisruptionBudget.enabled)")
    return problems


def pod_group_api_missing(spec: Mapping[str, Any]) -> str:
    """The problem when the cluster does not serve the PodGroups of the FineTune's gang policy."""
    policy = manifests.gang_policy(spec)
    return (f"spec.scheduling.gang.policy {policy}: this cluster serves no "
            f"{manifests.POD_GROUP_API_VERSIONS[policy]} PodGroups; ask the platform team to install "
            f"{'scheduler-plugins' if policy == manifests.GANG_COSCHEDULING else 'Volcano'} (its PodGroup CRD), "
            "or use another gang policy")


def path_problems(spec: Mapping[str, Any]) -> list[str]:
    """Paths joined to a mount point stay inside their volume: relative, no '..' segment."""
    problems = []
    for field, (path, mount) in manifests.relative_paths(spec).items():
        text = str(path)
        if text.startswith("/"):
            problems.append(f"{field} {text!r} must be relative to the volume mounted at {mount}; "
                            "remove the leading '/'")
        elif ".." in text.split("/"):
            problems.append(f"{field} {text!r} must not contain a '..' segment: it would point outside "
                            f"the volume mounted at {mount}; use a path inside the volume")
    return problems


def validate_name(name: str, spec: Mapping[str, Any]) -> list[str]:
    full = manifests.with_defaults(spec)
    problems = []
    if not _DNS_1035_LABEL.match(name):
        problems.append(
            f"metadata.name {name!r} must be a DNS-1035 label (lower-case letters, digits and '-', "
            "starting with a letter) because it names the workers' headless Service; rename the FineTune"
        )
    longest = manifests.worker_pod_name(name, int(full["workers"]) - 1)
    if len(longest) > _MAX_LABEL:
        problems.append(
            f"metadata.name {name!r} is too long: the pod hostname {longest!r} has {len(longest)} "
            f"characters (at most {_MAX_LABEL}); use a name of at most "
            f"{_MAX_LABEL - (len(longest) - len(name))} characters"
        )
    return problems


def validate_spec(
    name: str,
    spec: Mapping[str, Any],
    model_cfg: Mapping[str, Any] | None = None,
    model_cfg_error: str | None = None,
    allowed_volume_types: Collection[str] = DEFAULT_ALLOWED_VOLUME_TYPES,
    settings: manifests.PlatformSettings | None = None,
) -> list[str]:
    """Problems with ``spec``; empty when it can run.

    ``model_cfg`` is the custom model config loaded from the ConfigMap named in
    ``spec.model.config`` (the caller reads the ConfigMap); ``model_cfg_error`` says why it
    could not be read. Built-in architectures are loaded here. ``allowed_volume_types`` is the
    operator's allowlist for the volume sources a FineTune brings; ``settings`` what the chart
    allows for pods (references, gang schedulers, disruption budgets).
    """
    full = manifests.with_defaults(spec)
    settings = settings or manifests.PlatformSettings()
    problems = validate_name(name, full)
    problems += volume_problems(full, allowed_volume_types)
    problems += path_problems(full)
    problems += pod_problems(full, settings.allowed_pod_references)
    problems += gang_problems(full, settings)
    model = full.get("model") or {}
    training = full["training"]

    # The model and the freeze depth.
    cfg: Mapping[str, Any] | None = None
    model_label = ""
    if model.get("config"):
        model_label = f"the custom model in ConfigMap {model['config']['configMapName']!r}"
        if model_cfg_error:
            problems.append(model_cfg_error)
        elif model_cfg is not None:
            try:
                cfg = model_config.load_model_config(dict(model_cfg))
            except FinetuneError as e:
                problems.append(f"spec.model.config: {e}")
    elif model.get("architecture"):
        model_label = str(model["architecture"])
        try:
            cfg = model_config.load_model_config(model_label)
        except FinetuneError as e:
            problems.append(f"spec.model.architecture: {e}")
    else:
        problems.append("spec.model needs an architecture (yolov5n|s|m|l|x) or a config ConfigMap; set one")
    # freeze auto: the trainer measures and chooses a depth in range (finetune.autofreeze).
    if cfg is not None and str(full["freeze"]).strip() != FREEZE_AUTO:
        try:
            model_config.resolve_freeze(full["freeze"], dict(cfg))
        except FinetuneError as e:
            count = model_config.module_count(dict(cfg))
            presets = model_config.freeze_presets(dict(cfg))
            problems.append(
                f"spec.freeze {full['freeze']!r} is too deep for {model_label}, which has {count} "
                f"modules (0-{count - 1}): set spec.freeze to at most {count}, or use "
                + " / ".join(f"{k!r} (= {v})" for k, v in presets.items())
                + f" [{e}]"
            )
    if model.get("weights") and not model.get("volume"):
        problems.append(
            f"spec.model.weights {model['weights']!r} needs spec.model.volume (the volume holding it); "
            "add the volume or remove weights to start from random initialisation"
        )

    # One global batch split evenly over every process of every pod.
    world = manifests.world_size(full)
    batch = int(training["batchSize"])
    if batch % world:
        workers, gpus = int(full["workers"]), int(full["gpusPerWorker"])
        problems.append(
            f"spec.training.batchSize {batch} is not divisible by the {world} training processes "
            f"(workers {workers} x {'gpusPerWorker ' + str(gpus) if gpus else '1 CPU process'}); "
            f"set batchSize to a multiple of {world} (e.g. {_divisible_suggestions(batch, world)}) "
            "or change workers/gpusPerWorker"
        )

    if "learningRate" in training and not (_is_number(training["learningRate"])
                                           and float(training["learningRate"]) > 0):
        problems.append(
            f"spec.training.learningRate {training['learningRate']!r} must be a positive number "
            "(e.g. 0.01 or \"1e-3\"); fix it"
        )
    # The trainer's own table of hyperparameters, their ranges and meanings.
    for key, value in (training.get("hyperparameters") or {}).items():
        why = hyperparameter_table.problem(str(key), value)
        if why is not None:
            fix = "fix the value" if key in hyperparameter_table.BY_NAME else "remove or rename it"
            problems.append(f"spec.training.hyperparameters.{key}: {why}; {fix}")

    # Restarts and suspend/resume continue from OUT/last.pt, which must outlive the pods.
    output = full.get("output") or {}
    if not output.get("volume") or not output.get("path"):
        reasons = []
        if int(full["backoffLimit"]) > 0:
            reasons.append(f"restarts (backoffLimit {full['backoffLimit']})")
        if full.get("suspend"):
            reasons.append("suspend/resume")
        if reasons:
            problems.append(
                f"spec.output (volume and path) is required because {' and '.join(reasons)} resume "
                "from last.pt in the output volume; set spec.output.volume and spec.output.path, "
                "or set spec.backoffLimit: 0"
            )
    if not problems:
        # Anything else the trainer would refuse, so no pod starts only to exit 2.
        try:
            manifests.train_config(name, full)
        except FinetuneError as e:
            problems.append(f"the trainer rejects this spec: {e}; fix the matching spec.training field")
    return problems


def parse_model_configmap(
    configmap: Mapping[str, Any] | None, spec: Mapping[str, Any], namespace: str
) -> tuple[dict[str, Any] | None, str | None]:
    """(config dict, None) from the ConfigMap named in spec.model.config, or (None, problem)."""
    ref = (spec.get("model") or {}).get("config") or {}
    cm_name, key = ref.get("configMapName"), ref.get("key")
    if configmap is None:
        return None, (
            f"spec.model.config: ConfigMap {cm_name!r} not found in namespace {namespace!r}; "
            "create it (kubectl create configmap ... --from-file) or fix configMapName"
        )
    data = configmap.get("data") or {}
    if key not in data:
        keys = ", ".join(sorted(data)) or "none"
        return None, (
            f"spec.model.config: ConfigMap {cm_name!r} has no key {key!r} (keys: {keys}); "
            "fix spec.model.config.key"
        )
    try:
        parsed = yaml.safe_load(data[key])
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return None, f"spec.model.config: key {key!r} of ConfigMap {cm_name!r} is not valid YAML ({first}); fix it"
    if not isinstance(parsed, dict):
        return None, f"spec.model.config: key {key!r} of ConfigMap {cm_name!r} is not a model YAML mapping; fix it"
    return parsed, None
