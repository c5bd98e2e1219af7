"""`spec.training.cache: features` through the operator: validation, the trainer's flags, the
scraped cache figures in status, the CRD. No cluster, no torch."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from finetune.config import MAX_CACHE_VIEWS
from finetune_operator import manifests as m
from finetune_operator import scrape, validation
from finetune_operator import status as st

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "crds" / "samples" / "finetune-freeze-backbone-1gpu.yaml"


def spec(**training) -> dict:
    body = yaml.safe_load(SAMPLE.read_text())
    s = copy.deepcopy(body["spec"])
    s["training"] = {**s.get("training", {}), **training}
    return s


def test_cache_features_passes_to_the_trainer_with_its_views():
    s = spec(cache="features", cacheViews=2)
    assert validation.validate_spec("ft", s) == []
    argv = m.trainer_arguments("ft", s)
    assert argv[argv.index("--cache") + 1] == "features" and argv[argv.index("--cache-views") + 1] == "2"


@pytest.mark.parametrize("change, expected", [
    ({"freeze": 0}, "--freeze 0 freezes none"),
    ({"freezeBatchNorm": False}, "--freeze-bn false"),
    ({"training": {"hyperparameters": {"mosaic": 0.5}}}, "cannot cache mosaic"),
    ({"training": {"cacheViews": 0}}, "--cache-views 0"),
])
def test_what_the_cache_cannot_do_is_a_spec_problem(change, expected):
    s = spec(cache="features")
    for key, value in change.items():
        s[key] = {**s[key], **value} if isinstance(value, dict) else value
    problems = validation.validate_spec("ft", s)
    assert len(problems) == 1 and "the trainer rejects this spec" in problems[0] and expected in problems[0], problems


def test_scraped_cache_figures_become_status_feature_cache():
    registry = CollectorRegistry()
    for metric, value in (("finetune_epoch", 2), ("finetune_epochs_total", 50), ("finetune_images_per_second", 1250.0),
                          ("finetune_feature_cache_bytes", 206_438_400), ("finetune_feature_cache_build_seconds", 12.5),
                          ("finetune_feature_cache_views", 4)):
        Gauge(metric, metric, ("finetune", "rank"), registry=registry).labels(finetune="ft", rank="0").set(value)
    values = scrape.parse_metrics(generate_latest(registry).decode(), "ft").as_status()
    assert values["featureCacheBytes"] == 206_438_400 and isinstance(values["featureCacheBytes"], int)
    status = st.apply_trainer_metrics({}, values)
    assert status["featureCache"] == {"bytes": 206_438_400, "size": "196.9Mi", "buildSeconds": 12.5, "views": 4}
    assert status["metrics"] == {"epoch": 2, "imagesPerSecond": 1250.0}
    # A later scrape of a trainer without the gauges keeps what was reported.
    assert st.apply_trainer_metrics(status, {"epoch": 3})["featureCache"] == status["featureCache"]
    # Implausible figures are dropped before they reach the status.
    bad = scrape.drop_implausible(scrape.TrainerMetrics({"featureCacheViews": 0, "featureCacheBytes": -1}), "test")
    assert bad.values == {}


def test_crd_accepts_features_and_the_trainer_view_range():
    for path in (REPO / "crds" / "finetune.dev_finetunes.yaml",
                 REPO / "charts" / "finetune-operator" / "crds" / "finetune.dev_finetunes.yaml"):
        crd = yaml.safe_load(path.read_text())
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        training = schema["properties"]["spec"]["properties"]["training"]["properties"]
        assert "features" in training["cache"]["enum"]
        assert (training["cacheViews"]["minimum"], training["cacheViews"]["maximum"]) == (1, MAX_CACHE_VIEWS)
        cache_status = schema["properties"]["status"]["properties"]["featureCache"]["properties"]
        assert set(cache_status) == {*st.FEATURE_CACHE_FIELDS.values(), "size"}
