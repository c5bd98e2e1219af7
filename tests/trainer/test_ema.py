"""The weight EMA: YOLOv5's ramped decay over trainable weights and BatchNorm statistics."""

from __future__ import annotations

import math

import torch
from torch import nn

from finetune.freeze import freeze_modules, set_train_mode
from finetune.models import build_model
from finetune.train import ModelEMA


def reference_ema(avg: dict[str, torch.Tensor], current: dict[str, torch.Tensor], updates: int, decay: float,
                  tau: float) -> None:
    """The plain definition over the whole state dict, as YOLOv5 writes it."""
    d = decay * (1 - math.exp(-updates / tau))
    for k, v in current.items():
        if v.is_floating_point():
            avg[k].mul_(d).add_(v, alpha=1 - d)
        else:
            avg[k].copy_(v)


def test_ema_matches_the_definition_and_skips_nothing_that_moves():
    torch.manual_seed(0)
    model = build_model("yolov5n", nc=3)
    freeze_modules(model, 10, freeze_bn=False)  # frozen BatchNorm statistics still move here
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    decay, tau = 0.99, 3.0  # a short ramp so that the decay matters within a few steps
    ema = ModelEMA(model, decay, tau)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = [k for k, v in model.named_parameters() if not v.requires_grad]
    for step in range(5):
        set_train_mode(model)
        preds = model(torch.rand(2, 3, 64, 64))
        sum(p.square().mean() for p in preds).backward()
        opt.step()
        opt.zero_grad()
        ema.update_parameters(model)
        reference_ema(reference, model.state_dict(), step, decay, tau)
    assert ema.updates == 5
    averaged = ema.module.state_dict()
    for k, v in reference.items():
        torch.testing.assert_close(averaged[k], v, rtol=1e-5, atol=1e-6, msg=k)
    # The test is only worth something if weights, statistics and counters all moved.
    current = model.state_dict()
    assert not torch.equal(current["model.24.m.0.weight"], initial["model.24.m.0.weight"])
    assert not torch.equal(averaged["model.24.m.0.weight"], current["model.24.m.0.weight"])  # it lags
    assert not torch.equal(averaged["model.0.bn.running_mean"], initial["model.0.bn.running_mean"])
    assert int(averaged["model.0.bn.num_batches_tracked"]) == 5
    assert frozen
    for k in frozen:
        assert torch.equal(current[k], initial[k]) and torch.equal(averaged[k], initial[k]), k


def test_ema_rebinds_when_given_another_model():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    ema = ModelEMA(a, decay=0.5, tau=1e-9)  # d = 0.5 from the second update on
    ema.update_parameters(a)  # the first update copies
    ema.update_parameters(b)
    torch.testing.assert_close(ema.module.weight, (a.weight + b.weight) / 2)
