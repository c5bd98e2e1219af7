"""YOLOv5-style detection loss: anchor matching, CIoU box loss, objectness and class BCE.

The method (written from its published description, not from any implementation):

* Each ground-truth box is offered to every anchor of every detection level. An anchor
  takes it when the box is not too different in shape: ``max(w/aw, aw/w, h/ah, ah/h)``
  must be below ``anchor_t`` (4.0). Shape, not IoU, decides, so one box can train several
  anchors and levels.
* Besides the cell containing the box centre, the box is also given to the neighbouring
  cell on the x side and on the y side its centre is nearest to (up to 3 cells per anchor).
  That is why predicted centres are decoded as ``sigmoid * 2 - 0.5`` (range -0.5..1.5):
  a neighbour cell must be able to reach the centre.
* Box regression uses the complete IoU (CIoU) of the decoded box; the (detached, clamped
  at 0) IoU is also the objectness target of the matched cell, so objectness learns to
  predict localisation quality. Objectness BCE is weighted per level (small objects
  matter more); classes use one-hot BCE, skipped for single-class models.
* Gains are rescaled by the number of levels, classes and image size so the same
  hyperparameters work for other model sizes and resolutions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert, complete_box_iou_loss

from finetune import hyperparameters

# Objectness weight per level, P3 (stride 8) first: there are many more small-object
# cells, and they are harder, so their objectness counts more.
_BALANCE = {3: [4.0, 1.0, 0.4]}
_BALANCE_OTHER = [4.0, 1.0, 0.25, 0.06, 0.02]
# Candidate cells: the centre cell, then the left, upper, right and lower neighbours.
_CELL_OFFSETS = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=torch.float32)
_NEIGHBOUR_G = 0.5  # a neighbour is used when the centre is within this of the shared edge


class LevelTargets(NamedTuple):
    """The positives of one detection level, one row per (target, anchor, cell)."""

    image: Tensor  # (n,) index in batch
    anchor: Tensor  # (n,) anchor index 0..na-1
    gy: Tensor  # (n,) cell row
    gx: Tensor  # (n,) cell column
    box: Tensor  # (n, 4) target xywh in grid units, xy relative to the cell's corner
    anchor_wh: Tensor  # (n, 2) the anchor's wh in grid units
    cls: Tensor  # (n,) class index


def match_anchors(target_wh: Tensor, anchors: Tensor, anchor_t: float = 4.0) -> Tensor:
    """Which anchors may predict which targets: ``(na, nt)`` bool.

    ``target_wh`` (nt, 2) and ``anchors`` (na, 2) are in the same units (grid cells).
    A pair matches when neither side is more than ``anchor_t`` times the other in width
    or height, i.e. the anchor can reach the box with ``(2*sigmoid)^2 <= 4`` scaling.
    """
    ratio = target_wh[None] / anchors[:, None]  # (na, nt, 2)
    worst = torch.maximum(ratio, 1.0 / ratio).amax(dim=2)
    return worst < anchor_t


def neighbour_cells(gxy: Tensor, grid_wh: Tensor, g: float = _NEIGHBOUR_G) -> Tensor:
    """Which of the 5 candidate cells (centre, left, up, right, down) each centre uses.

    ``gxy`` (n, 2) are centres in grid units. Returns (5, n) bool. The centre cell is
    always used; a neighbour is used when the centre lies in the half of its cell next to
    that neighbour and the neighbour is inside the grid. At most one x and one y
    neighbour can be true, so a target gets up to 3 cells.
    """
    frac = gxy % 1.0
    low = (frac < g) & (gxy >= 1.0)  # left / up neighbour exists and is nearer
    high = (frac > 1.0 - g) & (gxy < grid_wh - 1.0)  # right / down neighbour
    centre = torch.ones_like(low[:, 0])
    return torch.stack([centre, low[:, 0], low[:, 1], high[:, 0], high[:, 1]])


class YoloLoss:
    """YOLOv5 loss for a detection head with ``nl`` levels and ``na`` anchors per level.

    ``anchors`` are (nl, na, 2) in grid units (pixel anchors divided by the stride), as the
    Detect module stores them. ``__call__`` returns ``(loss * batch_size, [box, obj, cls])``;
    the batch-size scaling keeps gradient magnitudes comparable to the reference recipe
    (its hyperparameters were tuned that way).
    """

    def __init__(
        self,
        detect_nc: int,
        anchors: Tensor,
        strides: Sequence[float] | Tensor,
        hyp: Mapping[str, float] | None = None,
        imgsz: int = 640,
    ) -> None:
        self.nc = int(detect_nc)
        self.anchors = torch.as_tensor(anchors, dtype=torch.float32).detach().clone()
        self.nl, self.na = self.anchors.shape[:2]
        self.strides = torch.as_tensor(strides, dtype=torch.float32).flatten().tolist()
        h = {**hyperparameters.defaults(), **(dict(hyp) if hyp else {})}
        self.hyp = h
        scale = 3.0 / self.nl
        self.box_gain = float(h["box"]) * scale
        self.cls_gain = float(h["cls"]) * self.nc / 80.0 * scale
        self.obj_gain = float(h["obj"]) * (imgsz / 640.0) ** 2 * scale
        self.anchor_t = float(h["anchor_t"])
        eps = float(h["label_smoothing"])
        self.cls_pos, self.cls_neg = 1.0 - 0.5 * eps, 0.5 * eps
        self.cls_pw, self.obj_pw = float(h["cls_pw"]), float(h["obj_pw"])
        self.balance = _BALANCE.get(self.nl, _BALANCE_OTHER[: self.nl])

    @classmethod
    def from_model(cls, model: nn.Module, hyp: Mapping[str, float] | None = None, imgsz: int = 640):
        """Build from a DetectionModel (or a DDP wrapper of one): reads ``model.model[-1]``."""
        model = getattr(model, "module", model)
        detect = model.model[-1]
        return cls(detect.nc, detect.anchors, detect.stride, hyp, imgsz)

    # ------------------------------------------------------------------ matching
    def build_targets(self, preds: Sequence[Tensor], targets: Tensor) -> list[LevelTargets]:
        """Assign targets (idx, cls, cx, cy, w, h normalised) to anchors and cells per level."""
        device = preds[0].device
        targets = targets.to(device=device, dtype=torch.float32).reshape(-1, 6)
        offsets = _CELL_OFFSETS.to(device)
        out = []
        for i, p in enumerate(preds):
            ny, nx = p.shape[2], p.shape[3]
            grid_wh = torch.tensor([nx, ny], device=device, dtype=torch.float32)
            anchors = self.anchors[i].to(device)
            xywh = targets[:, 2:6] * grid_wh.repeat(2)
            ok = match_anchors(xywh[:, 2:4], anchors, self.anchor_t)  # (na, nt)
            a_idx, t_idx = ok.nonzero(as_tuple=True)
            gxy = xywh[t_idx, :2]
            use = neighbour_cells(gxy, grid_wh)  # (5, n)
            o_idx, m_idx = use.nonzero(as_tuple=True)
            t_idx, a_idx, gxy = t_idx[m_idx], a_idx[m_idx], gxy[m_idx]
            cell = (gxy - offsets[o_idx]).floor()
            cell = torch.minimum(cell.clamp_(min=0), grid_wh - 1)
            box = torch.cat([gxy - cell, xywh[t_idx, 2:4]], dim=1)
            cell = cell.long()
            out.append(
                LevelTargets(
                    image=targets[t_idx, 0].long(),
                    anchor=a_idx,
                    gy=cell[:, 1],
                    gx=cell[:, 0],
                    box=box,
                    anchor_wh=anchors[a_idx],
                    cls=targets[t_idx, 1].long(),
                )
            )
        return out

    # ------------------------------------------------------------------ loss
    def __call__(self, preds: Sequence[Tensor], targets: Tensor) -> tuple[Tensor, Tensor]:
        """Loss of raw head outputs ``preds`` (nl tensors (bs, na, ny, nx, nc+5)).

        Computed in float32 with autocast off, whatever the caller's precision.
        """
        device = preds[0].device
        with torch.autocast(device_type=device.type, enabled=False):
            preds = [p.float() for p in preds]
            matches = self.build_targets(preds, targets)
            zero = torch.zeros((), device=device)
            lbox, lobj, lcls = zero, zero, zero
            for p, t, balance in zip(preds, matches, self.balance):
                box_l, cls_l, tobj = self._level_positives(p, t)
                lbox = lbox + box_l
                lcls = lcls + cls_l
                lobj = lobj + self._bce(p[..., 4], tobj, self.obj_pw) * balance
            lbox = lbox * self.box_gain
            lobj = lobj * self.obj_gain
            lcls = lcls * self.cls_gain
            bs = preds[0].shape[0]
            total = (lbox + lobj + lcls) * bs
        return total, torch.stack([lbox, lobj, lcls]).detach()

    def _level_positives(self, p: Tensor, t: LevelTargets) -> tuple[Tensor, Tensor, Tensor]:
        """Box and class loss of one level's positives, and its objectness target map."""
        tobj = torch.zeros(p.shape[:4], device=p.device, dtype=p.dtype)
        zero = p.new_zeros(())
        if t.image.numel() == 0:
            return zero, zero, tobj
        ps = p[t.image, t.anchor, t.gy, t.gx]  # (n, nc+5)
        pxy = ps[:, :2].sigmoid() * 2.0 - 0.5
        pwh = (ps[:, 2:4].sigmoid() * 2.0) ** 2 * t.anchor_wh
        pbox = box_convert(torch.cat([pxy, pwh], 1), "cxcywh", "xyxy")
        tbox = box_convert(t.box, "cxcywh", "xyxy")
        ciou_loss = complete_box_iou_loss(pbox, tbox, reduction="none")
        box_l = ciou_loss.mean()
        iou = (1.0 - ciou_loss).detach().clamp(min=0)
        # Several targets can land in one cell: keep the best IoU (deterministic).
        flat = ((t.image * p.shape[1] + t.anchor) * p.shape[2] + t.gy) * p.shape[3] + t.gx
        tobj.view(-1).scatter_reduce_(0, flat, iou.to(tobj.dtype), reduce="amax")
        cls_l = zero
        if self.nc > 1:
            tcls = torch.full_like(ps[:, 5:], self.cls_neg)
            tcls[torch.arange(len(t.cls), device=p.device), t.cls] = self.cls_pos
            cls_l = self._bce(ps[:, 5:], tcls, self.cls_pw)
        return box_l, cls_l, tobj

    @staticmethod
    def _bce(logits: Tensor, target: Tensor, pos_weight: float) -> Tensor:
        pw = torch.tensor([pos_weight], device=logits.device, dtype=logits.dtype)
        return nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=pw)
