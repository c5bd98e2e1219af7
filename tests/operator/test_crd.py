"""The FineTune CRD on a real kube-apiserver (v1.20, no CEL): it installs, rejects invalid
FineTunes with readable messages, accepts the samples, applies defaults, prunes unknown
fields and has the printer columns `kubectl get ft` shows."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "finetune.dev_finetunes.yaml"
SAMPLES = sorted((REPO / "crds" / "samples").glob("*.yaml"))

MINIMAL = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTune",
    "metadata": {"name": "minimal"},
    "spec": {
        "model": {"architecture": "yolov5n"},
        "dataset": {"config": "data.yaml", "volume": {"persistentVolumeClaim": {"claimName": "data"}}},
        "output": {"volume": {"persistentVolumeClaim": {"claimName": "runs"}}, "path": "minimal"},
    },
}


@pytest.fixture(scope="module")
def crd_installed(control_plane):
    control_plane.kubectl("apply", "-f", str(CRD))
    control_plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                          "crd/finetunes.finetune.dev")
    return control_plane


def with_change(path: str, value) -> dict:
    """MINIMAL with spec.<path> set (None deletes)."""
    body = copy.deepcopy(MINIMAL)
    *parents, last = path.split(".")
    node = body["spec"]
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return body


INVALID = [
    ("missing-dataset", with_change("dataset", None), ["spec.dataset: Required value"]),
    ("missing-dataset-volume", with_change("dataset.volume", None), ["spec.dataset.volume: Required value"]),
    ("unknown-architecture", with_change("model.architecture", "yolov8n"),
     ['spec.model.architecture: Unsupported value: "yolov8n"', '"yolov5s"']),
    ("model-without-architecture-or-config", with_change("model", {"weights": "w.pt"}), ["spec.model", "anyOf"]),
    ("config-without-key", with_change("model.config", {"configMapName": "models"}), ["spec.model.config.key: Required value"]),
    ("freeze-unknown-preset", with_change("freeze", "head"), ["spec.freeze", "backbone|all-but-detect"]),
    ("freeze-negative", with_change("freeze", -1), ["spec.freeze", "greater than or equal to 0"]),
    ("freeze-fraction", with_change("freeze", 1.5), ["spec.freeze"]),
    ("freeze-bn-not-boolean", with_change("freezeBatchNorm", "yes"), ["spec.freezeBatchNorm", "boolean"]),
    ("image-size-not-multiple-of-32", with_change("training.imageSize", 650), ["spec.training.imageSize", "multiple of 32"]),
    ("epochs-zero", with_change("training.epochs", 0), ["spec.training.epochs", "greater than or equal to 1"]),
    ("batch-zero", with_change("training.batchSize", 0), ["spec.training.batchSize", "greater than or equal to 1"]),
    ("unknown-optimizer", with_change("training.optimizer", "Adam"), ['spec.training.optimizer: Unsupported value: "Adam"']),
    ("unknown-amp", with_change("training.amp", "tf32"), ['spec.training.amp: Unsupported value: "tf32"']),
    ("unknown-cache", with_change("training.cache", "disk"), ['spec.training.cache: Unsupported value: "disk"']),
    ("learning-rate-word", with_change("training.learningRate", "fast"), ["spec.training.learningRate", "should match"]),
    ("learning-rate-negative", with_change("training.learningRate", -0.1), ["spec.training.learningRate", "greater than 0"]),
    ("seed-negative", with_change("training.seed", -1), ["spec.training.seed", "greater than or equal to 0"]),
    ("seed-over-32-bits", with_change("training.seed", 4294967296),
     ["spec.training.seed", "less than or equal to"]),
    ("hyperparameter-word", with_change("training.hyperparameters", {"mosaic": "lots"}),
     ["spec.training.hyperparameters.mosaic", "should match"]),
    ("workers-zero", with_change("workers", 0), ["spec.workers", "greater than or equal to 1"]),
    ("gpus-negative", with_change("gpusPerWorker", -1), ["spec.gpusPerWorker", "greater than or equal to 0"]),
    ("two-volume-sources", with_change("dataset.volume", {"persistentVolumeClaim": {"claimName": "a"},
                                                          "hostPath": {"path": "/data"}}),
     ["spec.dataset.volume", "at most 1"]),
    ("empty-volume", with_change("dataset.volume", {}), ["spec.dataset.volume", "at least 1"]),
    ("bad-quantity", with_change("resources", {"limits": {"memory": "lots"}}), ["spec.resources.limits.memory", "should match"]),
    ("bad-toleration-operator", with_change("scheduling.tolerations", [{"key": "gpu", "operator": "Maybe"}]),
     ['spec.scheduling.tolerations.operator: Unsupported value: "Maybe"']),
    ("bad-queue-name", with_change("scheduling.queueName", "Bad_Queue"), ["spec.scheduling.queueName", "should match"]),
    ("backoff-negative", with_change("backoffLimit", -1), ["spec.backoffLimit", "greater than or equal to 0"]),
    ("deadline-zero", with_change("activeDeadlineSeconds", 0), ["spec.activeDeadlineSeconds", "greater than or equal to 1"]),
    ("output-without-path", with_change("output", {"volume": {"emptyDir": {}}}), ["spec.output.path: Required value"]),
    ("absolute-data-path", with_change("dataset.config", "/data.yaml"), ["spec.dataset.config", "should match"]),
    ("unknown-pull-policy", with_change("imagePullPolicy", "Sometimes"), ['spec.imagePullPolicy: Unsupported value: "Sometimes"']),
]


def dry_run(cp, body: dict, check: bool = False):
    return cp.kubectl("-n", "default", "apply", "--dry-run=server", "--validate=false", "-f", "-", input=json.dumps(body), check=check)


def test_crd_is_established_with_printer_columns(crd_installed):
    crd = crd_installed.get_json("crd", "finetunes.finetune.dev")
    version = crd["spec"]["versions"][0]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[:5] == ["Phase", "Epoch", "mAP50", "mAP50-95", "GPU-Mem"] and columns[-1] == "Age"
    assert crd["spec"]["names"]["shortNames"] == ["ft"]
    assert version["subresources"] == {"status": {}}
    established = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert established["Established"] == "True" and established.get("NonStructuralSchema") is None


@pytest.mark.parametrize("case, body, expected", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_finetunes_are_rejected(crd_installed, case, body, expected):
    proc = dry_run(crd_installed, body)
    assert proc.returncode != 0, f"{case} was accepted"
    for text in expected:
        assert text in proc.stderr, f"{case}: {text!r} not in {proc.stderr!r}"


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.stem for s in SAMPLES])
def test_samples_pass_server_dry_run(crd_installed, sample):
    dry_run(crd_installed, yaml.safe_load(sample.read_text()), check=True)


@pytest.mark.parametrize("freeze", [0, 12, "12", "backbone", "all-but-detect", "auto"])
def test_freeze_accepts_int_or_string(crd_installed, freeze):
    dry_run(crd_installed, with_change("freeze", freeze), check=True)


def test_freeze_auto_and_its_status_survive_the_schema(crd_installed, namespace):
    cp = crd_installed
    body = copy.deepcopy(MINIMAL)
    body["metadata"]["name"] = "auto"
    body["spec"]["freeze"] = "auto"
    cp.kubectl("-n", namespace, "create", "-f", "-", input=json.dumps(body))
    freeze = {"requested": "auto", "chosen": 10, "budgetBytes": 6 << 30, "budget": "6.0Gi",
              "probes": [{"depth": 0, "peakBytes": 7 << 30, "peak": "7.0Gi", "fits": False},
                         {"depth": 10, "peakBytes": 5 << 30, "peak": "5.0Gi", "fits": True}]}
    cp.kubectl("-n", namespace, "patch", "ft", "auto", "--subresource=status", "--type=merge",
               "-p", json.dumps({"status": {"freeze": {**freeze, "notAField": 1}}}))
    got = cp.get_json("ft", "auto", namespace=namespace)
    assert got["spec"]["freeze"] == "auto"
    assert got["status"]["freeze"] == freeze  # every field kept, the unknown one pruned


def test_defaults_pruning_and_printed_status(crd_installed, namespace):
    cp = crd_installed
    body = copy.deepcopy(MINIMAL)
    body["spec"]["notAField"] = 1
    body["spec"]["training"] = {"learningRate": 0.01, "hyperparameters": {"fliplr": 0.0, "lrf": "1e-2"}}
    cp.kubectl("-n", namespace, "create", "--validate=false", "-f", "-", input=json.dumps(body))
    spec = cp.get_json("ft", "minimal", namespace=namespace)["spec"]
    assert "notAField" not in spec  # pruned by the structural schema
    assert spec["freeze"] == 0 and spec["freezeBatchNorm"] is True and spec["workers"] == 1
    assert spec["gpusPerWorker"] == 1 and spec["backoffLimit"] == 3 and spec["suspend"] is False
    assert spec["training"] == {"learningRate": 0.01, "hyperparameters": {"fliplr": 0.0, "lrf": "1e-2"},
                                "epochs": 100, "batchSize": 16, "imageSize": 640, "optimizer": "SGD",
                                "amp": "auto", "cache": "none"}
    status = {"phase": "Running", "progress": "3/50", "gpuMemory": "3.1Gi",
              "metrics": {"map50": 0.61, "map50_95": 0.42}, "restarts": 1}
    cp.kubectl("-n", namespace, "patch", "ft", "minimal", "--subresource=status", "--type=merge",
               "-p", json.dumps({"status": status}))
    table = cp.kubectl("-n", namespace, "get", "ft").stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "EPOCH", "MAP50", "MAP50-95", "GPU-MEM", "AGE"]
    assert table[1].split()[:6] == ["minimal", "Running", "3/50", "0.61", "0.42", "3.1Gi"]
    wide = cp.kubectl("-n", namespace, "get", "ft", "-o", "wide").stdout.splitlines()
    assert "RESTARTS" in wide[0].split()
