"""Validation: NMS, mapping boxes back to the original images, and COCO metrics.

mAP comes from pycocotools' COCOeval (the reference implementation every published
number uses), fed with in-memory COCO structures. Boxes are evaluated in original-image
pixels, so letterboxing cannot change the score and ``--save-json`` output is directly
comparable with other tools.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_convert

from .errors import FinetuneError
from .feature_cache import model_input

MAX_NMS_CANDIDATES = 30000  # boxes per image handed to NMS, highest scores first
MAX_PR_THRESHOLDS = 1000  # score thresholds tried when choosing the P/R operating point

Prediction = dict[str, Tensor]  # boxes (n,4) xyxy, scores (n,), labels (n,)


# ---------------------------------------------------------------------------- NMS
def non_max_suppression(
    pred: Tensor,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 300,
    multi_label: bool = False,
) -> list[Tensor]:
    """Per-image class-aware NMS of eval-mode output ``(bs, N, 5+nc)``.

    Rows are ``cx, cy, w, h, obj, cls_1..cls_nc`` (pixels, sigmoid scores). A box's score
    is ``obj * cls``; with ``multi_label`` a box may survive once per class above
    ``conf_thres``, otherwise only with its best class. Returns per image a (n, 6) tensor
    ``x1, y1, x2, y2, score, class``, best first, at most ``max_det`` rows.
    """
    out = []
    for x in pred.float():
        x = x[x[:, 4] > conf_thres]
        scores = x[:, 5:] * x[:, 4:5]
        boxes = box_convert(x[:, :4], "cxcywh", "xyxy")
        if multi_label:
            i, j = (scores > conf_thres).nonzero(as_tuple=True)
            det = torch.cat([boxes[i], scores[i, j, None], j[:, None].float()], 1)
        else:
            conf, j = scores.max(1, keepdim=True)
            det = torch.cat([boxes, conf, j.float()], 1)[conf.view(-1) > conf_thres]
        det = det[det[:, 4].argsort(descending=True)[:MAX_NMS_CANDIDATES]]
        keep = batched_nms(det[:, :4], det[:, 4], det[:, 5].long(), iou_thres)[:max_det]
        out.append(det[keep])
    return out


# ---------------------------------------------------------------------------- coordinates
def _ratio_xy(meta: Mapping[str, Any]) -> tuple[float, float]:
    r = meta["ratio"]
    if isinstance(r, (tuple, list)):
        return float(r[0]), float(r[1])
    return float(r), float(r)


def scale_boxes_to_original(boxes_xyxy: Tensor, meta: Mapping[str, Any]) -> Tensor:
    """Map xyxy boxes from letterboxed-image pixels to original-image pixels.

    Inverse of the letterbox: ``orig = (letterboxed - pad) / ratio``, then clipped to the
    original image (``meta['orig_shape'] = (h0, w0)``). Returns a new tensor.
    """
    rx, ry = _ratio_xy(meta)
    padw, padh = (float(v) for v in meta["pad"])
    h0, w0 = (float(v) for v in meta["orig_shape"])
    b = boxes_xyxy.detach().float().clone()
    b[:, [0, 2]] = ((b[:, [0, 2]] - padw) / rx).clamp(0, w0)
    b[:, [1, 3]] = ((b[:, [1, 3]] - padh) / ry).clamp(0, h0)
    return b


def scale_targets_to_original(
    targets_xywhn: Tensor, meta: Mapping[str, Any], img_hw: Sequence[int]
) -> Tensor:
    """Map normalised cx, cy, w, h (relative to the letterboxed image of size ``img_hw``)
    to xyxy boxes in original-image pixels."""
    h, w = (float(v) for v in img_hw)
    gain = torch.tensor([w, h, w, h], dtype=torch.float32, device=targets_xywhn.device)
    xyxy = box_convert(targets_xywhn.float() * gain, "cxcywh", "xyxy")
    return scale_boxes_to_original(xyxy, meta)


# ---------------------------------------------------------------------------- COCO metrics
def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _coco_annotations(boxes: Any, labels: Any, image_id: int, first_id: int) -> list[dict]:
    """COCO-format GT annotations (xywh, area = w*h, iscrowd 0, ids from ``first_id``)."""
    b = _to_numpy(boxes).reshape(-1, 4).astype(np.float64)
    wh = b[:, 2:] - b[:, :2]
    return [
        {
            "id": first_id + k,
            "image_id": image_id,
            "category_id": int(c),
            "bbox": [float(b[k, 0]), float(b[k, 1]), float(wh[k, 0]), float(wh[k, 1])],
            "area": float(wh[k, 0] * wh[k, 1]),
            "iscrowd": 0,
        }
        for k, c in enumerate(_to_numpy(labels).reshape(-1))
    ]


def _coco_detections(pred: Mapping[str, Any], image_id: int) -> list[dict]:
    b = _to_numpy(pred["boxes"]).reshape(-1, 4).astype(np.float64)
    scores = _to_numpy(pred["scores"]).reshape(-1)
    labels = _to_numpy(pred["labels"]).reshape(-1)
    return [
        {
            "image_id": image_id,
            "category_id": int(labels[k]),
            "bbox": [float(b[k, 0]), float(b[k, 1]), float(b[k, 2] - b[k, 0]), float(b[k, 3] - b[k, 1])],
            "score": float(scores[k]),
        }
        for k in range(len(scores))
    ]


def _run_cocoeval(gt_dataset: dict, detections: list[dict]):
    """Evaluate with pycocotools, silencing its progress prints."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_dataset
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _zero_metrics() -> dict[str, float]:
    return {"map50": 0.0, "map50_95": 0.0, "precision": 0.0, "recall": 0.0}


