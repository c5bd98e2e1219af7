"""Pure functions that turn a FineTune spec into the Service, Pod (and optional NetworkPolicy,
PodGroup and PodDisruptionBudget) manifests it needs.

Nothing here talks to a cluster, so every manifest can be unit-tested from a spec dict.
The container command follows docs/trainer-contract.md: its flags are written by the trainer's
own ``TrainConfig.to_argv`` (port 9400, --resume=auto).
"""

from __future__ import annotations

import copy
import dataclasses
import decimal
import hashlib
import json
import re
from typing import Any, Mapping, Sequence

from finetune.config import TrainConfig

GROUP = "finetune.dev"
VERSION = "v1alpha1"
PLURAL = "finetunes"
KIND = "FineTune"
API_VERSION = f"{GROUP}/{VERSION}"

RENDEZVOUS_PORT = 29500
METRICS_PORT = 9400
# > the operator's reconcile interval (10 s) and Prometheus' usual scrape interval.
METRICS_LINGER_SECONDS = 20
DEFAULT_TRAINER_IMAGE = "ghcr.io/finetune-operator/trainer:0.1.0"
TRAINER_IMAGE_ENV = "FINETUNE_TRAINER_IMAGE"

LABEL_APP_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_FINETUNE = "finetune.dev/name"
LABEL_WORKER_INDEX = "finetune.dev/worker-index"
# Pods of the n-th (re)start carry attempt "n" (== status.restarts when they were created), so
# pods left over from before a restart are recognisable even if the operator crashed in between.
LABEL_ATTEMPT = "finetune.dev/attempt"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
# Gang admission (spec.scheduling.gang), one group per FineTune named after it: Kueue's plain-pod
# group (label + total-count annotation, retriable-in-group set when the run fails for good),
# scheduler-plugins' coscheduling (label) and Volcano (annotation), the last two with a PodGroup.
LABEL_KUEUE_POD_GROUP = "kueue.x-k8s.io/pod-group-name"
ANNOTATION_KUEUE_GROUP_COUNT = "kueue.x-k8s.io/pod-group-total-count"
ANNOTATION_KUEUE_RETRIABLE = "kueue.x-k8s.io/retriable-in-group"
LABEL_COSCHEDULING_GROUP = "scheduling.x-k8s.io/pod-group"
ANNOTATION_VOLCANO_GROUP = "scheduling.k8s.io/group-name"
GANG_NONE, GANG_KUEUE, GANG_COSCHEDULING, GANG_VOLCANO = "None", "Kueue", "Coscheduling", "Volcano"
POD_GROUP_API_VERSIONS = {GANG_COSCHEDULING: "scheduling.x-k8s.io/v1alpha1", GANG_VOLCANO: "scheduling.volcano.sh/v1beta1"}
# policy/v1 from Kubernetes 1.21; 1.20 serves only v1beta1 (removed in 1.25).
PDB_API_VERSIONS = ("policy/v1", "policy/v1beta1")
# Keys of spec.pod.labels/annotations that the operator (or a scheduler through it) owns.
RESERVED_KEY_PREFIXES = ("finetune.dev/", "kueue.x-k8s.io/", "scheduling.volcano.sh/")
RESERVED_KEYS = frozenset({LABEL_APP_NAME, LABEL_INSTANCE, LABEL_COMPONENT, LABEL_MANAGED_BY,
                           LABEL_COSCHEDULING_GROUP, ANNOTATION_VOLCANO_GROUP})
# References spec.pod may make when the platform team allows them (the chart's allowedPodReferences).
POD_REFERENCES = ("configMapKeyRef", "secretKeyRef", "serviceAccountName")
# Environment variables the operator sets in the trainer container itself.
OPERATOR_ENV = ("FINETUNE_NAME", "PYTHONUNBUFFERED")
DEFAULT_TERMINATION_GRACE_SECONDS = 60
MANAGED_BY = "finetune-operator"
TRAINER_APP = "finetune-trainer"

# The immutable part of the spec is stored here when the run starts; pods are always built from
# it, so a rejected spec change is never half-applied.
ANNOTATION_APPLIED_SPEC = "finetune.dev/applied-spec"

