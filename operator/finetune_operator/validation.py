"""What the CRD schema cannot check (Kubernetes 1.20 has no CEL), checked before any pod exists.

Every problem is one sentence that names the field, what is wrong and how to fix it; the
operator joins them into the FineTune's Failed condition. The model config comes from
``finetune.models.config``, hyperparameter ranges from ``finetune.hyperparameters`` and the
trainer's own checks from ``finetune.config.TrainConfig`` (all torch-free), the same code the
trainer uses, so a FineTune the operator accepts is not rejected by the trainer.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import yaml

from finetune import hyperparameters as hyperparameter_table
from finetune.errors import FinetuneError
from finetune.models import config as model_config

from . import manifests

# Service names are DNS-1035 labels; pod hostnames are DNS-1123 labels (63 characters).
_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_NUMBER = re.compile(r"^-?[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$")
_MAX_LABEL = 63


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
) -> list[str]:
    """Problems with ``spec``; empty when it can run.

    ``model_cfg`` is the custom model config loaded from the ConfigMap named in
    ``spec.model.config`` (the caller reads the ConfigMap); ``model_cfg_error`` says why it
    could not be read. Built-in architectures are loaded here.
    """
    full = manifests.with_defaults(spec)
    problems = validate_name(name, full)
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
    if cfg is not None:
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
