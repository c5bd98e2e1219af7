"""Layer freezing: which parameters train, and how frozen BatchNorm layers behave.

Freezing depth ``N`` freezes modules ``model.model[0..N-1]`` (their parameters get
``requires_grad=False`` and are left out of the optimizer). The policy is recorded on the
model itself (``frozen_depth``, ``freeze_bn``) so that:

* ``DetectionModel.train()`` keeps the frozen modules' BatchNorm layers in eval mode when
  ``freeze_bn`` is true -- their running statistics stay exactly as pretrained, however
  often the training loop calls ``model.train()`` (YOLOv5 lets them drift);
* ``DetectionModel.forward`` runs the frozen prefix under ``torch.no_grad()``, so its
  activations are not kept for backward and peak memory falls as more is frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from finetune.errors import FinetuneError


@dataclass(frozen=True)
class FreezeInfo:
    """What ``freeze_modules`` did; parameter counts are numbers of elements."""

    depth: int
    frozen_params: int
    trainable_params: int
    frozen_modules: tuple[str, ...]  # e.g. ("model.0 (Conv)", ...)
    freeze_bn: bool = True


def unwrap_model(model: nn.Module) -> nn.Module:
    """Accept a DDP / DataParallel wrapper and return the DetectionModel inside."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def freeze_modules(model: nn.Module, depth: int, freeze_bn: bool = True) -> FreezeInfo:
    """Freeze modules ``0..depth-1``; unfreeze the rest (so calling it again is safe)."""
    model = unwrap_model(model)
    count = len(model.model)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise FinetuneError(
            f"invalid freeze depth {depth!r}; use a depth from 0 to {count - 1}"
        )
    if depth >= count:  # Detect is last, so nothing would be left to train
        raise FinetuneError(
            f"freeze depth {depth} freezes all {count} modules and leaves nothing to train; "
            f"use at most {count - 1} (all-but-detect)"
        )
    for i, module in enumerate(model.model):
        for p in module.parameters():
            p.requires_grad_(i >= depth)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.frozen_depth = depth
    model.freeze_bn = bool(freeze_bn)
    model.train(model.training)  # re-apply the BatchNorm policy to the current mode
    names = tuple(f"model.{i} ({type(m).__name__})" for i, m in enumerate(model.model[:depth]))
    return FreezeInfo(depth, frozen, trainable, names, bool(freeze_bn))


def set_train_mode(model: nn.Module) -> nn.Module:
    """Put the model in train mode with the freeze policy applied.

    ``DetectionModel.train()`` already applies the policy; this is the explicit spelling
    for callers holding a wrapper.
    """
    model.train()
    return model
