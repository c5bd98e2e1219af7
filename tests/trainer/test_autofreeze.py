"""`--freeze auto` (finetune.autofreeze): real probes on CPU, the choice, resume, torchrun, the budget."""

from __future__ import annotations

import json
import subprocess

import pytest

from finetune import autofreeze
from finetune import hyperparameters as hyperparameter_table
from finetune.autofreeze import MARGIN, Budget, Probe, ProbeSpec
from finetune.config import TrainConfig
from finetune.errors import FinetuneError
from finetune.models.config import load_model_config
from trainer_helpers import REPO, finetune_cmd, launch_cmd, run, run_env

BATCH, IMGSZ = 8, 160  # yolov5n: activations large enough that freezing shows in the peak, ~5 s a probe


def spec(batch: int = BATCH) -> ProbeSpec:
    return ProbeSpec(model_cfg=load_model_config("yolov5n"), nc=3, batch=batch, imgsz=IMGSZ,
                     hyp=hyperparameter_table.defaults(), threads=1)


@pytest.fixture(scope="module")
def peaks() -> dict[int, int]:
    """Each anchor's peak, measured by real probe subprocesses (0 last: it must not inherit 24's low mark, nor
    24 the high mark of 0 measured before it, so 0 is measured twice)."""
    s = spec()
    probes = {d: autofreeze.probe(s, d) for d in (0, 24, 10)}
    again = autofreeze.probe(s, 0)
    for p in (*probes.values(), again):
        assert p.error is None and p.peak_bytes, p
    assert abs(again.peak_bytes - probes[0].peak_bytes) < 8 << 20, (again, probes[0])
    return {d: p.peak_bytes for d, p in probes.items()}


def budget_for(usable: float) -> int:
    """--memory-budget whose usable part (less the margin) is ``usable``."""
    return int(usable / (1 - MARGIN))


def train_args(data, out, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--model", "yolov5n", "--epochs", "1", "--batch", str(BATCH), "--imgsz",
            str(IMGSZ), "--workers", "0", "--out", str(out), "--hyp", "nbs=8", "--hyp", "warmup_epochs=0",
            "--freeze", "auto", *extra]


def test_probe_subprocesses_measure_separate_peaks_that_fall_as_more_is_frozen(peaks):
    # Each probe is its own process, so depth 24 measured right after depth 0 is not 0's high-water mark.
    assert peaks[0] > peaks[10] > peaks[24], peaks
    assert peaks[0] - peaks[24] > 20 << 20, peaks  # gradients, optimizer state and kept activations of 24 modules


