"""The one configuration object of a training run, and the default hyperparameters.

Hyperparameter names and defaults follow YOLOv5's fine-tuning conventions so that users
can carry their `--hyp` overrides across; `--hyp KEY=VALUE` overrides one of them.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FinetuneError

DEFAULT_HYP: dict[str, float] = {
    "lr0": 0.01,  # initial learning rate (SGD; AdamW uses --lr0 0.001 typically)
    "lrf": 0.01,  # final LR = lr0 * lrf
    "momentum": 0.937,  # SGD momentum / Adam beta1
    "weight_decay": 5e-4,  # scaled by batch*accumulate/nbs
    "warmup_epochs": 3.0,
    "warmup_momentum": 0.8,
    "warmup_bias_lr": 0.1,
    "nbs": 64,  # nominal batch size: gradients are accumulated up to it
    "box": 0.05,
    "cls": 0.5,
    "cls_pw": 1.0,
    "obj": 1.0,
    "obj_pw": 1.0,
    "anchor_t": 4.0,
    "label_smoothing": 0.0,
    "hsv_h": 0.015,
    "hsv_s": 0.7,
    "hsv_v": 0.4,
    "degrees": 0.0,
    "translate": 0.1,
    "scale": 0.5,
    "shear": 0.0,
    "fliplr": 0.5,
    "flipud": 0.0,
    "mosaic": 0.0,
    "ema_decay": 0.9999,
    "ema_tau": 2000.0,
    "conf_thres": 0.001,  # validation
    "iou_thres": 0.6,  # validation NMS
}


def parse_hyp_overrides(items: list[str] | None) -> dict[str, float]:
    """`["lr0=0.002", "mosaic=1"]` -> {"lr0": 0.002, "mosaic": 1.0}, refusing unknown keys."""
    out: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise FinetuneError(f"--hyp {item!r}: expected KEY=VALUE, e.g. --hyp lr0=0.002")
        if key not in DEFAULT_HYP:
            raise FinetuneError(f"--hyp {key}: unknown hyperparameter; known: {', '.join(sorted(DEFAULT_HYP))}")
        try:
            out[key] = float(value)
        except ValueError:
            raise FinetuneError(f"--hyp {item!r}: value must be a number") from None
    return out


def workers_arg(value: str) -> int | None:
    """``--workers``: a process count, or ``auto`` (None) for :func:`auto_workers`."""
    v = value.strip().lower()
    if v == "auto":
        return None
    if v.isdigit():
        return int(v)
    raise argparse.ArgumentTypeError(f"expected a number of processes (0 = load in the training process) or 'auto', got {value!r}")


WORKERS_HELP = ("data-loader processes per rank; 0 loads in the training process; auto = one per spare core on "
                "CUDA (at most 8), on CPU 0 up to 2 cores per rank, else one per 4 cores (default: auto)")


def workers_text(workers: int | None) -> str:
    """The ``--workers`` value that means ``workers`` (for the commands we start)."""
    return "auto" if workers is None else str(workers)


@dataclass
class TrainConfig:
    data: Path
    out: Path
    model: str = "yolov5s"
    weights: Path | None = None
    freeze: str = "0"
    freeze_bn: bool = True
    epochs: int = 50
    batch: int = 16  # global batch over all ranks
    imgsz: int = 640
    optimizer: str = "SGD"
    lr0: float | None = None  # None: hyp lr0
    lr_schedule: str = "cosine"
    patience: int = 0
    amp: str = "auto"
    cache: str = "none"
    seed: int = 0
    hyp: dict[str, float] = field(default_factory=dict)
    workers: int | None = None  # data-loader processes per rank; None = auto_workers()
    name: str | None = None
    resume: str | None = None  # None, "must" or "auto"
    metrics_port: int | None = None
    metrics_linger: float = 0.0  # seconds the endpoint stays up after the run
    log_format: str = "text"
    device: str = "auto"
    progress: bool | None = None  # None: a progress bar when stderr is a terminal
    val_interval: int = 1

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self.out = Path(self.out)
        if self.weights is not None:
            self.weights = Path(self.weights)
        self.freeze = str(self.freeze)
        if self.name is None:
            self.name = self.out.resolve().name
        if self.epochs < 1:
            raise FinetuneError("--epochs must be at least 1")
        if self.batch < 1:
            raise FinetuneError("--batch must be at least 1")
        if self.imgsz < 32 or self.imgsz % 32:
            raise FinetuneError(f"--imgsz {self.imgsz}: must be a positive multiple of 32 (the model's largest stride)")
        if self.optimizer not in ("SGD", "AdamW"):
            raise FinetuneError(f"--optimizer {self.optimizer}: choose SGD or AdamW")

    @property
    def hyperparameters(self) -> dict[str, float]:
        merged = {**DEFAULT_HYP, **self.hyp}
        if self.lr0 is not None:
            merged["lr0"] = self.lr0
        return merged

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
