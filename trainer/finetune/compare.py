"""`finetune compare`: the freeze trade-off measured on your own data and hardware.

Runs the same fine-tune once per freeze depth (default: 0, backbone, all-but-detect),
each as its own `finetune train` process so that peak memory and wall time belong to that
run alone, then writes a comparison table (`comparison.md`, `comparison.json`) and plots
(`map_per_epoch.png`, `time_memory.png`), and suggests the `freeze:` to put in a FineTune.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .config import TrainConfig, add_train_arguments
from .errors import FinetuneError

DEFAULT_DEPTHS = ("0", "backbone", "all-but-detect")
# A deeper freeze is suggested while its mAP@0.5:0.95 stays within this of freeze 0's.
SUGGEST_MAP_TOLERANCE = 0.02


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    # The flags each run passes on to `finetune train`, as that command spells them.
    add_train_arguments(p, only=("data", "model", "weights", "epochs", "batch", "imgsz", "cache", "seed", "workers",
                                 "hyp", "device"), defaults={"epochs": 10})
    p.add_argument("--freeze", default=",".join(DEFAULT_DEPTHS),
                   help="comma-separated freeze depths to compare (default: 0,backbone,all-but-detect)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve each run's metrics on this port while it runs")
    p.add_argument("--out", required=True, type=Path, help="directory for the runs, table and plots")
    p.add_argument("--reuse", action="store_true",
                   help="reuse runs that already finished in --out instead of training them again")


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    depths = [d.strip() for d in str(args.freeze).split(",") if d.strip()]
    if not depths:
        raise FinetuneError("--freeze: give at least one depth, e.g. --freeze 0,backbone,all-but-detect")
    if args.weights is not None:
        # Refuse bad weights once, with their own one line, before any run starts (each run would
        # refuse them too, and compare would add a second line about the failed run).
        from .models.weights import load_checkpoint

        load_checkpoint(args.weights)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for depth in depths:
        run_dir = args.out / f"freeze-{depth}"
        runs.append(run_one(args, depth, run_dir))
    comparison = build_comparison(runs)
    write_outputs(comparison, args.out)
    print(comparison["markdown"])
    print(f"\nsuggested for your FineTune:\n  spec:\n    freeze: {comparison['suggested_freeze']}\n")
    print(f"table: {args.out / 'comparison.md'}  plots: {args.out / 'map_per_epoch.png'}, "
          f"{args.out / 'time_memory.png'}")
    return comparison


def train_config(args: argparse.Namespace, depth: str, run_dir: Path) -> TrainConfig:
    """The fine-tune of one freeze depth: the same settings for every depth."""
    return TrainConfig(data=args.data, model=args.model, weights=args.weights, freeze=depth, epochs=args.epochs,
                       batch=args.batch, imgsz=args.imgsz, cache=args.cache, seed=args.seed, workers=args.workers,
                       hyp=args.hyp, device=args.device, out=run_dir, name=run_dir.name,
                       metrics_port=args.metrics_port or None)


def train_command(args: argparse.Namespace, depth: str, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "finetune.cli", "train", *train_config(args, depth, run_dir).to_argv()]


def run_one(args: argparse.Namespace, depth: str, run_dir: Path) -> dict[str, Any]:
    """Train one freeze depth in a fresh process (skipped when a finished run is there)."""
    metrics_file = run_dir / "metrics.json"
    if getattr(args, "reuse", False) and metrics_file.is_file():
        done = json.loads(metrics_file.read_text())
        if done.get("epochs_completed") == args.epochs or done.get("stopped_early"):
            print(f"freeze {depth}: reusing the finished run in {run_dir}", flush=True)
            return load_run(depth, run_dir, done.get("process_wall_time_s", done.get("wall_time_s", 0.0)))
    if run_dir.exists():
        for stale in ("last.pt", "best.pt", "results.csv", "metrics.json"):
            (run_dir / stale).unlink(missing_ok=True)
    print(f"\n=== freeze {depth} -> {run_dir}", flush=True)
    if args.metrics_port:
        print(f"live metrics: http://127.0.0.1:{args.metrics_port}/metrics", flush=True)
    t0 = time.perf_counter()
    result = subprocess.run(train_command(args, depth, run_dir), env={**os.environ, "FINETUNE_NAME": run_dir.name})
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        raise FinetuneError(f"the freeze {depth} run failed (exit {result.returncode}); see its output above")
    summary = json.loads(metrics_file.read_text())
    summary["process_wall_time_s"] = wall
    metrics_file.write_text(json.dumps(summary, indent=2) + "\n")
    return load_run(depth, run_dir, wall)


def load_run(depth: str, run_dir: Path, wall: float) -> dict[str, Any]:
    summary = json.loads((run_dir / "metrics.json").read_text())
    with open(run_dir / "results.csv") as f:
        rows = [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]
    epoch_times = [r["epoch_time_s"] for r in rows]
    ips = [r["images_per_second"] for r in rows]
    return {
        "freeze": depth,
        "freeze_depth": summary["freeze_depth"],
        "run_dir": str(run_dir),
        "map50": summary["best"].get("map50", 0.0),
        "map50_95": summary["best"].get("map50_95", 0.0),
        "final_map50_95": rows[-1]["metrics/mAP_0.5:0.95"] if rows else 0.0,
        "wall_time_s": wall,
        "train_wall_time_s": summary["wall_time_s"],
        "time_per_epoch_s": sum(epoch_times) / len(epoch_times) if epoch_times else 0.0,
        "images_per_second": sum(ips) / len(ips) if ips else 0.0,
        "peak_memory_bytes": int(max(r["memory_peak_bytes"] for r in rows)) if rows else 0,
        "memory_kind": rows[0]["memory_kind"] if rows else "cpu",
        "trainable_parameters": summary["trainable_parameters"],
        "frozen_parameters": summary["frozen_parameters"],
        "epochs": len(rows),
        "map50_95_per_epoch": [r["metrics/mAP_0.5:0.95"] for r in rows],
        "device": summary.get("device"),
        "amp": summary.get("amp"),
    }


def _num(v: str):
    try:
        f = float(v)
        return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f
    except (TypeError, ValueError):
        return v


def _pct(value: float, base: float) -> str:
    if not base:
        return "n/a"
    return f"{(value - base) / base * 100:+.0f}%"


def build_comparison(runs: list[dict[str, Any]]) -> dict[str, Any]:
    from .progress import human_bytes

    base = runs[0]
    mem_label = "peak GPU memory" if base["memory_kind"] == "cuda" else "peak process memory"
    header = ["freeze", "mAP@0.5", "mAP@0.5:0.95", "wall time", "time/epoch", "images/s", mem_label,
              "trainable params", "frozen params"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    verdicts = []
    for r in runs:
        rel = r is not base
        cells = [
            f"{r['freeze']} (modules 0–{r['freeze_depth'] - 1})" if r["freeze_depth"] else "0 (none)",
            f"{r['map50']:.3f}" + (f" ({r['map50'] - base['map50']:+.3f})" if rel else ""),
            f"{r['map50_95']:.3f}" + (f" ({r['map50_95'] - base['map50_95']:+.3f})" if rel else ""),
            f"{r['wall_time_s']:.0f} s" + (f" ({_pct(r['wall_time_s'], base['wall_time_s'])})" if rel else ""),
            f"{r['time_per_epoch_s']:.1f} s" + (f" ({_pct(r['time_per_epoch_s'], base['time_per_epoch_s'])})" if rel else ""),
            f"{r['images_per_second']:.1f}" + (f" ({_pct(r['images_per_second'], base['images_per_second'])})" if rel else ""),
            human_bytes(r["peak_memory_bytes"]) + (f" ({_pct(r['peak_memory_bytes'], base['peak_memory_bytes'])})" if rel else ""),
            f"{r['trainable_parameters']:,}",
            f"{r['frozen_parameters']:,}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if rel:
            verdicts.append(verdict(r, base))
    suggested = suggest_freeze(runs)
    device = base.get("device") or "cpu"
    md = "\n".join(lines) + "\n\n" + "\n".join(f"- {v}" for v in verdicts)
    md += f"\n\nMeasured on `{device}` (AMP: {base.get('amp', 'off')}); changes are relative to freeze 0. "
    md += f"Suggested `freeze: {suggested}` (the deepest freeze whose mAP@0.5:0.95 is within "
    md += f"{SUGGEST_MAP_TOLERANCE} of freeze 0).\n"
    return {"runs": runs, "suggested_freeze": suggested, "markdown": md, "verdicts": verdicts}


def verdict(run: dict[str, Any], base: dict[str, Any]) -> str:
    """One honest sentence per frozen run: faster? smaller? how much mAP did it cost?"""
    speed = run["images_per_second"] / base["images_per_second"] if base["images_per_second"] else 0.0
    mem = run["peak_memory_bytes"] / base["peak_memory_bytes"] if base["peak_memory_bytes"] else 1.0
    parts = [f"freeze {run['freeze']}:"]
    parts.append(f"trains {speed:.2f}x as fast" if speed > 1.05 else "no speed-up on this hardware")
    parts.append(f"uses {(1 - mem) * 100:.0f}% less peak memory" if mem < 0.97 else "no memory saving on this hardware")
    d = run["map50_95"] - base["map50_95"]
    parts.append(f"mAP@0.5:0.95 {d:+.3f}")
    return " ".join(parts[:1]) + " " + ", ".join(parts[1:])


def suggest_freeze(runs: list[dict[str, Any]]) -> str:
    base = runs[0]
    ok = [r for r in runs if r["map50_95"] >= base["map50_95"] - SUGGEST_MAP_TOLERANCE]
    best = max(ok, key=lambda r: r["freeze_depth"]) if ok else base
    return best["freeze"]


def write_outputs(comparison: dict[str, Any], out: Path) -> None:
    (out / "comparison.md").write_text(comparison["markdown"])
    (out / "comparison.json").write_text(json.dumps(
        {"runs": comparison["runs"], "suggested_freeze": comparison["suggested_freeze"],
         "verdicts": comparison["verdicts"]}, indent=2) + "\n")
    plot_comparison(comparison["runs"], out)


def plot_comparison(runs: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for r in runs:
        ys = r["map50_95_per_epoch"]
        ax.plot(range(1, len(ys) + 1), ys, marker="o", label=f"freeze {r['freeze']}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mAP@0.5:0.95 (val)")
    ax.set_title("Fine-tuning by freeze depth")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "map_per_epoch.png")
    plt.close(fig)

    labels = [f"freeze {r['freeze']}" for r in runs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.0, 3.6), dpi=100)
    ax1.bar(labels, [r["time_per_epoch_s"] for r in runs], color="tab:blue")
    ax1.set_ylabel("seconds per epoch")
    ax1.set_title("Time per epoch")
    kind = "GPU" if runs[0]["memory_kind"] == "cuda" else "process"
    ax2.bar(labels, [r["peak_memory_bytes"] / 2**20 for r in runs], color="tab:orange")
    ax2.set_ylabel(f"peak {kind} memory (MiB)")
    ax2.set_title("Peak memory")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=15)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "time_memory.png")
    plt.close(fig)
