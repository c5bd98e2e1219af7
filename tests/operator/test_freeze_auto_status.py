"""`spec.freeze: auto` through the operator: validation, the trainer's flags, the trainer's
freeze gauges scraped into status.freeze, the CRD schema. No cluster."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from finetune.autofreeze import MARGIN, Choice, Probe
from finetune.telemetry import TrainingMetrics
from finetune_operator import manifests as m
from finetune_operator import scrape, validation
from finetune_operator import status as st

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "crds" / "samples" / "finetune-freeze-backbone-1gpu.yaml"
GI = 1 << 30


def spec(**change) -> dict:
    s = copy.deepcopy(yaml.safe_load(SAMPLE.read_text())["spec"])
    s.update(change)
    return s


def test_freeze_auto_is_valid_and_passes_to_the_trainer():
    s = spec(freeze="auto")
    assert validation.validate_spec("ft", s) == []
    argv = m.trainer_arguments("ft", s)
    assert argv[argv.index("--freeze") + 1] == "auto"
    assert "--memory-budget" not in argv  # the trainer reads the GPU's memory or the container's limit
    # Still refused: presets that do not exist, depths the model does not have.
    assert any("spec.freeze" in p for p in validation.validate_spec("ft", spec(freeze=99)))
    # The feature cache accepts auto (the trainer only considers depths > 0 then).
    cached = spec(freeze="auto", training={**spec()["training"], "cache": "features",
                                           "hyperparameters": {"mosaic": 0}})
    assert validation.validate_spec("ft", cached) == []


def trainer_exposition(choice: Choice | None, depth: int) -> str:
    """What the real trainer serves (finetune.telemetry) after --freeze auto chose ``depth``."""
    metrics = TrainingMetrics("ft")
    metrics.set_run(50, 1_000, 700_000)
    metrics.set_progress(1, {"box": 0.1}, 100.0)
    metrics.set_freeze(depth, choice)
    return generate_latest(metrics.registry).decode()


def test_the_chosen_depth_and_every_probe_become_status_freeze():
    probes = [Probe(0, int(7.5 * GI), 4.0), Probe(10, int(5.2 * GI), 3.0), Probe(24, int(4.1 * GI), 3.0)]
    budget = 6 * GI
    choice = Choice(10, budget, int(budget * (1 - MARGIN)), "--memory-budget 6.0Gi", probes)
    values = scrape.parse_metrics(trainer_exposition(choice, 10), "ft").as_status()
    assert values["freezeDepth"] == 10 and values["freezeBudgetBytes"] == budget
    assert values["freezeProbes"] == [{"depth": p.depth, "peakBytes": p.peak_bytes} for p in probes]
    status = st.apply_trainer_metrics({"appliedSpec": spec(freeze="auto")}, values)
    assert status["freeze"] == {
        "requested": "auto", "chosen": 10, "budgetBytes": budget, "budget": "6.0Gi",
        "probes": [{"depth": 0, "peakBytes": probes[0].peak_bytes, "peak": "7.5Gi", "fits": False},
                   {"depth": 10, "peakBytes": probes[1].peak_bytes, "peak": "5.2Gi", "fits": True},
                   {"depth": 24, "peakBytes": probes[2].peak_bytes, "peak": "4.1Gi", "fits": True}]}
    assert "freezeDepth" not in status["metrics"] and "freezeProbes" not in status["metrics"]
    # A later scrape keeps the probes; one without the freeze gauges keeps status.freeze.
    later = st.apply_trainer_metrics(status, {"epoch": 2, "freezeDepth": 10})
    assert later["freeze"] == status["freeze"]
    assert st.apply_trainer_metrics(status, {"epoch": 3})["freeze"] == status["freeze"]


def test_a_fixed_depth_shows_as_requested_and_chosen():
    values = scrape.parse_metrics(trainer_exposition(None, 10), "ft").as_status()
    assert "freezeProbes" not in values
    status = st.apply_trainer_metrics({"appliedSpec": spec(freeze="backbone")}, values)
    assert status["freeze"] == {"requested": "backbone", "chosen": 10}


def test_implausible_freeze_figures_are_dropped():
    text = ('finetune_freeze_depth{finetune="ft",rank="0"} -3\n'
            'finetune_freeze_memory_budget_bytes{finetune="ft",rank="0"} NaN\n'
            'finetune_freeze_probe_peak_bytes{finetune="ft",rank="0",depth="10"} -1\n'
            'finetune_freeze_probe_peak_bytes{finetune="ft",rank="0",depth="x"} 5\n'
            'finetune_freeze_probe_peak_bytes{finetune="ft",rank="0",depth="24"} 4096\n')
    kept = scrape.drop_implausible(scrape.parse_metrics(text, "ft"), "test")
    assert kept.values == {} and kept.freeze_probes == {24: 4096}
    text = "".join(f'finetune_freeze_probe_peak_bytes{{finetune="ft",rank="0",depth="{d}"}} 1\n' for d in range(500))
    assert len(scrape.parse_metrics(text, "ft").freeze_probes) == scrape.MAX_FREEZE_PROBES


def test_crd_freeze_pattern_and_status_schema():
    for path in (REPO / "crds" / "finetune.dev_finetunes.yaml",
                 REPO / "charts" / "finetune-operator" / "crds" / "finetune.dev_finetunes.yaml"):
        schema = yaml.safe_load(path.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert "|auto)" in schema["properties"]["spec"]["properties"]["freeze"]["pattern"]
        freeze = schema["properties"]["status"]["properties"]["freeze"]
        assert set(freeze["properties"]) == {"requested", "chosen", "budgetBytes", "budget", "probes"}
        assert set(freeze["properties"]["probes"]["items"]["properties"]) == {"depth", "peakBytes", "peak", "fits"}
        assert freeze["properties"]["probes"]["maxItems"] == scrape.MAX_FREEZE_PROBES
