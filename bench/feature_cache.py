"""Benchmark: `--cache features` against the same fine-tune without it.

The README demo's fine-tune (yolov5n pre-trained on the synthetic source classes by
`finetune.demo`'s pre-training, then fine-tuned on its 128-image target set, validated on
its 64 images) in the bench configuration (imgsz 320, batch 16, the machine's cores), each
run a real `finetune train` process:

* main: at every depth (default all-but-detect and backbone) and seed (default 3), the run
  without the cache (`--cache ram`, decoded images in RAM, as the demo and bench/freeze.py
  run) and with it at the chosen K, for ``--epochs-map`` epochs (default 50): steady-state
  training images/s (the median epoch after the first), best mAP@0.5:0.95, wall time
  including the cache build;
* views: the cache at the other K values (default 1, 2, 8) at all-but-detect, the same
  seeds and epochs: what K costs in mAP;
* wall: both at every depth for each of ``--epochs-wall`` (default 10 and 50), seed 0
  (a run the main phase already made is not repeated): wall time including the build.

Targets (issue 17): all-but-detect >= 5x the uncached images/s, backbone >= 1.3x; the
cached mAP at the chosen K no worse than the uncached mean by more than the uncached runs'
spread (max - min over the seeds).

Every finished run is appended to bench/results/feature-cache.json at once, and a run
already there is not repeated, so an interrupted benchmark continues where it stopped
(`--fresh` starts over); the Markdown report is rewritten from the JSON after every run.
The machine's load average is recorded before and after every run: on a shared machine
it is what the timings mean.

    python bench/feature_cache.py                      # everything (about an hour on 2 idle cores)
    python bench/feature_cache.py --phases main --seeds 1 --epochs-map 10 --threads 1
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer"))

from finetune.config import DEFAULT_CACHE_VIEWS, TrainConfig  # noqa: E402
from finetune.data.synth import make_synthetic_dataset  # noqa: E402
from finetune.demo import FULL, SOURCE_CLASSES, TARGET_CLASSES, pretrain  # noqa: E402

TARGET_RATIO = {"all-but-detect": 5.0, "backbone": 1.3}
FINETUNE_HYP = {"nbs": 16, "warmup_epochs": 1}  # the demo's fine-tune


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_key(r: dict) -> tuple:
    return (r["freeze"], r["cache"], r["views"], r["seed"], r["epochs"])


def one_run(data: Path, weights: Path, freeze: str, cached: bool, views: int, seed: int, epochs: int, imgsz: int,
            batch: int, work: Path, threads: int | None) -> dict:
    """One `finetune train` process, read back from its files."""
    name = f"{freeze}-{'features-k' + str(views) if cached else 'ram'}-s{seed}-e{epochs}"
    out = work / "runs" / name
    for stale in out.glob("*") if out.is_dir() else ():
        if stale.is_file():
            stale.unlink()
    cfg = TrainConfig(data=data, model="yolov5n", weights=weights, freeze=freeze, epochs=epochs, batch=batch,
                      imgsz=imgsz, cache="features" if cached else "ram", cache_views=views if cached else None, seed=seed,
                      device="cpu", out=out, hyp=dict(FINETUNE_HYP), progress=False)
    before = load_average()
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO / "trainer")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{name}.log", "w") as log:  # the trainer's log, beside its run directory
        subprocess.run([sys.executable, "-m", "finetune.cli", "train", *cfg.to_argv()], check=True, env=env,
                       stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    summary = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader(open(out / "results.csv")))
    steady = rows[1:] or rows  # the first epoch pays for start-up
    per_epoch = [float(r["images_per_second"]) for r in steady]
    result = {
        "freeze": freeze, "cache": "features" if cached else "ram", "views": views if cached else 0, "seed": seed,
        "epochs": epochs, "wall_time_s": round(wall, 2), "images_per_second": statistics.median(per_epoch),
        "images_per_second_per_epoch": [round(x, 1) for x in per_epoch],
        "map50_95": summary["best"].get("map50_95", 0.0), "map50": summary["best"].get("map50", 0.0),
        "final_map50_95": summary["final"].get("metrics/mAP_0.5:0.95", 0.0),
        "load_average_before": before, "load_average_after": load_average(),
        "threads": threads or "auto",
    }
    if cached:
        fc = summary["feature_cache"]
        result.update({"cache_bytes": fc["bytes"], "cache_build_s": fc["build_time_s"],
                       "cache_images_per_second": fc["images_per_second"]})
    for big in ("last.pt", "best.pt"):
        (out / big).unlink(missing_ok=True)  # 14 MB each, not needed once read
    return result


def mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (max(values) - min(values)) if len(values) > 1 else 0.0


def report(state: dict) -> str:
    """The Markdown report from the runs so far."""
    runs = state["runs"]
    chosen = state["chosen_views"]

    def select(**match):
        return [r for r in runs if all(r[k] == v for k, v in match.items())]

    lines = [f"# Feature cache benchmark ({state['device']}; yolov5n, imgsz {state['imgsz']}, batch "
             f"{state['batch']}, the README demo's fine-tune: {FULL.target_train} train / {FULL.target_val} val images)",
             "", f"torch {state['torch']}; runs in `feature-cache.json` (each with its load average before and "
             "after). Uncached = `--cache ram` (decoded images in RAM).", ""]
    long = state["epochs_map"]
    lines += [f"## Steady-state training images/s ({long}-epoch runs; median epoch after the first, median over seeds)",
              "",
              "| freeze | seeds | uncached img/s | cached img/s (K = %d) | ratio | target | met |" % chosen,
              "|---|---|---|---|---|---|---|"]
    for depth in state["depths"]:
        plain = select(freeze=depth, cache="ram", epochs=long)
        cached = select(freeze=depth, cache="features", views=chosen, epochs=long)
        if not plain or not cached:
            continue
        a = statistics.median(r["images_per_second"] for r in plain)
        b = statistics.median(r["images_per_second"] for r in cached)
        ratio, target = b / a, TARGET_RATIO.get(depth, 1.0)
        lines.append(f"| {depth} | {len(plain)} / {len(cached)} | {a:.1f} | {b:.1f} | {ratio:.2f}x | >= {target:g}x | "
                     f"{'yes' if ratio >= target else 'no'} |")
    lines += ["", f"## mAP@0.5:0.95 (best epoch of {long}; mean ± spread = max - min over seeds)", "",
              "| freeze | cache | K | seeds | mAP@0.5:0.95 | vs uncached | within the uncached spread |",
              "|---|---|---|---|---|---|---|"]
    for depth in state["depths"]:
        plain = select(freeze=depth, cache="ram", epochs=long)
        if not plain:
            continue
        m0, s0 = mean_spread([r["map50_95"] for r in plain])
        lines.append(f"| {depth} | none | - | {len(plain)} | {m0:.3f} ± {s0:.3f} | | |")
        for k in sorted({r["views"] for r in select(freeze=depth, cache="features", epochs=long)}):
            cached = select(freeze=depth, cache="features", views=k, epochs=long)
            m, s = mean_spread([r["map50_95"] for r in cached])
            lines.append(f"| {depth} | features | {k}{' (default)' if k == chosen else ''} | {len(cached)} | "
                         f"{m:.3f} ± {s:.3f} | {m - m0:+.3f} | {'yes' if m >= m0 - s0 else 'no'} |")
    lines += ["", "## Wall time including the cache build (seed 0)", "",
              "| freeze | epochs | uncached | cached (K = %d) | of which cache build | cache size |" % chosen,
              "|---|---|---|---|---|---|"]
    for depth in state["depths"]:
        for epochs in sorted({*state["epochs_wall"], long}):
            plain = select(freeze=depth, cache="ram", epochs=epochs, seed=0)
            cached = select(freeze=depth, cache="features", views=chosen, epochs=epochs, seed=0)
            if not plain or not cached:
                continue
            c = cached[0]
            lines.append(f"| {depth} | {epochs} | {plain[0]['wall_time_s']:.0f} s | {c['wall_time_s']:.0f} s "
                         f"({c['wall_time_s'] / plain[0]['wall_time_s']:.0%}) | {c['cache_build_s']:.1f} s | "
                         f"{c['cache_bytes'] / 2**20:.0f} MiB |")
    threads = sorted({str(r["threads"]) for r in runs})
    if threads:
        lines += ["", f"Compute threads per run (OMP_NUM_THREADS): {', '.join(threads)}."]
    loads = [x for r in runs for x in (r["load_average_before"][0], r["load_average_after"][0])]
    if loads:
        lines += ["", f"1-minute load average over the runs: {min(loads):.1f} to {max(loads):.1f} "
                      f"(median {statistics.median(loads):.1f}) on {os.cpu_count()} cores."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", default="all-but-detect,backbone")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--views", default="1,2,4,8", help="K values of the views phase (at all-but-detect)")
    p.add_argument("--chosen-views", type=int, default=DEFAULT_CACHE_VIEWS,
                   help="the K of the main and short phases (default: --cache-views' default)")
    p.add_argument("--epochs-map", type=int, default=50, help="epochs of the main and views phases' runs")
    p.add_argument("--epochs-wall", default="10,50", help="epochs of the wall phase's runs")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for the runs (default: unset, the trainer uses the machine's cores)")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--phases", default="main,views,wall")
    p.add_argument("--weights", type=Path, default=None,
                   help="fine-tune from this checkpoint instead of the demo's pre-training (made once, then reused)")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench-feature-cache")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--fresh", action="store_true", help="forget the runs already in the results file")
    args = p.parse_args()
    import torch

    work = args.work
    source = make_synthetic_dataset(work / "data" / "source", classes=list(SOURCE_CLASSES), n_train=FULL.source_train,
                                    n_val=FULL.source_val, imgsz=FULL.data_imgsz, seed=1)
    target = make_synthetic_dataset(work / "data" / "target", classes=list(TARGET_CLASSES), n_train=FULL.target_train,
                                    n_val=FULL.target_val, imgsz=FULL.data_imgsz, seed=2)
    weights = args.weights or pretrain(work / "pretrain", source, FULL, None, "cpu")
    depths = [d.strip() for d in args.depths.split(",") if d.strip()]
    wall_epochs = [int(e) for e in args.epochs_wall.split(",") if e.strip()]
    seeds = list(range(args.seeds))
    path = args.out / "feature-cache.json"
    state = json.loads(path.read_text()) if path.is_file() and not args.fresh else {"runs": []}
    state.update({"device": f"{platform.processor() or platform.machine()} x{os.cpu_count()} CPU",
                  "torch": torch.__version__, "imgsz": args.imgsz, "batch": args.batch,
                  "depths": list(dict.fromkeys([*state.get("depths", []), *depths])),
                  "chosen_views": args.chosen_views, "epochs_map": args.epochs_map,
                  "epochs_wall": sorted({*state.get("epochs_wall", []), *wall_epochs}), "pretrain": str(weights.relative_to(REPO))
                  if weights.is_relative_to(REPO) else str(weights)})
    plan = []  # (freeze, cached, views, seed, epochs), most important first
    phases = set(args.phases.split(","))
    if "main" in phases:
        for depth in depths:
            for seed in seeds:  # uncached and cached side by side, so both see the same load
                plan += [(depth, False, 0, seed, args.epochs_map), (depth, True, args.chosen_views, seed, args.epochs_map)]
    if "views" in phases:
        for k in (int(v) for v in args.views.split(",")):
            if k != args.chosen_views:
                plan += [("all-but-detect", True, k, seed, args.epochs_map) for seed in seeds]
    if "wall" in phases:
        for epochs in wall_epochs:
            for depth in depths:
                plan += [(depth, False, 0, 0, epochs), (depth, True, args.chosen_views, 0, epochs)]
    done = {run_key(r) for r in state["runs"]}
    args.out.mkdir(parents=True, exist_ok=True)
    for freeze, cached, views, seed, epochs in plan:
        key = (freeze, "features" if cached else "ram", views if cached else 0, seed, epochs)
        if key in done:
            continue
        print(f"run {key} (load average {load_average()})", flush=True)
        result = one_run(target, weights, freeze, cached, views, seed, epochs, args.imgsz, args.batch, work,
                         args.threads)
        print(f"  {result['images_per_second']:.1f} img/s, mAP@0.5:0.95 {result['map50_95']:.3f}, "
              f"wall {result['wall_time_s']:.0f} s", flush=True)
        state["runs"].append(result)
        done.add(key)
        path.write_text(json.dumps(state, indent=2) + "\n")
        (args.out / "feature-cache.md").write_text(report(state))
    (args.out / "feature-cache.md").write_text(report(state))
    print(report(state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
