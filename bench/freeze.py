"""Benchmark: the cost and benefit of freezing, against the compute floor.

For each freeze depth (default 0, 10, 24) it runs the real fine-tune (`finetune train`,
data loading and augmentation included) and, in the same run, the *compute floor*: forward
+ loss + backward + optimizer step of the same model, batch and image size on random
tensors, with no data loading. The floor steps the optimizer as training does, once per
nominal batch of 64 images (gradient accumulation), so the two differ only in the input
pipeline. Training images/s should reach >= 90% of the floor at every depth; peak memory
should fall as more modules are frozen.

    python bench/freeze.py                      # CPU: yolov5n, imgsz 320, batch 16
    python bench/freeze.py --gpu                # CUDA: yolov5s, imgsz 640, batch 32, AMP

Figures go to bench/results/freeze-<device>.json and .md (never asserted by tests).
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
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer"))

from finetune.allocator import tune_malloc  # noqa: E402
from finetune.config import TrainConfig, add_train_arguments  # noqa: E402
from finetune.data.dataset import auto_workers  # noqa: E402
from finetune.data.synth import make_synthetic_dataset  # noqa: E402
from finetune.freeze import freeze_modules, set_train_mode  # noqa: E402
from finetune.hyperparameters import defaults as default_hyperparameters  # noqa: E402
from finetune.loss import YoloLoss  # noqa: E402
from finetune.models import build_model  # noqa: E402
from finetune.telemetry import read_peak_rss_bytes, reset_peak_memory  # noqa: E402
from finetune.train import ModelEMA, accumulation_steps, build_optimizer, optimizer_step, resolve_amp  # noqa: E402


def compute_floor(model_name: str, nc: int, depth: int, batch: int, imgsz: int, device: torch.device,
                  amp: str, steps: int, windows: int, warmup: int) -> dict:
    """Images/s (in each of ``windows`` timed windows of ``steps`` batches) and peak memory
    of the training step alone on random tensors: `finetune train`'s forward, loss and
    backward per batch, and its optimizer step (clip, step, EMA) once per nominal batch of 64
    images (gradient accumulation), with nothing loaded."""
    torch.manual_seed(0)
    model = build_model(model_name, nc=nc).to(device, memory_format=torch.channels_last)  # as `finetune train`
    freeze_modules(model, depth)
    set_train_mode(model)
    hyp = default_hyperparameters()
    accumulate = accumulation_steps(hyp, batch)
    opt = build_optimizer(model, "SGD", hyp, batch, accumulate)
    ema = ModelEMA(model, hyp["ema_decay"], hyp["ema_tau"])
    loss_fn = YoloLoss.from_model(model, hyp, imgsz)
    amp_dtype = resolve_amp(amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    imgs = torch.rand(batch, 3, imgsz, imgsz, device=device).contiguous(memory_format=torch.channels_last)
    n = 4 * batch
    targets = torch.cat([torch.arange(batch).repeat(4)[:, None].float(), torch.randint(0, nc, (n, 1)).float(),
                         torch.rand(n, 2) * 0.6 + 0.2, torch.rand(n, 2) * 0.3 + 0.05], 1).to(device)

    def step(i: int) -> None:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            preds = model(imgs)
        loss, _ = loss_fn([p.float() for p in preds], targets)
        scaler.scale(loss).backward()
        if (i + 1) % accumulate == 0:
            optimizer_step(model, opt, scaler, ema)

    steps = -(-steps // accumulate) * accumulate  # whole nominal batches
    for i in range(warmup * accumulate):
        step(i)
    _sync(device)
    reset_peak_memory(device)
    per_window = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for i in range(steps):
            step(i)
        _sync(device)
        per_window.append(steps * batch / (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else read_peak_rss_bytes()
    return {"images_per_second_per_window": per_window, "peak_memory_bytes": int(peak)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_command(data: Path, model_name: str, depth: int, batch: int, imgsz: int, epochs: int,
                     workers: int | None, device: str, run_dir: Path) -> list[str]:
    cfg = TrainConfig(data=data, model=model_name, freeze=str(depth), epochs=epochs, batch=batch, imgsz=imgsz,
                      workers=workers, cache="ram", device=device, out=run_dir, hyp={"warmup_epochs": 0},
                      progress=False)
    return [sys.executable, "-m", "finetune.cli", "train", *cfg.to_argv()]


def real_training(data: Path, model_name: str, depth: int, batch: int, imgsz: int, epochs: int, workers: int | None,
                  device: str, out: Path) -> dict:
    """The real fine-tune: `finetune train` in its own process, read back from its files."""
    run_dir = out / f"freeze-{depth}"
    subprocess.run(training_command(data, model_name, depth, batch, imgsz, epochs, workers, device, run_dir),
                   check=True, env={**os.environ, "PYTHONPATH": str(REPO / "trainer")})
    summary = json.loads((run_dir / "metrics.json").read_text())

    rows = list(csv.DictReader(open(run_dir / "results.csv")))
    steady = rows[1:] or rows  # the first epoch pays for start-up (allocator, caches, workers)
    # The median epoch: this kind of shared VM has slow spells of seconds (noise, not the trainer).
    per_epoch = [float(r["images_per_second"]) for r in steady]
    ips = statistics.median(per_epoch)
    data_share = sum(float(r["data_wait_s"]) for r in steady) / sum(float(r["train_time_s"]) for r in steady)
    return {
        "images_per_second": ips,
        "images_per_second_per_epoch": per_epoch,
        "data_wait_share": data_share,
        "peak_memory_bytes": int(max(float(r["memory_peak_bytes"]) for r in rows)),
        "map50": summary["best"].get("map50", 0.0),
        "map50_95": summary["best"].get("map50_95", 0.0),
        "trainable_parameters": summary["trainable_parameters"],
        "frozen_parameters": summary["frozen_parameters"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="the GPU configuration: yolov5s, imgsz 640, batch 32, AMP")
    p.add_argument("--depths", default="0,10,24")
    p.add_argument("--model", default=None)
    p.add_argument("--imgsz", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--epochs", type=int, default=5, help="the first is start-up; the median of the rest counts")
    p.add_argument("--images", type=int, default=160, help="training images in the synthetic dataset")
    add_train_arguments(p, only=("workers",))
    p.add_argument("--steps", type=int, default=8,
                   help="batches per timed compute-floor window (rounded up to whole nominal batches)")
    p.add_argument("--floor-windows", type=int, default=3,
                   help="timed compute-floor windows before and after each training run; the median of all counts")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    tune_malloc()  # the floor runs with the allocator settings `finetune train` uses
    if args.gpu and not torch.cuda.is_available():
        print("bench/freeze.py: --gpu needs a CUDA device and torch does not see one; run without --gpu for the CPU "
              "configuration", file=sys.stderr)
        return 2
    gpu = args.gpu
    device = torch.device("cuda") if gpu else torch.device("cpu")
    model_name = args.model or ("yolov5s" if gpu else "yolov5n")
    imgsz = args.imgsz or (640 if gpu else 320)
    batch = args.batch or (32 if gpu else 16)
    depths = [int(d) for d in args.depths.split(",")]
    work = Path(tempfile.mkdtemp(prefix="finetune-bench-"))
    data = make_synthetic_dataset(work / "data", n_train=args.images, n_val=32, imgsz=640, seed=0)
    nc = 8
    results = []
    for depth in depths:
        # This machine's speed drifts by +-20% over minutes and has slow spells of seconds
        # (shared VM). So the floor is timed in short windows right before and right after
        # the training run, and both sides count their median: the floor's windows, the
        # training's epochs. (A mean would let one slow spell in the floor flatter the ratio.)
        floor_args = (model_name, nc, depth, batch, imgsz, device, "auto", args.steps, args.floor_windows)
        before = compute_floor(*floor_args, warmup=1)
        real = real_training(data, model_name, depth, batch, imgsz, args.epochs, args.workers,
                             "cuda" if gpu else "cpu", work / "runs")
        after = compute_floor(*floor_args, warmup=1)
        windows = before["images_per_second_per_window"] + after["images_per_second_per_window"]
        floor = {"images_per_second": statistics.median(windows),
                 "images_per_second_before": before["images_per_second_per_window"],
                 "images_per_second_after": after["images_per_second_per_window"],
                 "peak_memory_bytes": max(before["peak_memory_bytes"], after["peak_memory_bytes"])}
        ratio = real["images_per_second"] / floor["images_per_second"]
        results.append({"freeze": depth, "floor": floor, "training": real, "training_over_floor": ratio})
        print(f"freeze {depth}: floor {floor['images_per_second']:.1f} img/s, training "
              f"{real['images_per_second']:.1f} img/s ({ratio:.0%}), peak {real['peak_memory_bytes'] / 2**20:.0f} MiB",
              flush=True)
    name = torch.cuda.get_device_name(device) if gpu else f"{platform.processor() or platform.machine()} x{os.cpu_count()} CPU"
    workers = auto_workers(device) if args.workers is None else args.workers
    report = {"device": name, "model": model_name, "imgsz": imgsz, "batch": batch, "epochs": args.epochs,
              "workers": workers,
              "torch": torch.__version__, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if gpu else "cpu"
    (args.out / f"freeze-{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Freeze benchmark ({name}; {model_name}, imgsz {imgsz}, batch {batch}, "
             f"{workers} loader processes)", "",
             "| freeze | floor img/s | training img/s | training / floor | waiting for data | peak memory | trainable params | mAP@0.5 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['freeze']} | {r['floor']['images_per_second']:.1f} | "
                     f"{r['training']['images_per_second']:.1f} | {r['training_over_floor']:.0%} | "
                     f"{r['training']['data_wait_share']:.0%} | "
                     f"{r['training']['peak_memory_bytes'] / 2**20:.0f} MiB | "
                     f"{r['training']['trainable_parameters']:,} | {r['training']['map50']:.3f} |")
    lines += ["", f"mAP is after {args.epochs} epochs from random weights: this run measures speed and "
              "memory; `make demo` measures the mAP cost of freezing from pretrained weights."]
    (args.out / f"freeze-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