# Fields a user may change while the run exists; everything else under spec is immutable.
MUTABLE_FIELDS = ("suspend", "activeDeadlineSeconds", "ttlSecondsAfterFinished", "backoffLimit", "maxDisruptions")

DATA_MOUNT = "/data"
WEIGHTS_MOUNT = "/weights"
OUTPUT_MOUNT = "/output"
CONFIG_MOUNT = "/config"
RUN_AS_ID = 1000

TRAINING_DEFAULTS: dict[str, Any] = {
    "epochs": 100,
    "batchSize": 16,
    "imageSize": 640,
    "optimizer": "SGD",
    "amp": "auto",
    "cache": "none",
}
SPEC_DEFAULTS: dict[str, Any] = {
    "freeze": 0,
    "freezeBatchNorm": True,
    "workers": 1,
    "gpusPerWorker": 1,
    "suspend": False,
    "backoffLimit": 3,
    # Preemptions, evictions, drains and node losses before the run fails: each costs seconds
    # (the trainer checkpoints on SIGTERM), but a cluster that never lets it finish should say so.
    "maxDisruptions": 10,
}


@dataclasses.dataclass(frozen=True)
class PlatformSettings:
    """What the platform team set in the chart for what FineTunes may ask of their pods."""

    # The subset of POD_REFERENCES spec.pod may use (allowedPodReferences).
    allowed_pod_references: frozenset[str] = frozenset()
    # Gang policy (Coscheduling, Volcano) -> the schedulerName of the scheduler that reads its
    # PodGroups; a policy missing here is not enabled (gangScheduling.<scheduler>.enabled).
    scheduler_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # spec.podDisruptionBudget may be enabled (podDisruptionBudget.enabled).
    pod_disruption_budgets: bool = False


