"""The hyperparameters of a training run: one table of names, defaults, allowed ranges and meanings.

Names and defaults follow YOLOv5's fine-tuning conventions, so a user's ``--hyp`` overrides
carry across. The trainer (``--hyp KEY=VALUE``, augmentation, loss) and the operator
(``spec.training.hyperparameters``) check values against this one table, so the operator
rejects exactly what the trainer would. Standard library only: the operator image has no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from finetune.errors import FinetuneError


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter: its default and the (finite) values it may take."""

    name: str
    default: float
    minimum: float
    maximum: float
    meaning: str
    min_inclusive: bool = True
    max_inclusive: bool = True

    @property
    def allowed(self) -> str:
        """The allowed values in words: ``in [0, 1)`` or ``>= 1``."""
        if math.isinf(self.maximum):
            return f"{'>=' if self.min_inclusive else '>'} {self.minimum:g}"
        return (f"in {'[' if self.min_inclusive else '('}{self.minimum:g}, "
                f"{self.maximum:g}{']' if self.max_inclusive else ')'}")

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value >= self.minimum if self.min_inclusive else value > self.minimum
        below = value <= self.maximum if self.max_inclusive else value < self.maximum
        return above and below


def _closed(name: str, default: float, maximum: float, meaning: str) -> Hyperparameter:
    """Allowed: [0, maximum]."""
    return Hyperparameter(name, default, 0.0, maximum, meaning)


def _below(name: str, default: float, maximum: float, meaning: str) -> Hyperparameter:
    """Allowed: [0, maximum)."""
    return Hyperparameter(name, default, 0.0, maximum, meaning, max_inclusive=False)


def _at_least(name: str, default: float, minimum: float, meaning: str, inclusive: bool = True) -> Hyperparameter:
    return Hyperparameter(name, default, minimum, math.inf, meaning, min_inclusive=inclusive)


# Defaults suit fine-tuning: mild colour jitter, small translation, moderate zoom, flips,
# no rotation/shear, and mosaic off (it fights the small-dataset regime fine-tuning is for).
HYPERPARAMETERS: tuple[Hyperparameter, ...] = (
    # optimizer and schedule
    _at_least("lr0", 0.01, 0.0, "initial learning rate, e.g. 0.01 for SGD, 0.001 for AdamW", inclusive=False),
    _closed("lrf", 0.01, 1.0, "final learning rate as a fraction of lr0"),
    _below("momentum", 0.937, 1.0, "SGD momentum / AdamW beta1"),
    _at_least("weight_decay", 5e-4, 0.0, "weight decay, scaled by batch x accumulate / nbs"),
    _at_least("warmup_epochs", 3.0, 0.0, "epochs of learning-rate and momentum warm-up (fractions allowed)"),
    _below("warmup_momentum", 0.8, 1.0, "momentum at the start of warm-up"),
    _at_least("warmup_bias_lr", 0.1, 0.0, "bias learning rate at the start of warm-up"),
    _at_least("nbs", 64.0, 1.0, "nominal batch size: gradients are accumulated up to it"),
    # loss
    _at_least("box", 0.05, 0.0, "box (CIoU) loss gain"),
    _at_least("cls", 0.5, 0.0, "class loss gain"),
    _at_least("cls_pw", 1.0, 0.0, "positive-sample weight of the class BCE", inclusive=False),
    _at_least("obj", 1.0, 0.0, "objectness loss gain"),
    _at_least("obj_pw", 1.0, 0.0, "positive-sample weight of the objectness BCE", inclusive=False),
    _at_least("anchor_t", 4.0, 1.0, "anchor matching: the largest box/anchor side ratio an anchor takes",
              inclusive=False),
    _below("label_smoothing", 0.0, 1.0, "class label smoothing epsilon"),
    # augmentation
    _below("hsv_h", 0.015, 1.0, "hue shift, fraction of the colour circle (±)"),
    _below("hsv_s", 0.7, 1.0, "saturation gain (±fraction)"),
    _below("hsv_v", 0.4, 1.0, "value/brightness gain (±fraction)"),
    _closed("degrees", 0.0, 180.0, "rotation (±degrees)"),
    _below("translate", 0.1, 1.0, "translation (±fraction of the image size)"),
    _below("scale", 0.5, 1.0, "zoom gain (±fraction)"),
    _closed("shear", 0.0, 45.0, "shear (±degrees)"),
    _closed("fliplr", 0.5, 1.0, "probability of a left-right flip"),
    _closed("flipud", 0.0, 1.0, "probability of an up-down flip"),
    _closed("mosaic", 0.0, 1.0, "probability of a 4-image mosaic"),
    # weight averaging and validation
    Hyperparameter("ema_decay", 0.9999, 0.0, 1.0, "decay the weights' moving average ramps up to",
                   min_inclusive=False, max_inclusive=False),
    _at_least("ema_tau", 2000.0, 0.0, "moving-average ramp-up time constant, in optimizer steps", inclusive=False),
    _closed("conf_thres", 0.001, 1.0, "validation confidence threshold"),
    _closed("iou_thres", 0.6, 1.0, "validation NMS IoU threshold"),
)
BY_NAME: Mapping[str, Hyperparameter] = {h.name: h for h in HYPERPARAMETERS}


def defaults() -> dict[str, float]:
    """A fresh ``{name: default}`` dict of every hyperparameter."""
    return {h.name: h.default for h in HYPERPARAMETERS}


def problem(name: str, value: object) -> str | None:
    """Why ``value`` is not allowed for ``name`` (one sentence naming the range and meaning), or None."""
    spec = BY_NAME.get(name)
    if spec is None:
        return f"unknown hyperparameter {name!r} (known: {', '.join(sorted(BY_NAME))})"
    number = _number(value)
    if number is None or not spec.contains(number):
        return f"{name} ({spec.meaning}) must be a number {spec.allowed}, got {value!r}"
    return None


def check(name: str, value: object) -> float:
    """``value`` as a float, or a FinetuneError saying what ``name`` may be."""
    why = problem(name, value)
    if why is not None:
        raise FinetuneError(f"hyperparameter {why}")
    return float(value)  # type: ignore[arg-type]


def resolve(overrides: Mapping[str, object] | None) -> dict[str, float]:
    """The defaults overlaid with checked ``overrides``."""
    out = defaults()
    for name, value in (overrides or {}).items():
        out[name] = check(name, value)
    return out


def _number(value: object) -> float | None:
    if isinstance(value, bool):  # YAML's true/false are not numbers here
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def markdown_table() -> str:
    """The table as Markdown, for docs/trainer-contract.md."""
    rows = ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    rows += [f"| `{h.name}` | {h.default:g} | {h.allowed} | {h.meaning} |" for h in HYPERPARAMETERS]
    return "\n".join(rows)
