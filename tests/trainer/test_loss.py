"""YoloLoss: matching rules, loss behaviour and that it can actually be minimised."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from finetune.loss import YoloLoss, match_anchors, neighbour_cells

STRIDES = [8.0, 16.0, 32.0]
PIXEL_ANCHORS = torch.tensor(
    [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
    dtype=torch.float32,
).view(3, 3, 2)
GRID_ANCHORS = PIXEL_ANCHORS / torch.tensor(STRIDES).view(3, 1, 1)
IMGSZ = 64


def make_preds(bs: int = 2, nc: int = 3, scale: float = 1.0, requires_grad: bool = False):
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(bs, 3, IMGSZ // int(s), IMGSZ // int(s), nc + 5, generator=g) * scale).requires_grad_(
            requires_grad
        )
        for s in STRIDES
    ]


def make_targets(nc: int = 3) -> torch.Tensor:
    return torch.tensor(
        [
            [0, 0 % nc, 0.50, 0.50, 0.30, 0.40],
            [0, 1 % nc, 0.20, 0.70, 0.10, 0.08],
            [1, 2 % nc, 0.80, 0.30, 0.60, 0.50],
            [1, 0, 0.05, 0.95, 0.04, 0.06],
        ]
    )


def make_loss(nc: int = 3, hyp=None) -> YoloLoss:
    return YoloLoss(nc, GRID_ANCHORS, STRIDES, hyp, IMGSZ)


def test_loss_finite_and_positive_with_targets():
    loss, items = make_loss()(make_preds(), make_targets())
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    assert items.shape == (3,) and not items.requires_grad
    assert (items > 0).all()
    # total = sum of the items times the batch size
    assert math.isclose(loss.item(), items.sum().item() * 2, rel_tol=1e-5)


def test_empty_targets_only_objectness():
    preds = make_preds(requires_grad=True)
    loss, items = make_loss()(preds, torch.zeros(0, 6))
    assert items[0] == 0 and items[2] == 0 and items[1] > 0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in preds)


def test_gradient_reaches_every_level():
    preds = make_preds(requires_grad=True)
    loss, _ = make_loss()(preds, make_targets())
    loss.backward()
    for p in preds:
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert p.grad[..., :4].abs().sum() > 0  # box terms get gradient
        assert p.grad[..., 5:].abs().sum() > 0  # class terms get gradient


def test_single_class_has_no_class_loss():
    loss, items = make_loss(nc=1)(make_preds(nc=1), make_targets(nc=1))
    assert items[2] == 0 and items[0] > 0 and items[1] > 0 and torch.isfinite(loss)


def test_hyp_gains_scale_components():
    base = make_loss()(make_preds(), make_targets())[1]
    doubled = make_loss(hyp={"box": 0.1, "cls": 1.0, "obj": 2.0, "lr0": 0.01})(make_preds(), make_targets())[1]
    torch.testing.assert_close(doubled, base * 2)


def test_optimising_raw_predictions_lowers_loss():
    torch.manual_seed(0)
    preds = [nn.Parameter(p) for p in make_preds(scale=0.1)]
    loss_fn, targets = make_loss(), make_targets()
    opt = torch.optim.Adam(preds, lr=0.1)
    first = None
    for _ in range(50):
        loss, items = loss_fn(preds, targets)
        first = first if first is not None else items.clone()
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = loss_fn(preds, targets)[1]
    assert last.sum() < 0.25 * first.sum()
    assert last[0] < 0.5 * first[0]  # boxes really fitted, not just objectness


def test_autocast_computes_in_float32():
    preds = [p.bfloat16() for p in make_preds()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, items = make_loss()(preds, make_targets())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    ref = make_loss()([p.float() for p in preds], make_targets())[1]
    torch.testing.assert_close(items, ref)


def test_match_anchors_ratio_rule():
    anchors = torch.tensor([[2.0, 2.0], [8.0, 1.0]])
    wh = torch.tensor([[7.9, 2.0], [8.0, 2.0], [10.0, 2.0], [2.0, 0.45], [2.0, 2.0]])
    m = match_anchors(wh, anchors, anchor_t=4.0)
    assert m.shape == (2, 5)
    # ratio to anchor 0: 3.95, 4 (not < 4), 5, 4.44, 1
    assert m[0].tolist() == [True, False, False, False, True]
    # ratio to anchor 1: max(0.99,2)=2, 2, max(1.25,2)=2, max(4,2.2)=4, 4
    assert m[1].tolist() == [True, True, True, False, False]


def test_build_targets_excludes_mismatched_anchor():
    loss_fn = YoloLoss(2, torch.tensor([[[1.0, 1.0], [6.0, 6.0], [1.0, 6.0]]]), [8.0])
    preds = [torch.zeros(1, 3, 8, 8, 7)]
    # a 5x5-cell box: anchor 0 ratio 5 (rejected), anchor 1 ratio 1.2, anchor 2 ratio 5 (rejected)
    t = loss_fn.build_targets(preds, torch.tensor([[0, 1, 0.5, 0.5, 5 / 8, 5 / 8]]))[0]
    assert set(t.anchor.tolist()) == {1}
    assert t.cls.tolist() == [1] * len(t.cls)


def test_neighbour_cells_up_to_three():
    gxy = torch.tensor([[3.2, 5.7], [0.3, 0.3], [7.8, 7.8], [4.5, 4.5]])
    use = neighbour_cells(gxy, torch.tensor([8.0, 8.0]))
    # rows: centre, left, up, right, down
    assert use[:, 0].tolist() == [True, True, False, False, True]  # left of x, below in y
    assert use[:, 1].tolist() == [True, False, False, False, False]  # no cells outside grid
    assert use[:, 2].tolist() == [True, False, False, False, False]
    assert (use.sum(0) <= 3).all()


def test_assigned_cells_reach_the_centre():
    loss_fn = make_loss()
    preds = make_preds()
    for level, t in zip(preds, loss_fn.build_targets(preds, make_targets())):
        ny, nx = level.shape[2:4]
        assert ((t.gx >= 0) & (t.gx < nx) & (t.gy >= 0) & (t.gy < ny)).all()
        # decoded xy = 2*sigmoid - 0.5 spans (-0.5, 1.5): every target offset must lie in it
        assert ((t.box[:, :2] >= -0.5) & (t.box[:, :2] <= 1.5)).all()


def test_from_model_reads_detect_module():
    class Detect(nn.Module):
        def __init__(self):
            super().__init__()
            self.nc, self.nl, self.na = 3, 3, 3
            self.register_buffer("anchors", GRID_ANCHORS.clone())
            self.register_buffer("stride", torch.tensor(STRIDES))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(nn.Identity(), Detect())

    loss_fn = YoloLoss.from_model(Model(), {"box": 0.05}, IMGSZ)
    assert loss_fn.nc == 3 and loss_fn.nl == 3
    torch.testing.assert_close(loss_fn(make_preds(), make_targets())[1], make_loss()(make_preds(), make_targets())[1])


@pytest.mark.parametrize("imgsz", [64, 1280])
def test_obj_gain_scales_with_image_size(imgsz):
    loss_fn = YoloLoss(3, GRID_ANCHORS, STRIDES, None, imgsz)
    assert math.isclose(loss_fn.obj_gain, (imgsz / 640) ** 2)
    assert math.isclose(loss_fn.cls_gain, 0.5 * 3 / 80)