def test_a_budget_between_two_peaks_picks_the_shallowest_depth_that_fits_and_resume_reuses_it(
        peaks, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    budget = budget_for((peaks[0] + peaks[10]) / 2)  # 10 and 24 fit, 0 does not
    done = run(finetune_cmd(*train_args(tiny_dataset, out, "--memory-budget", str(budget), "--metrics-port", "0")),
               FINETUNE_FREEZE_REFINE="0")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    auto = summary["freeze_auto"]
    assert auto["budget_bytes"] == budget and auto["usable_bytes"] == int(budget * (1 - MARGIN))
    reported = {p["depth"]: p for p in auto["probes"]}
    assert set(reported) == {0, 10, 24}
    fitting = [d for d, p in reported.items() if p["peak_bytes"] <= auto["usable_bytes"]]
    assert auto["chosen"] == min(fitting) == summary["freeze_depth"]
    assert auto["chosen"] == 10, reported  # what the fixture's measurements predict
    assert not reported[0]["fits"] and reported[10]["fits"] and reported[24]["fits"]
    for depth in (0, 10, 24):
        assert f"freeze auto: depth {depth:>2}: peak" in done.stderr
    assert "freeze auto: chose depth 10" in done.stderr

    resumed = run(finetune_cmd(*train_args(tiny_dataset, out, "--memory-budget", "1", "--resume",
                                           "--epochs", "2")), FINETUNE_FREEZE_REFINE="0")
    # A budget of 1 byte would fit nothing: the depth comes from last.pt, without probing.
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "freeze auto: depth 10 from last.pt (not probed again)" in resumed.stderr
    assert "probed depth" not in resumed.stderr
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["freeze_depth"] == 10 and summary["epochs_completed"] == 2
    assert summary["freeze_auto"]["resumed"] is True and len(summary["freeze_auto"]["probes"]) == 3


def test_a_budget_below_every_peak_exits_2_with_one_line(peaks, tiny_dataset, tmp_path):
    done = run(finetune_cmd(*train_args(tiny_dataset, tmp_path / "run", "--memory-budget",
                                        str(budget_for(peaks[24] * 0.9)))), FINETUNE_FREEZE_REFINE="0")
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and done.stderr.strip().splitlines()[-1] == errors[0], done.stderr[-2000:]
    line = errors[0]
    assert line.startswith("error: --freeze auto: no freeze depth fits the memory budget: the smallest peak measured is")
    assert "(depth 24)" in line and "smaller --batch" in line and "--imgsz" in line
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.slow
def test_torchrun_ranks_train_at_rank_0s_choice(tiny_dataset, tmp_path):
    """Rank 0 probes (with the per-rank batch, 4 of 8) and every rank trains at its choice."""
    out = tmp_path / "ddp"
    small = autofreeze.probe(spec(batch=BATCH // 2), 0), autofreeze.probe(spec(batch=BATCH // 2), 10)
    budget = budget_for((small[0].peak_bytes + small[1].peak_bytes) / 2)
    proc = subprocess.run(launch_cmd(2, *train_args(tiny_dataset, out, "--memory-budget", str(budget))),
                          cwd=REPO, env=run_env(FINETUNE_FREEZE_REFINE="0"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    auto = summary["freeze_auto"]
    fitting = [p["depth"] for p in auto["probes"] if p["fits"]]
    assert auto["chosen"] == min(fitting) == 10 and auto["ranks"] == [10, 10]
    assert summary["freeze_depth"] == 10 and summary["world_size"] == 2


# ------------------------------------------------------------------ the choice and the budget, no probes
def table(peaks_by_depth: dict[int, int], seen: list[int]):
    def measure(depth: int) -> Probe:
        seen.append(depth)
        return Probe(depth, peaks_by_depth[depth], 0.0)
    return measure


def test_bisection_finds_the_shallowest_depth_between_anchors():
    peaks_by_depth = {d: 1000 - 10 * d for d in range(25)}  # falls as more is frozen
    seen: list[int] = []
    budget = Budget(int(935 / (1 - MARGIN)) + 1, "test")  # usable 935: depth 7 is the shallowest that fits
    choice = autofreeze.choose([0, 10, 24], budget, table(peaks_by_depth, seen), refine=4)
    assert choice.chosen == 7
    assert seen[:3] == [0, 10, 24] and len(seen) <= 3 + 4
    # Without refinement the anchors decide.
    assert autofreeze.choose([0, 10, 24], budget, table(peaks_by_depth, []), refine=0).chosen == 10
    # The feature cache's lowest allowed depth is 1: it is an anchor instead of 0, and the bisection stays above 0.
    anchors = autofreeze.anchor_depths(load_model_config("yolov5n"), 1)
    assert anchors == [1, 10, 24]
    feature_seen: list[int] = []
    choice = autofreeze.choose(anchors, Budget(10_000, "test"), table(peaks_by_depth, feature_seen), refine=4, lowest=1)
    assert choice.chosen == 1 and feature_seen == [1, 10, 24]
    feature_seen.clear()
    choice = autofreeze.choose([10, 24], budget, table(peaks_by_depth, feature_seen), refine=4, lowest=1)
    assert choice.chosen == 7 and 0 not in feature_seen


def test_nothing_fits_names_the_smallest_peak():
    with pytest.raises(FinetuneError, match=r"smallest peak measured is 1\.0Ki \(depth 24\)"):
        autofreeze.choose([0, 10, 24], Budget(100, "test"), table({0: 3000, 10: 2000, 24: 1024}, []),
                          batch=8, imgsz=160)


def test_the_budget_comes_from_the_container_limit_shared_by_the_pod(tmp_path):
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    v2.write_text("max\n")
    v1.write_text(f"{2**63 - 4096}\n")
    assert autofreeze.container_memory_limit(v2, v1) is None
    v1.write_text(f"{4 << 30}\n")
    assert autofreeze.container_memory_limit(v2, v1) == 4 << 30
    v2.write_text(f"{8 << 30}\n")
    assert autofreeze.container_memory_limit(v2, v1) == 8 << 30
    import torch

    cpu = torch.device("cpu")
    alone = autofreeze.memory_budget(cpu, None, limit=8 << 30)
    assert alone.bytes == 8 << 30 and alone.usable == int((8 << 30) * (1 - MARGIN))
    shared = autofreeze.memory_budget(cpu, None, limit=8 << 30, local_processes=2, loader_workers=2, batch=8, imgsz=160)
    assert shared.bytes == (4 << 30) - 2 * autofreeze.loader_worker_estimate(8, 160)
    assert "2 processes" in shared.source and "2 loader worker(s)" in shared.source
    assert autofreeze.memory_budget(cpu, 6 << 30).bytes == 6 << 30  # --memory-budget wins
    with pytest.raises(FinetuneError, match="leaves nothing for training"):
        autofreeze.memory_budget(cpu, None, limit=256 << 20, loader_workers=4, batch=8, imgsz=640)


def test_freeze_auto_and_memory_budget_flags(tmp_path):
    base = ["--data", "d.yaml", "--out", str(tmp_path)]
    cfg = TrainConfig.from_argv([*base, "--freeze", "auto", "--memory-budget", "6Gi"])
    assert cfg.freeze == "auto" and cfg.memory_budget == 6 << 30
    assert TrainConfig.from_argv(cfg.to_argv()) == cfg
    assert TrainConfig.from_argv([*base, "--freeze", "auto", "--memory-budget", "1500M"]).memory_budget == 1_500_000_000
    with pytest.raises(FinetuneError, match="--memory-budget only applies to --freeze auto"):
        TrainConfig.from_argv([*base, "--freeze", "backbone", "--memory-budget", "6Gi"])
    with pytest.raises(SystemExit):
        TrainConfig.from_argv([*base, "--freeze", "auto", "--memory-budget", "lots"])
    # --cache features accepts auto: the depth is resolved first, and only depths > 0 are candidates.
    assert TrainConfig.from_argv([*base, "--freeze", "auto", "--cache", "features", "--hyp", "mosaic=0"]).cache == "features"


@pytest.mark.slow
def test_cache_features_resolves_auto_to_a_frozen_prefix(tiny_dataset, tmp_path):
    out = tmp_path / "cached"
    done = run(finetune_cmd("train", "--data", str(tiny_dataset), "--model", "yolov5n", "--epochs", "1", "--batch", "4",
                            "--imgsz", "64", "--workers", "0", "--out", str(out), "--hyp", "nbs=4", "--hyp",
                            "warmup_epochs=0", "--hyp", "mosaic=0", "--cache", "features", "--cache-views", "1",
                            "--freeze", "auto", "--memory-budget", str(10 << 40)), FINETUNE_FREEZE_REFINE="0")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert [p["depth"] for p in summary["freeze_auto"]["probes"]] == [1, 10, 24]  # 0 would leave nothing to cache
    assert summary["freeze_depth"] == summary["freeze_auto"]["chosen"] == 1
    assert summary["feature_cache"]["views"] == 1
