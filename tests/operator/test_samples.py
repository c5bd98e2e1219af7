"""The sample FineTunes in crds/samples/ against the CRD's openAPIV3Schema, without a cluster.

The API server prunes unknown fields silently (structural schema), so a misspelt field in a
sample would just be ignored; this walks every field of every sample through the schema and
also checks the types, enums, patterns, bounds and required fields the schema declares.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "finetune.dev_finetunes.yaml"
SAMPLES_DIR = REPO / "crds" / "samples"
SAMPLE_NAMES = ["finetune-freeze-backbone-1gpu.yaml", "finetune-2x4gpu.yaml", "finetune-cpu-smoke.yaml"]


def load_crd() -> dict[str, Any]:
    if not CRD_PATH.is_file():
        pytest.fail(f"{CRD_PATH.relative_to(REPO)} is missing")
    return yaml.safe_load(CRD_PATH.read_text())


def served_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version and entry.get("served"):
            return entry["schema"]["openAPIV3Schema"]
    raise AssertionError(f"version {version} is not served")


def type_ok(value: Any, schema_type: str) -> bool:
    if schema_type == "object":
        return isinstance(value, dict)
    if schema_type == "array":
        return isinstance(value, list)
    if schema_type == "string":
        return isinstance(value, str)
    if schema_type == "boolean":
        return isinstance(value, bool)
    if schema_type == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if schema_type == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    raise AssertionError(f"unknown schema type {schema_type}")


def validate(value: Any, schema: dict[str, Any], path: str, structural: bool = True) -> list[str]:
    """Problems of `value` under `schema` (the structural-schema subset the CRD uses).

    `structural` is false inside anyOf/oneOf: in a structural schema those only add value
    checks, while the fields themselves are declared by the surrounding `properties`.
    """
    problems: list[str] = []
    if schema.get("x-kubernetes-int-or-string"):
        if not (type_ok(value, "integer") or type_ok(value, "string")):
            problems.append(f"{path}: expected an integer or a string, got {value!r}")
    elif "type" in schema and not type_ok(value, schema["type"]):
        return [f"{path}: expected {schema['type']}, got {type(value).__name__} {value!r}"]

    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        problems.append(f"{path}: {value!r} does not match {schema['pattern']!r}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", 1 << 30):
            problems.append(f"{path}: length of {value!r} out of bounds")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema:
            too_small = value <= schema["minimum"] if schema.get("exclusiveMinimum") else value < schema["minimum"]
            if too_small:
                problems.append(f"{path}: {value} below minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{path}: {value} above maximum {schema['maximum']}")
        if "multipleOf" in schema and value % schema["multipleOf"]:
            problems.append(f"{path}: {value} not a multiple of {schema['multipleOf']}")
    for alternative_key in ("anyOf", "oneOf"):
        if alternative_key in schema:
            results = [validate(value, alternative, path, structural=False) for alternative in schema[alternative_key]]
            if all(results):
                problems.append(f"{path}: matches none of {alternative_key}: {results}")

    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                problems.append(f"{path}: missing required field {key!r}")
        if "minProperties" in schema and len(value) < schema["minProperties"]:
            problems.append(f"{path}: fewer than {schema['minProperties']} fields")
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            problems.append(f"{path}: more than {schema['maxProperties']} fields")
        properties = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            if key in properties:
                problems += validate(item, properties[key], f"{path}.{key}")
            elif isinstance(additional, dict):
                problems += validate(item, additional, f"{path}.{key}")
            elif structural and not schema.get("x-kubernetes-preserve-unknown-fields") and additional is not True:
                problems.append(f"{path}.{key}: unknown field (the API server would prune it)")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            problems += validate(item, schema["items"], f"{path}[{index}]")
    return problems


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return load_crd()


def test_the_three_samples_exist():
    present = sorted(path.name for path in SAMPLES_DIR.glob("*.yaml"))
    assert set(SAMPLE_NAMES) <= set(present)


@pytest.mark.parametrize("sample_name", SAMPLE_NAMES)
def test_sample_is_valid_under_the_crd_schema(crd, sample_name):
    docs = [doc for doc in yaml.safe_load_all((SAMPLES_DIR / sample_name).read_text()) if doc]
    assert len(docs) == 1
    [sample] = docs
    group = crd["spec"]["group"]
    api_group, _, version = sample["apiVersion"].partition("/")
    assert api_group == group
    assert sample["kind"] == crd["spec"]["names"]["kind"]
    name = sample["metadata"]["name"]
    # Pod names are <name>-worker-<i> and the Service is named after it: keep it a DNS label.
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 40, name
    body = {key: value for key, value in sample.items() if key != "metadata"}
    assert validate(body, served_schema(crd, version), "") == []


def test_samples_are_commented():
    for sample_name in SAMPLE_NAMES:
        text = (SAMPLES_DIR / sample_name).read_text()
        assert text.startswith("#"), f"{sample_name}: explain the sample in a header comment"


def test_samples_cover_what_they_are_named_for():
    def load(sample_name):
        return yaml.safe_load((SAMPLES_DIR / sample_name).read_text())["spec"]

    one_gpu = load("finetune-freeze-backbone-1gpu.yaml")
    assert one_gpu["model"]["architecture"] == "yolov5s"
    assert one_gpu["model"]["weights"] and "persistentVolumeClaim" in one_gpu["model"]["volume"]
    assert one_gpu["freeze"] == "backbone"
    assert (one_gpu["workers"], one_gpu["gpusPerWorker"]) == (1, 1)

    multi = load("finetune-2x4gpu.yaml")
    assert (multi["workers"], multi["gpusPerWorker"]) == (2, 4)
    assert multi["freeze"] in ("all-but-detect", 10)
    assert multi["scheduling"]["queueName"] and multi["scheduling"]["priorityClassName"]
    assert any(t["key"] == "nvidia.com/gpu" for t in multi["scheduling"]["tolerations"])
    assert multi["training"]["batchSize"] % (multi["workers"] * multi["gpusPerWorker"]) == 0

    smoke = load("finetune-cpu-smoke.yaml")
    assert smoke["model"]["architecture"] == "yolov5n"
    assert (smoke["workers"], smoke["gpusPerWorker"]) == (2, 0)
    assert 128 <= smoke["training"]["imageSize"] <= 160
    assert 2 <= smoke["training"]["epochs"] <= 3
    assert smoke["training"]["batchSize"] % smoke["workers"] == 0
    assert smoke["dataset"] == {
        "config": "data.yaml",
        "volume": {"persistentVolumeClaim": {"claimName": "finetune-synth-data", "readOnly": True}},
    }
    assert smoke["output"]["volume"]["persistentVolumeClaim"]["claimName"] == "finetune-runs"


def test_validator_catches_mistakes(crd):
    """The schema walk is only worth something if it rejects what the API server would."""
    schema = served_schema(crd, "v1alpha1")
    good = yaml.safe_load((SAMPLES_DIR / "finetune-cpu-smoke.yaml").read_text())
    good.pop("metadata")
    assert validate(good, schema, "") == []

    def broken(mutate):
        body = yaml.safe_load(yaml.safe_dump(good))
        mutate(body["spec"])
        return validate(body, schema, "")

    assert broken(lambda s: s.__setitem__("gpus", 1))  # misspelt field
    assert broken(lambda s: s["training"].__setitem__("imgSize", 160))  # misspelt nested field
    assert broken(lambda s: s["training"].__setitem__("imageSize", 150))  # not a multiple of 32
    assert broken(lambda s: s["model"].__setitem__("architecture", "yolov8n"))  # enum
    assert broken(lambda s: s.__setitem__("freeze", "head"))  # pattern
    assert broken(lambda s: s.__setitem__("workers", 0))  # minimum
    assert broken(lambda s: s.pop("dataset"))  # required


def test_two_by_four_gpu_sample_pods_are_one_kueue_pod_group():
    """The sample says both workers are admitted together: its pods, as the operator renders
    them, carry Kueue's pod-group label and total-count annotation (Kueue's plain-pod contract)."""
    from finetune_operator import manifests

    sample = yaml.safe_load((SAMPLES_DIR / "finetune-2x4gpu.yaml").read_text())
    name, spec = sample["metadata"]["name"], sample["spec"]
    owner = {"metadata": {"name": name, "uid": "uid-1"}}
    for attempt in (0, 1):  # replacement pods after a restart or a preemption join the same group
        pods = [manifests.build_worker_pod(name, "ml", spec, i, owner, attempt) for i in range(spec["workers"])]
        assert len(pods) == 2
        for pod in pods:
            assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-training"
            assert pod["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] == name
            assert pod["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "2"
    # ... and its comment says how (the claim used to be made without the group).
    comment = (SAMPLES_DIR / "finetune-2x4gpu.yaml").read_text()
    assert "kueue.x-k8s.io/pod-group-name" in comment and "pod-group-total-count" in comment