def with_defaults(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec with the CRD's defaults filled in.

    The apiserver applies the same defaults; doing it here too keeps the functions below
    correct for specs that never went through an apiserver (unit tests, old objects).
    """
    result = copy.deepcopy(dict(spec))
    for key, value in SPEC_DEFAULTS.items():
        result.setdefault(key, value)
    training = dict(TRAINING_DEFAULTS)
    training.update(result.get("training") or {})
    result["training"] = training
    return result


def immutable_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The part of the spec that may not change while the run exists (defaults applied)."""
    full = with_defaults(spec)
    return {k: v for k, v in full.items() if k not in MUTABLE_FIELDS}


def spec_hash(spec: Mapping[str, Any]) -> str:
    canonical = json.dumps(immutable_spec(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def trainer_image(spec: Mapping[str, Any], default: str | None = None) -> str:
    """spec.image, else the operator's setting (``default``, from main.Options), else the built-in one."""
    return str(spec.get("image") or default or DEFAULT_TRAINER_IMAGE)


def service_name(name: str) -> str:
    return name


def worker_pod_name(name: str, index: int) -> str:
    return f"{name}-worker-{index}"


def master_address(name: str) -> str:
    """DNS name of rank 0: resolvable through the headless Service (hostname + subdomain)."""
    return f"{worker_pod_name(name, 0)}.{service_name(name)}"


def processes_per_worker(spec: Mapping[str, Any]) -> int:
    return max(int(with_defaults(spec)["gpusPerWorker"]), 1)


def world_size(spec: Mapping[str, Any]) -> int:
    full = with_defaults(spec)
    return int(full["workers"]) * processes_per_worker(full)


def selector_labels(name: str) -> dict[str, str]:
    return {LABEL_FINETUNE: name, LABEL_COMPONENT: "worker"}


def common_labels(name: str) -> dict[str, str]:
    return {
        LABEL_APP_NAME: TRAINER_APP,
        LABEL_INSTANCE: name,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_FINETUNE: name,
    }


def pod_labels(name: str, index: int, attempt: int, spec: Mapping[str, Any]) -> dict[str, str]:
    labels = common_labels(name)
    labels.update({
        LABEL_COMPONENT: "worker",
        LABEL_WORKER_INDEX: str(index),
        LABEL_ATTEMPT: str(attempt),
    })
    queue = (spec.get("scheduling") or {}).get("queueName")
    if queue:
        labels[LABEL_QUEUE] = queue
    return labels


def gang_policy(spec: Mapping[str, Any]) -> str:
    """spec.scheduling.gang.policy; unset: Kueue with a queueName (one Workload for all workers), else None."""
    scheduling = spec.get("scheduling") or {}
    policy = (scheduling.get("gang") or {}).get("policy")
    return str(policy) if policy else (GANG_KUEUE if scheduling.get("queueName") else GANG_NONE)


def pod_group_name(name: str) -> str:
    """One group per FineTune, the same for every attempt: replacement pods join the group."""
    return name


def gang_metadata(name: str, spec: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """(labels, annotations) that put a worker pod into its FineTune's group."""
    policy, group = gang_policy(spec), pod_group_name(name)
    if policy == GANG_KUEUE:
        return {LABEL_KUEUE_POD_GROUP: group}, {ANNOTATION_KUEUE_GROUP_COUNT: str(int(with_defaults(spec)["workers"]))}
    if policy == GANG_COSCHEDULING:
        return {LABEL_COSCHEDULING_GROUP: group}, {}
    if policy == GANG_VOLCANO:
        return {}, {ANNOTATION_VOLCANO_GROUP: group}
    return {}, {}


def scheduler_name(spec: Mapping[str, Any], settings: PlatformSettings | None = None) -> str | None:
    """spec.scheduling.schedulerName, else the chart's scheduler for a PodGroup gang policy."""
    explicit = (spec.get("scheduling") or {}).get("schedulerName")
    return explicit or (settings or PlatformSettings()).scheduler_names.get(gang_policy(spec))


def owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    """Controller reference to the FineTune, so deleting it garbage-collects what it owns."""
    meta = owner["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def train_config(name: str, spec: Mapping[str, Any]) -> TrainConfig:
    """The trainer's configuration for this FineTune; raises FinetuneError for what the trainer rejects."""
    full = with_defaults(spec)
    model = full.get("model") or {}
    training = full["training"]
    optional = {"lr0": training.get("learningRate"), "lr_schedule": training.get("lrSchedule"),
                "patience": training.get("patience"), "seed": training.get("seed"),
                "workers": training.get("dataLoaderWorkers"), "cache_views": training.get("cacheViews")}
    return TrainConfig(
        data=f"{DATA_MOUNT}/{full['dataset']['config']}",
        model=f"{CONFIG_MOUNT}/{model['config']['key']}" if model.get("config") else str(model["architecture"]),
        weights=f"{WEIGHTS_MOUNT}/{model['weights']}" if model.get("weights") else None,
        freeze=str(full["freeze"]),
        freeze_bn=bool(full["freezeBatchNorm"]),
        epochs=int(training["epochs"]),
        batch=int(training["batchSize"]),
        imgsz=int(training["imageSize"]),
        optimizer=str(training["optimizer"]),
        amp=str(training["amp"]),
        cache=str(training["cache"]),
        hyp=dict(sorted((training.get("hyperparameters") or {}).items())),
        device="cuda" if int(full["gpusPerWorker"]) > 0 else "cpu",
        out=output_directory(full),
        name=name,
        resume="auto",
        metrics_port=METRICS_PORT,
        # Keep the final metrics up long enough for one more scrape after the last epoch,
        # so status and Prometheus see the finished run's numbers.
        metrics_linger=METRICS_LINGER_SECONDS,
        log_format="json",
        **{key: value for key, value in optional.items() if value is not None},
    )


def trainer_arguments(name: str, spec: Mapping[str, Any]) -> list[str]:
    """`finetune train` flags (everything after `-m finetune.cli train`)."""
    return train_config(name, spec).to_argv()


def output_directory(spec: Mapping[str, Any]) -> str:
    output = spec.get("output") or {}
    path = str(output.get("path") or "").strip("/")
    return f"{OUTPUT_MOUNT}/{path}" if path else OUTPUT_MOUNT


def checkpoint_path(spec: Mapping[str, Any]) -> str:
    return f"{output_directory(spec)}/best.pt"


def worker_command(name: str, spec: Mapping[str, Any], index: int) -> list[str]:
    full = with_defaults(spec)
    # finetune-launch is torchrun that exits with the failed worker's own code (128+N for
    # signal N), so a pod's exit code tells a retryable kill from a permanent user error.
    return [
        "finetune-launch",
        f"--nnodes={full['workers']}",
        f"--nproc-per-node={processes_per_worker(full)}",
        f"--node-rank={index}",
        f"--master-addr={master_address(name)}",
        f"--master-port={RENDEZVOUS_PORT}",
        "-m", "finetune.cli", "train",
        *trainer_arguments(name, full),
    ]


def container_resources(spec: Mapping[str, Any]) -> dict[str, Any]:
    full = with_defaults(spec)
    resources = copy.deepcopy(full.get("resources") or {})
    gpus = int(full["gpusPerWorker"])
    limits = dict(resources.get("limits") or {})
    requests = dict(resources.get("requests") or {})
    if gpus > 0:
        # Extended resources must have requests == limits; gpusPerWorker is the source of truth.
        limits["nvidia.com/gpu"] = gpus
        if "nvidia.com/gpu" in requests:
            requests["nvidia.com/gpu"] = gpus
    else:
        limits.pop("nvidia.com/gpu", None)
        requests.pop("nvidia.com/gpu", None)
    result: dict[str, Any] = {}
    if limits:
        result["limits"] = limits
    if requests:
        result["requests"] = requests
    return result


# The spec fields whose volume source the author chooses; volumes() copies each into the pods.
USER_VOLUME_FIELDS = ("dataset", "model", "output")


def user_volume_sources(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``{"spec.dataset.volume": source, ...}`` for every volume source set in the spec."""
    sources = {}
    for field in USER_VOLUME_FIELDS:
        section = spec.get(field) or {}
        if isinstance(section, Mapping) and section.get("volume") is not None:
            sources[f"spec.{field}.volume"] = section["volume"]
    return sources


def relative_paths(spec: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """``{field: (path, mount point)}`` for every spec path that is joined to a mount point."""
    model = spec.get("model") or {}
    candidates = {
        "spec.dataset.config": ((spec.get("dataset") or {}).get("config"), DATA_MOUNT),
        "spec.model.weights": (model.get("weights"), WEIGHTS_MOUNT),
        "spec.model.config.key": ((model.get("config") or {}).get("key"), CONFIG_MOUNT),
        "spec.output.path": ((spec.get("output") or {}).get("path"), OUTPUT_MOUNT),
    }
    return {field: (str(path), mount) for field, (path, mount) in candidates.items() if path is not None}


def volumes(spec: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pod volumes, container volumeMounts)."""
    full = with_defaults(spec)
    model = full.get("model") or {}
    pod_volumes: list[dict[str, Any]] = [{"name": "dataset", **copy.deepcopy(full["dataset"]["volume"])}]
    mounts: list[dict[str, Any]] = [{"name": "dataset", "mountPath": DATA_MOUNT, "readOnly": True}]
    if model.get("volume"):
        pod_volumes.append({"name": "weights", **copy.deepcopy(model["volume"])})
        mounts.append({"name": "weights", "mountPath": WEIGHTS_MOUNT, "readOnly": True})
    output = full.get("output") or {}
    if output.get("volume"):
        pod_volumes.append({"name": "output", **copy.deepcopy(output["volume"])})
    else:
        # Only allowed with backoffLimit 0 (validation): nothing has to survive the pod.
        pod_volumes.append({"name": "output", "emptyDir": {}})
    mounts.append({"name": "output", "mountPath": OUTPUT_MOUNT})
    if model.get("config"):
        config = model["config"]
        pod_volumes.append({
            "name": "model-config",
            "configMap": {"name": config["configMapName"], "items": [{"key": config["key"], "path": config["key"]}]},
        })
        mounts.append({"name": "model-config", "mountPath": CONFIG_MOUNT, "readOnly": True})
    # DataLoader workers pass batches through shared memory; the container default is 64Mi.
    pod_volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return pod_volumes, mounts


def build_service(name: str, namespace: str, owner: Mapping[str, Any]) -> dict[str, Any]:
    """Headless Service: gives every worker the DNS name <pod>.<service> for the rendezvous."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(name),
            "namespace": namespace,
            "labels": common_labels(name),
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(name),
            # Workers must find rank 0 before any of them is Ready.
            "publishNotReadyAddresses": True,
            "ports": [
                {"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT, "protocol": "TCP"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT, "protocol": "TCP"},
            ],
        },
    }


def network_policy_name(name: str) -> str:
    return name


def parse_network_policy_peers(text: str) -> list[dict[str, Any]]:
    """NetworkPolicyPeers (JSON list) allowed to reach the metrics port, from the operator's setting."""
    try:
        peers = json.loads(text or "[]")
    except ValueError as e:
        raise ValueError(f"the network policy's metrics peers are not JSON: {e}") from e
    allowed = {"podSelector", "namespaceSelector", "ipBlock"}
    if not isinstance(peers, list) or not all(isinstance(p, dict) and p and set(p) <= allowed for p in peers):
        raise ValueError("the network policy's metrics peers must be a JSON list of NetworkPolicyPeer "
                         f"objects (keys {', '.join(sorted(allowed))}), got {text!r}")
    return peers


def build_network_policy(
    name: str, namespace: str, owner: Mapping[str, Any], metrics_from: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Ingress to one run's pods: from each other on every port, and to the metrics port from
    ``metrics_from`` (the operator, Prometheus). Egress stays open (DNS, storage)."""
    workers = {"matchLabels": selector_labels(name)}
    # gloo and NCCL connect peers on ephemeral ports, not only the rendezvous port.
    ingress: list[dict[str, Any]] = [{"from": [{"podSelector": workers}]}]
    if metrics_from:
        ingress.append({"from": copy.deepcopy(list(metrics_from)),
                        "ports": [{"protocol": "TCP", "port": METRICS_PORT}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": network_policy_name(name),
            "namespace": namespace,
            "labels": common_labels(name),
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {"podSelector": workers, "policyTypes": ["Ingress"], "ingress": ingress},
    }


_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?:[eE]([+-]?[0-9]+))?([KMGTPE]i|[numkMGTPE])?$")


def multiply_quantity(quantity: Any, factor: int) -> str:
    """A Kubernetes quantity times ``factor``, in the same unit ("64Gi" x 2 = "128Gi")."""
    match = _QUANTITY.match(str(quantity).strip())
    if not match:
        raise ValueError(f"{quantity!r} is not a Kubernetes quantity")
    number, exponent, suffix = match.groups()
    value = decimal.Decimal(number).scaleb(int(exponent or 0)) * factor
    text = format(value.normalize(), "f")
    return f"{text}{suffix or ''}"


def gang_resources(spec: Mapping[str, Any]) -> dict[str, str]:
    """What the whole gang requests: one pod's requests (a limit where no request is set, as the
    apiserver defaults it) times the number of workers."""
    full = with_defaults(spec)
    resources = container_resources(full)
    per_pod = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
    return {key: multiply_quantity(value, int(full["workers"])) for key, value in sorted(per_pod.items())}


def build_pod_group(name: str, namespace: str, spec: Mapping[str, Any], owner: Mapping[str, Any]) -> dict[str, Any] | None:
    """The PodGroup of a Coscheduling or Volcano gang (None for the other policies): all workers or none."""
    full = with_defaults(spec)
    policy = gang_policy(full)
    if policy not in POD_GROUP_API_VERSIONS:
        return None
    scheduling = full.get("scheduling") or {}
    gang = scheduling.get("gang") or {}
    group_spec: dict[str, Any] = {"minMember": int(full["workers"])}
    resources = gang_resources(full)
    if resources:
        group_spec["minResources"] = resources
    if policy == GANG_COSCHEDULING and gang.get("scheduleTimeoutSeconds"):
        group_spec["scheduleTimeoutSeconds"] = int(gang["scheduleTimeoutSeconds"])
    if policy == GANG_VOLCANO:
        if gang.get("queue"):
            group_spec["queue"] = gang["queue"]
        if scheduling.get("priorityClassName"):
            group_spec["priorityClassName"] = scheduling["priorityClassName"]
    return {
        "apiVersion": POD_GROUP_API_VERSIONS[policy],
        "kind": "PodGroup",
        "metadata": {
            "name": pod_group_name(name),
            "namespace": namespace,
            "labels": common_labels(name),
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": group_spec,
    }


def build_pod_disruption_budget(name: str, namespace: str, spec: Mapping[str, Any], owner: Mapping[str, Any],
                                api_version: str = PDB_API_VERSIONS[0]) -> dict[str, Any]:
    """minAvailable = workers: a voluntary eviction (drain) of any worker waits until the run ends."""
    return {
        "apiVersion": api_version,
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": common_labels(name),
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {"minAvailable": int(with_defaults(spec)["workers"]), "selector": {"matchLabels": selector_labels(name)}},
    }


def build_run_objects(name: str, namespace: str, spec: Mapping[str, Any], owner: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What a run needs besides its Service and pods, created with the Service: its PodGroup
    (Coscheduling, Volcano) and its PodDisruptionBudget (spec.podDisruptionBudget.enabled)."""
    objects = []
    pod_group = build_pod_group(name, namespace, spec, owner)
    if pod_group:
        objects.append(pod_group)
    if (spec.get("podDisruptionBudget") or {}).get("enabled"):
        objects.append(build_pod_disruption_budget(name, namespace, spec, owner))
    return objects


def user_env(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """spec.pod.env as container EnvVars (after the operator's own)."""
    env = []
    for item in (spec.get("pod") or {}).get("env") or []:
        var: dict[str, Any] = {"name": item["name"]}
        if item.get("valueFrom"):
            var["valueFrom"] = copy.deepcopy(item["valueFrom"])
        else:
            var["value"] = str(item.get("value", ""))
        env.append(var)
    return env


def build_worker_pod(
    name: str,
    namespace: str,
    spec: Mapping[str, Any],
    index: int,
    owner: Mapping[str, Any],
    attempt: int = 0,
    default_image: str | None = None,
    settings: PlatformSettings | None = None,
) -> dict[str, Any]:
    full = with_defaults(spec)
    pod_volumes, mounts = volumes(full)
    scheduling = full.get("scheduling") or {}
    template = full.get("pod") or {}
    container: dict[str, Any] = {
        "name": "trainer",
        "image": trainer_image(full, default_image),
        "command": worker_command(name, full, index),
        "env": [
            {"name": "FINETUNE_NAME", "value": name},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            *user_env(full),
        ],
        "ports": [
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"},
        ],
        "resources": container_resources(full),
        "volumeMounts": mounts,
        # The trainer's last stderr line ("error: ...") ends up in the pod status, and from
        # there in the FineTune's failure message.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if full.get("imagePullPolicy"):
        container["imagePullPolicy"] = full["imagePullPolicy"]
    pod_spec: dict[str, Any] = {
        "hostname": worker_pod_name(name, index),
        "subdomain": service_name(name),
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": int(template.get("terminationGracePeriodSeconds")
                                             or DEFAULT_TERMINATION_GRACE_SECONDS),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_ID,
            "runAsGroup": RUN_AS_ID,
            "fsGroup": RUN_AS_ID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": pod_volumes,
    }
    for field in ("priorityClassName", "nodeSelector", "tolerations", "affinity"):
        if scheduling.get(field):
            pod_spec[field] = copy.deepcopy(scheduling[field])
    scheduler = scheduler_name(full, settings)
    if scheduler:
        pod_spec["schedulerName"] = scheduler
    for field in ("imagePullSecrets", "runtimeClassName"):
        if template.get(field):
            pod_spec[field] = copy.deepcopy(template[field])
    if template.get("serviceAccountName"):
        # Allowed by the platform team (validation); the ServiceAccount's own
        # automountServiceAccountToken then decides about the token.
        pod_spec["serviceAccountName"] = template["serviceAccountName"]
        del pod_spec["automountServiceAccountToken"]
    group_labels, group_annotations = gang_metadata(name, full)
    # The user's first: validation refuses reserved keys, and the operator's win regardless.
    labels = {**{str(k): str(v) for k, v in (template.get("labels") or {}).items()},
              **pod_labels(name, index, attempt, full), **group_labels}
    annotations = {**{str(k): str(v) for k, v in (template.get("annotations") or {}).items()}, **group_annotations}
    metadata: dict[str, Any] = {
        "name": worker_pod_name(name, index),
        "namespace": namespace,
        "labels": labels,
        "ownerReferences": [owner_reference(owner)],
    }
    if annotations:
        metadata["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}
