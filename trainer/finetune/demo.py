"""`make demo`: what does freezing buy and cost? Measured here, in minutes.

1. Make a synthetic *source* dataset and a *target* dataset with different classes.
2. Pre-train yolov5n on the source (standing in for "COCO weights"); kept and reused.
3. Fine-tune on the target three times from that checkpoint: freeze 0, backbone and
   all-but-detect, with live metrics and a progress bar.
4. Print and write the comparison table and plots (`finetune compare` does 3-4).
On a GPU the same command uses it, with AMP. `--quick` is the reduced size CI runs.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .compare import run_compare
from .config import TrainConfig, add_train_arguments
from .data.synth import make_synthetic_dataset
from .errors import EXIT_USAGE, FinetuneError

SOURCE_CLASSES = ("circle", "square", "triangle", "ellipse")
TARGET_CLASSES = ("star", "cross", "hexagon", "diamond")


@dataclass(frozen=True)
class DemoSize:
    source_train: int
    source_val: int
    target_train: int
    target_val: int
    data_imgsz: int
    imgsz: int
    batch: int
    pretrain_epochs: int
    finetune_epochs: int


FULL = DemoSize(source_train=384, source_val=64, target_train=128, target_val=64, data_imgsz=256, imgsz=192,
                batch=16, pretrain_epochs=24, finetune_epochs=8)
QUICK = DemoSize(source_train=48, source_val=16, target_train=32, target_val=16, data_imgsz=160, imgsz=128,
                 batch=8, pretrain_epochs=2, finetune_epochs=2)


def free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
                return s.getsockname()[1]
            except OSError:
                continue
    return preferred


def pretrain_command(out: Path, data: Path, size: DemoSize, workers: int | None, device: str) -> list[str]:
    # AdamW trains a from-scratch stand-in for "COCO weights" fast and stably.
    cfg = TrainConfig(data=data, model="yolov5n", epochs=size.pretrain_epochs, batch=size.batch, imgsz=size.imgsz,
                      workers=workers, cache="ram", device=device, out=out, name="pretrain", optimizer="AdamW",
                      lr0=0.002, hyp={"nbs": 16, "warmup_epochs": 1, "mosaic": 0.5, "lrf": 0.1})
    return [sys.executable, "-m", "finetune.cli", "train", *cfg.to_argv()]


def pretrain(out: Path, data: Path, size: DemoSize, workers: int | None, device: str) -> Path:
    """Train the stand-in for 'COCO weights' once; later demos reuse it."""
    best = out / "best.pt"
    done = out / "metrics.json"
    if best.is_file() and done.is_file() and json.loads(done.read_text()).get("epochs_completed") == size.pretrain_epochs:
        print(f"reusing the pre-trained checkpoint {best}", flush=True)
        return best
    for stale in ("last.pt", "best.pt", "results.csv", "metrics.json"):
        (out / stale).unlink(missing_ok=True)
    print("\n=== pre-training yolov5n on the source classes " + ", ".join(SOURCE_CLASSES), flush=True)
    result = subprocess.run(pretrain_command(out, data, size, workers, device))
    if result.returncode != 0:
        raise FinetuneError(f"pre-training failed (exit {result.returncode}); see the output above")
    return best


README_START = "<!-- demo-results:start"
README_END = "<!-- demo-results:end -->"


def update_readme(readme: Path, comparison: dict, compare_dir: Path, size: DemoSize) -> None:
    """Replace README's demo-results section with this run's table and plots."""
    import os
    import platform
    import shutil

    docs = readme.parent / "docs" / "demo"
    docs.mkdir(parents=True, exist_ok=True)
    for png in ("map_per_epoch.png", "time_memory.png"):
        shutil.copyfile(compare_dir / png, docs / png)
    text = readme.read_text()
    start, end = text.index(README_START), text.index(README_END)
    start_line_end = text.index("\n", start) + 1
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    body = (
        f"yolov5n pre-trained on synthetic {', '.join(SOURCE_CLASSES)} ({size.source_train} images, "
        f"{size.pretrain_epochs} epochs), then fine-tuned on {', '.join(TARGET_CLASSES)} ({size.target_train} images, "
        f"{size.finetune_epochs} epochs, imgsz {size.imgsz}, batch {size.batch}) on this project's CI-class machine "
        f"({machine}, no GPU):\n\n"
        + comparison["markdown"]
        + "\n![mAP@0.5:0.95 per epoch](docs/demo/map_per_epoch.png)\n"
        + "![time per epoch and peak memory](docs/demo/time_memory.png)\n"
    )
    readme.write_text(text[:start_line_end] + body + text[end:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="where everything goes (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a reduced size for CI: fewer images and epochs")
    add_train_arguments(p, only=("workers", "device"))
    p.add_argument("--metrics-port", type=int, default=9400, help="live metrics port (default: 9400, else a free one)")
    p.add_argument("--update-readme", type=Path, default=None, metavar="README",
                   help="copy the table and plots into README's demo-results section (and docs/demo/)")
    args = p.parse_args(argv)
    size = QUICK if args.quick else FULL
    try:
        out = args.out
        source = make_synthetic_dataset(out / "data" / "source", classes=list(SOURCE_CLASSES), n_train=size.source_train,
                                        n_val=size.source_val, imgsz=size.data_imgsz, seed=1)
        target = make_synthetic_dataset(out / "data" / "target", classes=list(TARGET_CLASSES), n_train=size.target_train,
                                        n_val=size.target_val, imgsz=size.data_imgsz, seed=2)
        weights = pretrain(out / "pretrain", source, size, args.workers, args.device)
        print("\n=== fine-tuning on the target classes " + ", ".join(TARGET_CLASSES)
              + " at freeze 0 / backbone / all-but-detect", flush=True)
        compare_args = argparse.Namespace(
            data=target, model="yolov5n", weights=weights, freeze="0,backbone,all-but-detect",
            epochs=size.finetune_epochs, batch=size.batch, imgsz=size.imgsz, workers=args.workers, cache="ram",
            seed=0, hyp={"nbs": 16, "warmup_epochs": 1}, device=args.device,
            metrics_port=free_port(args.metrics_port), out=out / "compare", reuse=False)
        comparison = run_compare(compare_args)
        if args.update_readme:
            update_readme(args.update_readme, comparison, out / "compare", size)
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
