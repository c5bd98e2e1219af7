"""Benchmark: what `--freeze auto` measures, what it chooses, and whether the probe predicts training.

1. The probe curve: the peak memory of `finetune.autofreeze`'s probe (one subprocess per
   depth, real optimizer steps on random tensors) at each depth of ``--depths``.
2. A real `finetune train --freeze auto` with a ``--memory-budget`` set between the probes at
   depth 0 and ``backbone``, default refinement: the probes it ran, the depth it chose and
   the time the probing took; then the training process's own peak (results.csv
   memory_peak_bytes) against the probe at that depth.

    python bench/freeze_auto.py      # CPU, the bench configuration: yolov5n, imgsz 320, batch 16

Figures go to bench/results/freeze-auto.json and .md (never asserted by tests).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer"))

from finetune import autofreeze  # noqa: E402
from finetune.autofreeze import MARGIN, ProbeSpec, human  # noqa: E402
from finetune.data.synth import make_synthetic_dataset  # noqa: E402
from finetune.hyperparameters import defaults as default_hyperparameters  # noqa: E402
from finetune.models.config import load_model_config  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="yolov5n")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--depths", default="0,2,4,6,8,10,13,17,20,24")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--markdown-only", action="store_true", help="rewrite freeze-auto.md from freeze-auto.json")
    args = p.parse_args()
    if args.markdown_only:
        (args.out / "freeze-auto.md").write_text(markdown(json.loads((args.out / "freeze-auto.json").read_text())))
        return 0
    model_cfg = load_model_config(args.model)
    spec = ProbeSpec(model_cfg=model_cfg, nc=3, batch=args.batch, imgsz=args.imgsz,
                     hyp=default_hyperparameters(), threads=args.threads)
    load = os.getloadavg()
    curve = []
    for depth in (int(d) for d in args.depths.split(",")):
        probe = autofreeze.probe(spec, depth)
        curve.append({"depth": depth, "peak_bytes": probe.peak_bytes, "seconds": round(probe.seconds, 1)})
        print(f"probe depth {depth:>2}: {human(probe.peak_bytes)} in {probe.seconds:.1f}s", flush=True)
    peaks = {c["depth"]: c["peak_bytes"] for c in curve}
    backbone = autofreeze.anchor_depths(model_cfg)[1]
    usable = (peaks[0] + peaks[backbone]) / 2
    budget = int(usable / (1 - MARGIN))

    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic_dataset(Path(tmp) / "data", classes=["circle", "square", "triangle"], n_train=64,
                                      n_val=16, imgsz=args.imgsz, seed=0)
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "finetune.cli", "train", "--data", str(data), "--model", args.model,
               "--epochs", "1", "--batch", str(args.batch), "--imgsz", str(args.imgsz), "--workers", "0",
               "--out", str(out), "--freeze", "auto", "--memory-budget", str(budget)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        auto = json.loads((out / "metrics.json").read_text())["freeze_auto"]
        with open(out / "results.csv") as f:
            trained_peak = int(float(next(csv.DictReader(f))["memory_peak_bytes"]))
    chosen = auto["chosen"]
    chosen_probe = next(p for p in auto["probes"] if p["depth"] == chosen)
    result = {
        "configuration": {"model": args.model, "imgsz": args.imgsz, "batch": args.batch, "threads": args.threads,
                          "device": "cpu", "steps_per_probe": spec.steps, "machine": platform.node(),
                          "cpus": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in load]},
        "curve": curve,
        "run": {"memory_budget_bytes": budget, "usable_bytes": auto["usable_bytes"], "chosen": chosen,
                "probes": auto["probes"], "probing_seconds": round(sum(p["seconds"] for p in auto["probes"]), 1),
                "wall_seconds_one_epoch": round(wall, 1), "trained_peak_bytes": trained_peak,
                "probe_peak_at_chosen_bytes": chosen_probe["peak_bytes"]},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "freeze-auto.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "freeze-auto.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def markdown(r: dict) -> str:
    c, run = r["configuration"], r["run"]
    lines = [
        "# `--freeze auto`: measured probes (bench/freeze_auto.py)",
        "",
        f"{c['model']}, imgsz {c['imgsz']}, batch {c['batch']}, CPU with {c['threads']} threads on a "
        f"{c['cpus']}-core machine (load average {c['load_average_at_start'][0]} at the start), "
        f"{c['steps_per_probe']} optimizer steps per probe, each probe its own process (peak RSS, VmHWM).",
        "",
        "## The probe at each depth",
        "",
        "| freeze depth | peak RSS | probe time |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {p['depth']} | {mib(p['peak_bytes'])} | {p['seconds']} s |" for p in r["curve"]]
    lines += [
        "",
        "## A run: `finetune train --freeze auto`",
        "",
        f"`--memory-budget {run['memory_budget_bytes']}` ({mib(run['memory_budget_bytes'])}, "
        f"{mib(run['usable_bytes'])} usable after the 10% margin: between the probes at 0 and backbone). "
        f"The probes it ran, in order of depth:",
        "",
        "| depth | peak RSS | fits |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {p['depth']} | {mib(p['peak_bytes'])} | {'yes' if p['fits'] else 'no'} |" for p in run["probes"]]
    lines += [
        "",
        f"Chosen: depth **{run['chosen']}**, after {len(run['probes'])} probes taking {run['probing_seconds']} s "
        f"in all (the whole 1-epoch run: {run['wall_seconds_one_epoch']} s). The training process's own peak "
        f"over its epoch was {mib(run['trained_peak_bytes'])}, the probe at that depth "
        f"{mib(run['probe_peak_at_chosen_bytes'])} "
        f"({100 * (run['trained_peak_bytes'] / run['probe_peak_at_chosen_bytes'] - 1):+.1f}%; the margin is 10%).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