def coco_metrics(
    predictions: Sequence[Mapping[str, Any]],
    ground_truths: Sequence[Mapping[str, Any]],
    nc: int,
) -> dict[str, float]:
    """mAP@0.5, mAP@0.5:0.95, precision and recall of detections against ground truth.

    ``predictions[i]`` (boxes xyxy (n,4), scores (n,), labels (n,)) and
    ``ground_truths[i]`` (boxes, labels) describe image ``i``; labels are 0..nc-1.

    mAP is pycocotools' COCOeval with default bbox parameters (101-point interpolated
    precision, at most 100 detections per image, all areas): ``map50_95 = stats[0]``,
    ``map50 = stats[1]``. Classes without ground truth do not count (COCO's rule), so
    predictions of absent classes neither help nor hurt mAP.

    Precision and recall are reported the way YOLOv5 reports them: a single operating
    point. Using COCOeval's own matching at IoU 0.5 (area "all", 100 detections per
    image), each class's precision and recall are computed as functions of a score
    threshold ``t`` (detections with score >= t); precision is 0 when a class has no
    detection above ``t``. The threshold maximising the mean F1 over classes with ground
    truth is chosen (from the detection scores; at most ``MAX_PR_THRESHOLDS`` of them,
    evenly spaced by rank), and the mean precision and mean recall over those classes at
    that threshold are returned.

    With no ground truth or no predictions at all, every metric is 0.
    """
    if len(predictions) != len(ground_truths):
        raise FinetuneError(
            f"coco_metrics: {len(predictions)} prediction entries but {len(ground_truths)} "
            "ground-truth entries; pass one of each per image"
        )
    annotations: list[dict] = []
    for i, gt in enumerate(ground_truths):
        annotations += _coco_annotations(gt["boxes"], gt["labels"], i, len(annotations) + 1)
    detections = [d for i, p in enumerate(predictions) for d in _coco_detections(p, i)]
    if not annotations or not detections:
        return _zero_metrics()
    gt_dataset = {
        "images": [{"id": i} for i in range(len(ground_truths))],
        "annotations": annotations,
        "categories": [{"id": c, "name": str(c)} for c in range(nc)],
    }
    ev = _run_cocoeval(gt_dataset, detections)
    precision, recall = _best_f1_precision_recall(ev)
    return {
        "map50": max(float(ev.stats[1]), 0.0),
        "map50_95": max(float(ev.stats[0]), 0.0),
        "precision": precision,
        "recall": recall,
    }


