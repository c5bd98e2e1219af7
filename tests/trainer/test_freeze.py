"""Layer freezing: frozen parameters and BatchNorm statistics survive real training steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finetune.errors import FinetuneError
from finetune.freeze import FreezeInfo, freeze_modules, set_train_mode
from finetune.hyperparameters import defaults as default_hyperparameters
from finetune.models.config import resolve_freeze
from finetune.models.yolo import DetectionModel
from finetune.train import build_optimizer

IMGSZ = 64


@pytest.fixture
def model() -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel("yolov5n", nc=2)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 1) -> None:
    """Real forward/backward/SGD steps in train mode with a loss touching every output."""
    for _ in range(steps):
        set_train_mode(model)
        outputs = model(torch.rand(2, 3, IMGSZ, IMGSZ))
        loss = sum((o ** 2).mean() for o in outputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def training_optimizer(model: nn.Module, lr0: float = 0.1) -> torch.optim.Optimizer:
    """The optimizer `finetune train` builds (SGD, its parameter groups), at a learning rate that moves weights."""
    return build_optimizer(model, "SGD", {**default_hyperparameters(), "lr0": lr0}, batch=2, accumulate=1)


def optimized_parameters(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def module_index(key: str) -> int:
    return int(key.split(".")[1])


def test_freeze_backbone_keeps_params_and_bn_stats_bit_identical(model):
    info = freeze_modules(model, resolve_freeze("backbone", model.yaml))
    assert isinstance(info, FreezeInfo) and info.depth == 10 and info.freeze_bn
    before = snapshot(model)
    optimizer = training_optimizer(model)
    train_step(model, optimizer, steps=2)
    after = model.state_dict()
    for key, old in before.items():
        if module_index(key) < 10:
            assert torch.equal(after[key], old), f"frozen {key} changed"
        elif key.endswith(("running_mean", "running_var", "num_batches_tracked", "weight", "bias")):
            assert not torch.equal(after[key], old), f"trainable {key} did not change"
    for name, p in model.named_parameters():
        assert p.requires_grad == (module_index(name) >= 10)
        if module_index(name) < 10:
            assert p.grad is None


def test_freeze_bn_false_lets_frozen_statistics_move(model):
    freeze_modules(model, 10, freeze_bn=False)
    before = snapshot(model)
    optimizer = training_optimizer(model)
    train_step(model, optimizer)
    after = model.state_dict()
    for key, old in before.items():
        if module_index(key) < 10:
            moved = torch.equal(after[key], old) is False
            is_stat = key.endswith(("running_mean", "running_var", "num_batches_tracked"))
            assert moved == is_stat, key  # stats drift as in YOLOv5; parameters never


def test_bn_policy_survives_every_train_call(model):
    freeze_modules(model, 10)
    for _ in range(2):
        model.eval()
        model.train()
        for i, m in enumerate(model.model):
            for bn in (s for s in m.modules() if isinstance(s, nn.BatchNorm2d)):
                assert bn.training == (i >= 10)
    wrapped = nn.DataParallel(model)  # a wrapper's train() reaches the model's train()
    wrapped.eval()
    set_train_mode(wrapped)
    assert not model.model[0].bn.training and model.model[10].bn.training
    model.eval()
    assert not any(m.training for m in model.modules())


def test_optimizer_receives_only_trainable_parameters(model):
    info = freeze_modules(model, 10)
    params = optimized_parameters(training_optimizer(model))
    frozen_ids = {id(p) for m in model.model[:10] for p in m.parameters()}
    assert params and not frozen_ids & {id(p) for p in params}
    assert sum(p.numel() for p in params) == info.trainable_params
    total = sum(p.numel() for p in model.parameters())
    assert info.frozen_params + info.trainable_params == total
    assert info.frozen_params == sum(p.numel() for m in model.model[:10] for p in m.parameters())
    assert info.frozen_modules[0] == "model.0 (Conv)" and len(info.frozen_modules) == 10
    # Every trainable parameter is optimized, each once.
    assert len(params) == len({id(p) for p in params})
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}


def test_all_but_detect_trains_only_the_head(model):
    info = freeze_modules(model, resolve_freeze("all-but-detect", model.yaml))
    head = model.model[-1]
    assert info.depth == 24
    assert info.trainable_params == sum(p.numel() for p in head.parameters())
    assert {id(p) for p in optimized_parameters(training_optimizer(model))} == {id(p) for p in head.parameters()}


def test_refreeze_shallower_unfreezes(model):
    freeze_modules(model, 20)
    info = freeze_modules(model, 3)
    assert info.depth == 3 and model.frozen_depth == 3
    assert model.model[5].conv.weight.requires_grad and not model.model[2].cv1.conv.weight.requires_grad
    model.train()
    assert model.model[5].bn.training and not model.model[0].bn.training
    info = freeze_modules(model, 0)
    assert info.frozen_params == 0 and info.frozen_modules == ()
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("depth", [25, 26, -1])
def test_too_deep_or_negative_freeze_is_a_user_error(model, depth):
    with pytest.raises(FinetuneError, match="24"):
        freeze_modules(model, depth)
    assert model.frozen_depth == 0 and all(p.requires_grad for p in model.parameters())
    with pytest.raises(FinetuneError, match="0 to 24"):
        resolve_freeze(depth, model.yaml)


def test_frozen_prefix_runs_without_autograd(model):
    """Even with an input that requires grad, frozen modules record no graph."""
    seen = {}
    for i in (9, 10):
        model.model[i].register_forward_hook(
            lambda m, inp, out, i=i: seen.__setitem__(i, out.requires_grad))
    x = torch.rand(1, 3, IMGSZ, IMGSZ, requires_grad=True)
    model.train()(x)
    assert seen == {9: True, 10: True}
    freeze_modules(model, 10)
    model(x)
    assert seen == {9: False, 10: True}
    outputs = model(x)
    sum(o.sum() for o in outputs).backward()
    assert x.grad is None


def saved_activation_bytes(model: nn.Module) -> int:
    """Bytes autograd keeps for backward during one training forward pass."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.train()(torch.rand(2, 3, IMGSZ, IMGSZ, requires_grad=True))
    return total


def test_saved_activations_shrink_as_more_is_frozen(model):
    saved = []
    for depth in (0, 10, 24):
        freeze_modules(model, depth)
        saved.append(saved_activation_bytes(model))
    assert saved[0] > saved[1] > saved[2] > 0
