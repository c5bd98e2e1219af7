"""`finetune` command line: train, val, synth, compare.

Every user-fixable problem is a `FinetuneError`: printed as one `error: ...` line, exit 2.
Under torchrun each rank runs this same entry point.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .config import WORKERS_HELP, workers_arg
from .errors import EXIT_USAGE, FinetuneError


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _freeze(value: str) -> str:
    v = value.strip()
    if v.isdigit() or v in ("backbone", "all-but-detect"):
        return v
    raise argparse.ArgumentTypeError(f"expected a module count N, 'backbone' or 'all-but-detect', got {value!r}")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path, help="YOLO data.yaml (path, train, val, names/nc)")
    p.add_argument("--model", default="yolov5s",
                   help="yolov5n|yolov5s|yolov5m|yolov5l|yolov5x or a model YAML of the same form (default: yolov5s)")
    p.add_argument("--weights", type=Path, default=None,
                   help="pretrained weights: a finetune checkpoint or an Ultralytics YOLOv5 .pt (default: random init)")
    p.add_argument("--freeze", type=_freeze, default="0",
                   help="freeze modules 0..N-1; 'backbone' (modules of the backbone, 10 for YOLOv5) or "
                        "'all-but-detect' (everything but the Detect layer, 24); 0 trains everything (default: 0)")
    p.add_argument("--freeze-bn", type=_bool, default=True, metavar="true|false",
                   help="keep frozen BatchNorm layers' running statistics fixed (default: true; false = YOLOv5's "
                        "behaviour, where they drift)")
    p.add_argument("--epochs", type=int, default=50, help="epochs to train (default: 50)")
    p.add_argument("--batch", type=int, default=16,
                   help="global batch size over all ranks; must be divisible by the world size (default: 16)")
    p.add_argument("--imgsz", type=int, default=640, help="train/val image size in pixels, a multiple of 32 (default: 640)")
    p.add_argument("--optimizer", choices=("SGD", "AdamW"), default="SGD", help="optimizer (default: SGD)")
    p.add_argument("--lr0", type=float, default=None, help="initial learning rate (default: hyp lr0 = 0.01)")
    p.add_argument("--lr-schedule", choices=("cosine", "linear"), default="cosine",
                   help="learning-rate decay to lr0*lrf over the run (default: cosine)")
    p.add_argument("--patience", type=int, default=0,
                   help="stop after this many epochs without mAP@0.5:0.95 improvement; 0 = never (default: 0)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="mixed precision on CUDA: auto = bf16 where supported else fp16; ignored on CPU (default: auto)")
    p.add_argument("--cache", choices=("none", "ram"), default="none",
                   help="keep decoded, resized images in RAM (default: none)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--hyp", action="append", default=[], metavar="KEY=VALUE",
                   help="override one hyperparameter (repeatable), e.g. --hyp mosaic=1.0 --hyp warmup_epochs=1")
    p.add_argument("--workers", type=workers_arg, default=None, metavar="N|auto", help=WORKERS_HELP)
    p.add_argument("--out", required=True, type=Path,
                   help="run directory for last.pt, best.pt, results.csv and metrics.json")
    p.add_argument("--name", default=None, help="run name (default: the --out directory's name)")
    p.add_argument("--resume", nargs="?", const="must", choices=("must", "auto"), default=None,
                   help="continue from OUT/last.pt; --resume=auto continues only if it exists (what the operator passes)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="rank 0 serves Prometheus metrics on this port for the whole run")
    p.add_argument("--metrics-linger", type=float, default=0.0, metavar="SECONDS",
                   help="keep serving the final metrics this long after training ends, so a scraper "
                        "sees the last epoch (default: 0)")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="one line per epoch as text or JSON when not on a terminal (default: text)")
    p.add_argument("--progress", type=_bool, default=None, metavar="true|false",
                   help="force the progress bar on or off (default: on when stderr is a terminal)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto = this rank's GPU when CUDA is available, else CPU (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tune YOLOv5 detectors with layer freezing.")
    sub = parser.add_subparsers(dest="command", required=True)

    p_train = sub.add_parser("train", help="fine-tune a detector (runs unchanged under torchrun)",
                             description="Fine-tune a YOLOv5 detector; the same command runs under torchrun.")
    add_train_arguments(p_train)

    p_val = sub.add_parser("val", help="evaluate weights on a dataset's val split (COCO mAP)")
    p_val.add_argument("--data", required=True, type=Path, help="YOLO data.yaml")
    p_val.add_argument("--weights", required=True, type=Path, help="a finetune checkpoint or an Ultralytics YOLOv5 .pt")
    p_val.add_argument("--imgsz", type=int, default=640, help="image size (default: 640)")
    p_val.add_argument("--batch", type=int, default=16, help="batch size (default: 16)")
    p_val.add_argument("--conf-thres", type=float, default=0.001, help="confidence threshold (default: 0.001)")
    p_val.add_argument("--iou-thres", type=float, default=0.6, help="NMS IoU threshold (default: 0.6)")
    p_val.add_argument("--save-json", type=Path, default=None, help="write predictions in COCO results format here")
    p_val.add_argument("--workers", type=workers_arg, default=None, metavar="N|auto", help=WORKERS_HELP)
    p_val.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device (default: auto)")

    p_synth = sub.add_parser("synth", help="write a deterministic synthetic shapes dataset with a data.yaml")
    p_synth.add_argument("--out", required=True, type=Path, help="output directory")
    p_synth.add_argument("--classes", default=None,
                         help="comma-separated shape classes, e.g. circle,square,triangle (default: all)")
    p_synth.add_argument("--train", type=int, default=200, help="training images (default: 200)")
    p_synth.add_argument("--val", type=int, default=50, help="validation images (default: 50)")
    p_synth.add_argument("--imgsz", type=int, default=320, help="image width in pixels (default: 320)")
    p_synth.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")

    p_cmp = sub.add_parser("compare", help="fine-tune at freeze 0 / backbone / all-but-detect and compare")
    from .compare import add_compare_arguments

    add_compare_arguments(p_cmp)
    return parser


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from .config import TrainConfig, parse_hyp_overrides
        from .train import train

        cfg = TrainConfig(
            data=args.data, out=args.out, model=args.model, weights=args.weights, freeze=args.freeze,
            freeze_bn=args.freeze_bn, epochs=args.epochs, batch=args.batch, imgsz=args.imgsz,
            optimizer=args.optimizer, lr0=args.lr0, lr_schedule=args.lr_schedule, patience=args.patience,
            amp=args.amp, cache=args.cache, seed=args.seed, hyp=parse_hyp_overrides(args.hyp),
            workers=args.workers, name=args.name, resume=args.resume, metrics_port=args.metrics_port,
            metrics_linger=args.metrics_linger,
            log_format=args.log_format, device=args.device, progress=args.progress,
        )
        train(cfg)
        return 0
    if args.command == "val":
        from .validate import validate

        metrics = validate(args.data, args.weights, imgsz=args.imgsz, batch=args.batch, conf_thres=args.conf_thres,
                           iou_thres=args.iou_thres, save_json=args.save_json, workers=args.workers,
                           device=args.device)
        print(json.dumps(metrics, indent=2))
        return 0
    if args.command == "synth":
        from .data.synth import make_synthetic_dataset

        classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
        path = make_synthetic_dataset(args.out, classes=classes, n_train=args.train, n_val=args.val,
                                      imgsz=args.imgsz, seed=args.seed)
        print(path)
        return 0
    if args.command == "compare":
        from .compare import run_compare

        run_compare(args)
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except FinetuneError as exc:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
