"""The operator's side of the `finetune train` contract: it writes the flags with the trainer's
own TrainConfig, checks hyperparameters against the trainer's table, and needs no torch."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.cli import build_parser
from finetune.config import SEED_MAX, TrainConfig
from finetune_operator import manifests as m
from finetune_operator import validation

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted((REPO / "crds" / "samples").glob("*.yaml"))


def sample_spec(path: Path = REPO / "crds" / "samples" / "finetune-cpu-smoke.yaml") -> tuple[str, dict]:
    body = yaml.safe_load(path.read_text())
    return body["metadata"]["name"], body["spec"]


def test_operator_and_trainer_contract_import_without_torch_or_numpy():
    code = ("import sys\n"
            "sys.modules['torch'] = sys.modules['numpy'] = None  # any import of them fails\n"
            "import finetune.hyperparameters, finetune.config, finetune.cli\n"
            "import finetune_operator.manifests, finetune_operator.validation, finetune_operator.main\n"
            "loaded = [n for n in sys.modules if n.split('.')[0] in ('torch', 'numpy') and sys.modules[n] is not None]\n"
            "assert not loaded, loaded\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_trainer_arguments_parse_back_into_the_operators_config(sample):
    name, spec = sample_spec(sample)
    argv = m.trainer_arguments(name, spec)
    parsed = TrainConfig.from_namespace(build_parser().parse_args(["train", *argv]))  # as the pod's trainer does
    assert parsed == m.train_config(name, spec)
    training = m.with_defaults(spec)["training"]
    assert parsed.name == name and parsed.resume == "auto" and parsed.log_format == "json"
    assert parsed.epochs == training["epochs"] and parsed.batch == training["batchSize"]
    assert parsed.hyp == {k: float(v) for k, v in (training.get("hyperparameters") or {}).items()}


@pytest.mark.parametrize("hyperparameters, fragments", [
    ({"nbs": 0}, ["spec.training.hyperparameters.nbs", ">= 1", "nominal batch size", "fix the value"]),
    ({"fliplr": "2"}, ["spec.training.hyperparameters.fliplr", "in [0, 1]", "left-right flip"]),
    ({"mosaic": float("nan")}, ["spec.training.hyperparameters.mosaic", "in [0, 1]"]),
    ({"lr00": 1}, ["spec.training.hyperparameters.lr00", "unknown hyperparameter", "remove or rename it"]),
])
def test_hyperparameters_are_checked_against_the_trainers_table(hyperparameters, fragments):
    name, spec = sample_spec()
    spec["training"]["hyperparameters"] = hyperparameters
    (problem,) = validation.validate_spec(name, spec)
    for fragment in fragments:
        assert fragment in problem, problem


def test_valid_hyperparameters_pass():
    name, spec = sample_spec()
    spec["training"]["hyperparameters"] = {"nbs": 16, "fliplr": "0.25", "ema_decay": 0.999}
    assert validation.validate_spec(name, spec) == []
    assert m.train_config(name, spec).hyp == {"ema_decay": 0.999, "fliplr": 0.25, "nbs": 16.0}


def test_what_only_the_trainer_checks_is_a_problem_not_a_crash():
    name, spec = sample_spec()
    spec["training"]["learningRate"] = "1e999"  # passes the CRD's pattern; the trainer refuses inf
    (problem,) = validation.validate_spec(name, spec)
    assert "the trainer rejects this spec" in problem and "--lr0 1e999" in problem


def test_crd_seed_range_is_the_trainers():
    for path in (REPO / "crds" / "finetune.dev_finetunes.yaml",
                 REPO / "charts" / "finetune-operator" / "crds" / "finetune.dev_finetunes.yaml"):
        crd = yaml.safe_load(path.read_text())
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        seed = schema["properties"]["spec"]["properties"]["training"]["properties"]["seed"]
        assert (seed["type"], seed["minimum"], seed["maximum"]) == ("integer", 0, SEED_MAX)
    name, spec = sample_spec()
    spec = copy.deepcopy(spec)
    spec["training"]["seed"] = SEED_MAX
    assert m.train_config(name, spec).seed == SEED_MAX
