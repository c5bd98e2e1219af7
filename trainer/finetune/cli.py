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

from .config import add_train_arguments
from .errors import EXIT_STOPPED, EXIT_USAGE, FinetuneError, Interrupted
from .hyperparameters import BY_NAME as HYPERPARAMETERS


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
    for key in ("conf_thres", "iou_thres"):  # the defaults training validates with
        hyp = HYPERPARAMETERS[key]
        p_val.add_argument("--" + key.replace("_", "-"), type=float, default=hyp.default,
                           help=f"{hyp.meaning} (default: {hyp.default:g})")
    p_val.add_argument("--save-json", type=Path, default=None, help="write predictions in COCO results format here")
    add_train_arguments(p_val, only=("workers", "device"))

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
        from .config import TrainConfig
        from .train import train

        train(TrainConfig.from_namespace(args))
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


def _rank_prefix() -> str:
    rank = os.environ.get("RANK")
    return f"[rank {rank}] " if rank not in (None, "0") else ""


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except FinetuneError as exc:
        print(f"{_rank_prefix()}error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Interrupted as exc:  # SIGTERM, after the position was saved: retryable, resume continues
        print(f"{_rank_prefix()}{exc}", file=sys.stderr)
        return EXIT_STOPPED


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