def _matches_per_class(ev) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
    """Per class: detection scores, true-positive flags at IoU 0.5, number of GT.

    Read from COCOeval's per-image results for area "all" at the largest maxDet, so the
    matching is exactly the one mAP uses (ignored detections are dropped).
    """
    p = ev.params
    area_all, max_det, n_iou = p.areaRng[0], p.maxDets[-1], len(p.iouThrs)
    scores: dict[int, list[np.ndarray]] = {}
    tps: dict[int, list[np.ndarray]] = {}
    npos: dict[int, int] = {}
    for e in ev.evalImgs:
        if e is None or e["aRng"] != area_all or e["maxDet"] != max_det:
            continue
        c = e["category_id"]
        keep = ~np.asarray(e["dtIgnore"], dtype=bool).reshape(n_iou, -1)[0]
        matched = np.asarray(e["dtMatches"]).reshape(n_iou, -1)[0] > 0  # iouThrs[0] = 0.5
        scores.setdefault(c, []).append(np.asarray(e["dtScores"], dtype=np.float64)[keep])
        tps.setdefault(c, []).append(matched[keep])
        npos[c] = npos.get(c, 0) + int(np.count_nonzero(~np.asarray(e["gtIgnore"], dtype=bool)))
    return {c: (np.concatenate(scores[c]), np.concatenate(tps[c]), npos[c]) for c in npos}


def _best_f1_precision_recall(ev) -> tuple[float, float]:
    """Mean P and R over classes with GT at the score threshold maximising mean F1."""
    classes = [v for v in _matches_per_class(ev).values() if v[2] > 0]
    all_scores = np.concatenate([s for s, _, _ in classes]) if classes else np.zeros(0)
    if not classes or all_scores.size == 0:
        return 0.0, 0.0
    thresholds = np.unique(all_scores)[::-1]
    if len(thresholds) > MAX_PR_THRESHOLDS:
        pick = np.linspace(0, len(thresholds) - 1, MAX_PR_THRESHOLDS).round().astype(int)
        thresholds = thresholds[pick]
    precision = np.zeros((len(classes), len(thresholds)))
    recall = np.zeros_like(precision)
    for k, (scores, tp, npos) in enumerate(classes):
        order = np.argsort(-scores, kind="mergesort")
        cum_tp = np.concatenate([[0], np.cumsum(tp[order])])
        n_det = np.searchsorted(-scores[order], -thresholds, side="right")  # score >= t
        precision[k] = cum_tp[n_det] / np.maximum(n_det, 1)
        recall[k] = cum_tp[n_det] / npos
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-16)
    best = int(np.argmax(f1.mean(0)))
    return float(precision[:, best].mean()), float(recall[:, best].mean())


# ---------------------------------------------------------------------------- JSON export
def to_coco_results(
    predictions: Sequence[Mapping[str, Any]],
    metas: Sequence[Mapping[str, Any]],
    class_ids: Sequence[int] | None = None,
) -> list[dict]:
    """COCO results-file entries for ``--save-json``.

    ``predictions[i]`` are boxes in original-image pixels for the image ``metas[i]``;
    ``image_id`` comes from the meta, ``category_id = class_ids[label]`` (identity when
    ``class_ids`` is None, e.g. pass the COCO 80→91 id map for COCO val).
    """
    results = []
    for pred, meta in zip(predictions, metas, strict=True):
        for det in _coco_detections(pred, int(meta["image_id"])):
            if class_ids is not None:
                det["category_id"] = int(class_ids[det["category_id"]])
            det["bbox"] = [round(v, 3) for v in det["bbox"]]
            det["score"] = round(det["score"], 5)
            results.append(det)
    return results


# ---------------------------------------------------------------------------- evaluation loop
def _unpack_batch(batch: Any) -> tuple[Tensor, Tensor, list[dict]]:
    if isinstance(batch, Mapping):
        return batch["images"], batch["targets"], list(batch["metas"])
    images, targets, metas = batch[:3]
    return images, targets, list(metas)


def _batch_records(
    det: list[Tensor], targets: Tensor, metas: list[dict], img_hw: Sequence[int]
) -> list[dict]:
    """One record per image: predictions and GT in original pixels (numpy), and the meta."""
    targets = targets.detach().float().cpu()
    records = []
    for i, (d, meta) in enumerate(zip(det, metas)):
        d = d.detach().float().cpu()
        t = targets[targets[:, 0] == i]
        records.append(
            {
                "image_id": int(meta["image_id"]),
                "meta": meta,
                "pred": {
                    "boxes": scale_boxes_to_original(d[:, :4], meta).numpy(),
                    "scores": d[:, 4].numpy(),
                    "labels": d[:, 5].long().numpy(),
                },
                "gt": {
                    "boxes": scale_targets_to_original(t[:, 2:6], meta, img_hw).numpy(),
                    "labels": t[:, 1].long().numpy(),
                },
            }
        )
    return records


def _gather_records(records: list[dict]) -> list[dict] | None:
    """Collect every rank's records on rank 0, keeping one record per image_id.

    DistributedSampler pads the last shard with repeated images; deduplication removes
    them so each image counts once. Returns the records on rank 0 and None elsewhere.
    """
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(records, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    unique: dict[int, dict] = {}
    for recs in gathered:
        for r in recs:
            unique.setdefault(r["image_id"], r)
    return sorted(unique.values(), key=lambda r: r["image_id"])


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    dataloader: Any,
    device: torch.device | str,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 300,
    amp_dtype: torch.dtype | None = None,
    distributed: bool = False,
) -> tuple[dict[str, float], list[Prediction], list[dict]]:
    """Run validation and return ``(metrics, predictions, metas)``.

    ``model`` in eval mode returns ``(pred, raw)``; images (uint8) are scaled to 0..1 on
    ``device``; autocast to ``amp_dtype`` when given. Predictions after NMS and GT are
    mapped to original-image pixels and scored with :func:`coco_metrics` (``nc`` is read
    from the prediction width). ``predictions[i]`` (dict boxes/scores/labels, numpy, xyxy
    original pixels) belongs to ``metas[i]``.

    With ``distributed`` every rank evaluates its shard; rank 0 gathers, de-duplicates by
    ``image_id`` and computes the metrics, which are broadcast so every rank returns the
    same dict. Predictions/metas returned are the merged set on rank 0 and the rank's own
    shard elsewhere.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    records: list[dict] = []
    nc = None
    try:
        for batch in dataloader:
            images, targets, metas = _unpack_batch(batch)
            inputs = model_input(images, device)  # images, or cached frozen-prefix outputs (feature_cache)
            with _autocast(device, amp_dtype):
                out = model(inputs)
            pred = out[0] if isinstance(out, (tuple, list)) else out
            nc = pred.shape[-1] - 5
            det = non_max_suppression(pred, conf_thres, iou_thres, max_det)
            records += _batch_records(det, targets, metas, images.shape[-2:])
    finally:
        model.train(was_training)
    return _finish(records, nc, distributed)


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def _finish(records, nc, distributed):
    """Compute (on rank 0 when distributed) and share the metrics."""
    local = records
    if distributed:
        import torch.distributed as dist

        nc_all = [None] * dist.get_world_size()
        dist.all_gather_object(nc_all, nc)
        nc = next((n for n in nc_all if n is not None), None)
        records = _gather_records(records)
    metrics = None
    if records is not None:
        metrics = coco_metrics([r["pred"] for r in records], [r["gt"] for r in records], nc or 0)
    if distributed:
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
        if records is None:
            records = local
    return metrics, [r["pred"] for r in records], [r["meta"] for r in records]
