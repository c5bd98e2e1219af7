"""Evaluation: COCO metrics against independent references, NMS, coordinates, the loop."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset

from finetune.evaluate import (
    coco_metrics,
    evaluate,
    non_max_suppression,
    scale_boxes_to_original,
    scale_targets_to_original,
    to_coco_results,
)

# ---------------------------------------------------------------------------- random scenes
W, H = 640.0, 480.0


def random_boxes(rng: np.random.Generator, n: int, min_wh: float = 4.0, max_wh: float = 200.0) -> np.ndarray:
    """n xyxy boxes inside the image."""
    wh = rng.uniform(min_wh, max_wh, size=(n, 2))
    xy = rng.uniform(0, 1, size=(n, 2)) * (np.array([W, H]) - wh)
    return np.concatenate([xy, xy + wh], 1)


def jitter(rng: np.random.Generator, boxes: np.ndarray, amount: float) -> np.ndarray:
    wh = boxes[:, 2:] - boxes[:, :2]
    noise = rng.normal(0, amount, size=boxes.shape) * np.concatenate([wh, wh], 1)
    out = boxes + noise
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2] + 1.0)
    return out


def random_case(seed: int, nc: int = 4):
    """Images with GT and predictions mixing hits, near-duplicates, misses and noise.

    Seeds cycle through scene styles: sparse, crowded (many overlapping boxes), only some
    classes present in GT, and high-jitter predictions; some images have no GT or no
    predictions.
    """
    rng = np.random.default_rng(seed)
    style = seed % 4
    gts, preds = [], []
    present = rng.choice(nc, size=max(1, nc - 2), replace=False) if style == 2 else np.arange(nc)
    for img in range(int(rng.integers(2, 7))):
        if style == 1:  # crowded: clusters of overlapping boxes
            centre = random_boxes(rng, 1, 100, 200)
            m = int(rng.integers(10, 25))
            g = jitter(rng, np.repeat(centre, m, 0), 0.15)
        else:
            m = int(rng.integers(0, 8)) if img % 3 else 0  # every third image: no GT
            g = random_boxes(rng, m)
        g = np.clip(g, 0, [W, H, W, H])
        gl = rng.choice(present, size=len(g))
        gts.append({"boxes": g, "labels": gl})

        parts_b, parts_l = [], []
        if img != 1 and len(g):  # image 1: no predictions at all
            hit = rng.random(len(g)) < 0.8
            parts_b.append(jitter(rng, g[hit], 0.03 if style != 3 else 0.2))
            parts_l.append(np.where(rng.random(hit.sum()) < 0.9, gl[hit], rng.integers(0, nc, hit.sum())))
            dup = rng.random(len(g)) < 0.3  # near-duplicates of GT
            parts_b.append(jitter(rng, g[dup], 0.01))
            parts_l.append(gl[dup])
        n_fp = int(rng.integers(0, 6))
        parts_b.append(random_boxes(rng, n_fp))
        parts_l.append(rng.integers(0, nc, n_fp))  # may be classes absent from GT
        b = np.concatenate(parts_b) if img != 1 else np.zeros((0, 4))
        lab = np.concatenate(parts_l) if img != 1 else np.zeros(0, int)
        scores = rng.choice([rng.uniform(0.001, 1.0), 0.5], size=len(b)) if style == 0 else rng.uniform(0.001, 1, len(b))
        preds.append({"boxes": b, "scores": scores, "labels": lab})
    return preds, gts


def write_reference_json(tmp_path, preds, gts, nc):
    """COCO files built independently of finetune.evaluate (xyxy -> xywh by hand)."""
    images, anns, results = [], [], []
    for i, g in enumerate(gts):
        images.append({"id": i + 1, "width": W, "height": H, "file_name": f"{i}.jpg"})
        for (x1, y1, x2, y2), c in zip(g["boxes"].tolist(), g["labels"].tolist()):
            anns.append(
                {"id": len(anns) + 1, "image_id": i + 1, "category_id": c + 1, "iscrowd": 0,
                 "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}
            )
    for i, p in enumerate(preds):
        for (x1, y1, x2, y2), s, c in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            results.append({"image_id": i + 1, "category_id": c + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    gt_file, dt_file = tmp_path / "gt.json", tmp_path / "dt.json"
    cats = [{"id": c + 1, "name": f"c{c}", "supercategory": "x"} for c in range(nc)]
    gt_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    dt_file.write_text(json.dumps(results))
    return str(gt_file), str(dt_file)


def faster_coco_eval_stats(gt_file, dt_file):
    from faster_coco_eval import COCO, COCOeval_faster

    quiet = lambda *a, **k: None  # noqa: E731
    gt = COCO(gt_file, print_function=quiet)
    ev = COCOeval_faster(gt, gt.loadRes(dt_file), "bbox", print_function=quiet)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats


def pycocotools_stats(gt_file, dt_file):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_file)
        ev = COCOeval(gt, gt.loadRes(dt_file), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("seed", range(24))
def test_map_matches_faster_coco_eval(seed, tmp_path):
    nc = 4
    preds, gts = random_case(seed, nc)
    ours = coco_metrics(preds, gts, nc)
    stats = faster_coco_eval_stats(*write_reference_json(tmp_path, preds, gts, nc))
    assert ours["map50"] == pytest.approx(max(stats[1], 0), abs=1e-4)
    assert ours["map50_95"] == pytest.approx(max(stats[0], 0), abs=1e-4)
    assert 0 <= ours["precision"] <= 1 and 0 <= ours["recall"] <= 1


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_map_matches_pycocotools_from_files(seed, tmp_path):
    nc = 4
    preds, gts = random_case(seed, nc)
    ours = coco_metrics(preds, gts, nc)
    stats = pycocotools_stats(*write_reference_json(tmp_path, preds, gts, nc))
    assert ours["map50"] == pytest.approx(stats[1], abs=1e-6)
    assert ours["map50_95"] == pytest.approx(stats[0], abs=1e-6)


def test_random_cases_cover_the_edge_cases():
    """The seeded scenes really contain what the comparison claims to cover."""
    seen = {"no_gt_image": False, "no_pred_image": False, "absent_class_pred": False, "crowded": False}
    for seed in range(24):
        preds, gts = random_case(seed)
        present = set(np.concatenate([g["labels"] for g in gts]).tolist())
        seen["no_gt_image"] |= any(len(g["labels"]) == 0 for g in gts)
        seen["no_pred_image"] |= any(len(p["scores"]) == 0 for p in preds)
        seen["absent_class_pred"] |= any(set(p["labels"].tolist()) - present for p in preds)
        seen["crowded"] |= any(len(g["labels"]) >= 10 for g in gts)
    assert all(seen.values()), seen


# ---------------------------------------------------------------------------- P / R
def _gt(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}


def _pred(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


GT_BOXES = [[10, 10, 50, 60], [100, 100, 180, 150], [200, 40, 260, 120], [300, 300, 400, 420]]


def test_perfect_predictions():
    gts = [_gt(GT_BOXES, [0, 1, 2, 1]), _gt(GT_BOXES[:2], [2, 0])]
    preds = [_pred(g["boxes"].tolist(), [0.9] * len(g["labels"]), g["labels"].tolist()) for g in gts]
    m = coco_metrics(preds, gts, 3)
    assert m == pytest.approx({"map50": 1, "map50_95": 1, "precision": 1, "recall": 1})


def test_no_predictions_and_no_ground_truth_are_zero():
    gts = [_gt(GT_BOXES, [0, 1, 2, 1])]
    empty = [_pred([], [], [])]
    assert coco_metrics(empty, gts, 3) == {"map50": 0, "map50_95": 0, "precision": 0, "recall": 0}
    none_gt = [_gt(np.zeros((0, 4)), [])]
    preds = [_pred(GT_BOXES, [0.5] * 4, [0, 1, 2, 1])]
    assert coco_metrics(preds, none_gt, 3) == {"map50": 0, "map50_95": 0, "precision": 0, "recall": 0}
    assert coco_metrics([], [], 3)["map50"] == 0


def test_half_ground_truth_missed():
    gts = [_gt(GT_BOXES, [0, 0, 0, 0])]
    preds = [_pred(GT_BOXES[:2], [0.8, 0.7], [0, 0])]
    m = coco_metrics(preds, gts, 1)
    assert m["recall"] == pytest.approx(0.5) and m["precision"] == pytest.approx(1.0)
    assert m["map50"] == pytest.approx(0.5, abs=0.01)


def test_precision_recall_at_best_f1_threshold():
    # scores .9 TP, .8 FP, .7 TP, .6 FP over 4 GT: F1 is best at t=.7 (P=2/3, R=1/2)
    far = [[500, 400, 520, 420], [560, 400, 580, 420]]
    boxes = [GT_BOXES[0], far[0], GT_BOXES[1], far[1]]
    m = coco_metrics([_pred(boxes, [0.9, 0.8, 0.7, 0.6], [0] * 4)], [_gt(GT_BOXES, [0] * 4)], 1)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(0.5)


def test_precision_recall_averages_classes_with_ground_truth_only():
    gts = [_gt(GT_BOXES[:2], [0, 1])]
    # class 0 found, class 1 missed, class 2 (no GT) predicted: ignored for P/R
    preds = [_pred([GT_BOXES[0], GT_BOXES[3]], [0.9, 0.95], [0, 2])]
    m = coco_metrics(preds, gts, 3)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------- NMS
def _eval_rows(rows, nc):
    """rows of (cx, cy, w, h, obj, cls) -> (1, n, 5+nc) with one-hot class scores."""
    out = torch.zeros(1, len(rows), 5 + nc)
    for k, (cx, cy, w, h, obj, c) in enumerate(rows):
        out[0, k, :5] = torch.tensor([cx, cy, w, h, obj])
        out[0, k, 5 + c] = 1.0
    return out


def test_nms_suppresses_same_class_keeps_other_class():
    pred = _eval_rows([(50, 50, 40, 40, 0.9, 0), (52, 50, 40, 40, 0.8, 0), (50, 52, 40, 40, 0.7, 1)], 2)
    (det,) = non_max_suppression(pred, iou_thres=0.5)
    assert det.shape == (2, 6)
    assert det[:, 5].tolist() == [0, 1] and det[:, 4].tolist() == pytest.approx([0.9, 0.7])
    torch.testing.assert_close(det[0, :4], torch.tensor([30.0, 30, 70, 70]))


def test_nms_conf_threshold_and_max_det():
    rows = [(20 * k + 10, 10, 8, 8, 0.105 + 0.02 * k, k % 3) for k in range(20)]
    pred = _eval_rows(rows, 3).repeat(2, 1, 1)
    dets = non_max_suppression(pred, conf_thres=0.3, max_det=5)
    assert len(dets) == 2
    for det in dets:
        assert len(det) == 5 and (det[:, 4] > 0.3).all()
        assert (det[:-1, 4] >= det[1:, 4]).all()
    assert len(non_max_suppression(pred, conf_thres=0.3)[0]) == 10  # scores .305 .. .485


def test_nms_score_is_obj_times_class_and_multi_label():
    pred = torch.tensor([[[50.0, 50, 20, 20, 0.5, 0.6, 0.4]]])
    (det,) = non_max_suppression(pred)
    assert det[0, 4].item() == pytest.approx(0.3) and det[0, 5].item() == 0
    (multi,) = non_max_suppression(pred, multi_label=True)
    assert sorted(multi[:, 5].tolist()) == [0, 1]
    assert non_max_suppression(torch.zeros(1, 0, 7))[0].shape == (0, 6)


# ---------------------------------------------------------------------------- coordinates
META = {"path": "a.jpg", "image_id": 7, "orig_shape": (300, 500), "ratio": 0.64, "pad": (0.0, 64.0)}


def letterbox_boxes(boxes, meta):
    r, (pw, ph) = meta["ratio"], meta["pad"]
    return boxes * r + torch.tensor([pw, ph, pw, ph])


def test_boxes_round_trip_to_original():
    orig = torch.tensor([[0.0, 0, 500, 300], [10, 20, 110, 220], [250.5, 33.25, 260, 40]])
    back = scale_boxes_to_original(letterbox_boxes(orig, META), META)
    torch.testing.assert_close(back, orig)
    # outside the picture (in the padding) is clipped to the original image
    clipped = scale_boxes_to_original(torch.tensor([[-5.0, 0, 400, 330]]), META)
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 0, 500, 300]]))


def test_normalised_targets_round_trip_to_original():
    orig = torch.tensor([[10.0, 20, 110, 220]])
    lb = letterbox_boxes(orig, META)[0]
    img_hw = (320, 320)
    xywhn = torch.tensor(
        [[(lb[0] + lb[2]) / 2 / 320, (lb[1] + lb[3]) / 2 / 320, (lb[2] - lb[0]) / 320, (lb[3] - lb[1]) / 320]]
    )
    torch.testing.assert_close(scale_targets_to_original(xywhn, META, img_hw), orig)


def test_to_coco_results_xywh_and_class_map():
    pred = _pred([[10, 20, 40, 60]], [0.123456789], [1])
    (res,) = to_coco_results([pred], [META], class_ids=[5, 9])
    assert res == {"image_id": 7, "category_id": 9, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.12346}
    assert to_coco_results([pred], [META])[0]["category_id"] == 1


# ---------------------------------------------------------------------------- evaluate loop
NC = 2
IMG = 64  # letterboxed size
# Per image: orig shape, ratio, pad and GT (class, xyxy in original pixels).
SCENES = [
    ((32, 64), 1.0, (0.0, 16.0), [(0, [4, 4, 20, 28]), (1, [30, 2, 60, 30])]),
    ((128, 64), 0.5, (16.0, 0.0), [(1, [8, 16, 56, 100])]),
    ((64, 64), 1.0, (0.0, 0.0), []),
    ((64, 128), 0.5, (0.0, 16.0), [(0, [0, 0, 40, 30]), (0, [64, 40, 120, 64])]),
]


class SceneDataset(Dataset):
    """Images whose pixel (0,0) encodes their index so the stand-in model can find them."""

    def __len__(self):
        return len(SCENES)

    def __getitem__(self, i):
        shape, ratio, pad, objs = SCENES[i]
        img = torch.zeros(3, IMG, IMG, dtype=torch.uint8)
        img[0, 0, 0] = i
        labels = torch.zeros(len(objs), 6)
        for k, (c, b) in enumerate(objs):
            lb = torch.tensor(b, dtype=torch.float32) * ratio + torch.tensor([pad[0], pad[1]] * 2)
            labels[k, 1] = c
            labels[k, 2:] = torch.tensor(
                [(lb[0] + lb[2]) / 2, (lb[1] + lb[3]) / 2, lb[2] - lb[0], lb[3] - lb[1]]
            ) / IMG
        meta = {"path": f"{i}.jpg", "image_id": 100 + i, "orig_shape": shape, "ratio": ratio, "pad": pad}
        return img, labels, meta


def collate(batch):
    images, labels, metas = zip(*batch)
    for i, lab in enumerate(labels):
        lab[:, 0] = i
    return torch.stack(images), torch.cat(labels), list(metas)


class StandIn(nn.Module):
    """Eval-mode output of a perfect detector: each GT as (cx, cy, w, h, obj, one-hot)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # so .eval()/.train() and devices behave
        self.table = [SceneDataset()[i][1] for i in range(len(SCENES))]

    def forward(self, images):
        rows = []
        for img in images:
            lab = self.table[int(round(img[0, 0, 0].item() * 255))]
            p = torch.zeros(8, 5 + NC)
            p[: len(lab), :4] = lab[:, 2:] * IMG
            p[: len(lab), 4] = 0.9
            p[torch.arange(len(lab)), 5 + lab[:, 1].long()] = 1.0
            rows.append(p * self.scale)
        raw = [torch.zeros(len(images), 3, IMG // s, IMG // s, 5 + NC) for s in (8, 16, 32)]
        return torch.stack(rows), raw


def test_evaluate_perfect_model_in_original_coords():
    model = StandIn().train()
    loader = DataLoader(SceneDataset(), batch_size=3, collate_fn=collate)
    metrics, preds, metas = evaluate(model, loader, "cpu")
    assert model.training  # mode restored
    assert metrics["map50"] == pytest.approx(1) and metrics["map50_95"] == pytest.approx(1)
    assert metrics["precision"] == pytest.approx(1) and metrics["recall"] == pytest.approx(1)
    assert metrics.keys() == {"map50", "map50_95", "precision", "recall"}  # what the trainer logs and exports
    assert [m["image_id"] for m in metas] == [100, 101, 102, 103]
    for pred, (_, _, _, objs) in zip(preds, SCENES):
        want = torch.tensor([b for _, b in objs], dtype=torch.float32).reshape(-1, 4)
        got = torch.as_tensor(pred["boxes"])
        order = torch.argsort(got[:, 0] * 1000 + got[:, 1]) if len(got) else []
        worder = torch.argsort(want[:, 0] * 1000 + want[:, 1]) if len(want) else []
        torch.testing.assert_close(got[order], want[worder], atol=1e-3, rtol=0)
    results = to_coco_results(preds, metas)
    assert len(results) == 5 and {r["image_id"] for r in results} == {100, 101, 103}


def _ddp_worker(rank, world, port, out_dir):
    # A forked child must not enter the parent's OpenMP pool (it would hang): one thread.
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ds = SceneDataset()
        # 4 images over 3 ranks: the sampler pads rank 2's shard with a repeat
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
        loader = DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate)
        metrics, preds, metas = evaluate(StandIn(), loader, "cpu", distributed=True)
        ids = [m["image_id"] for m in metas]
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump({"metrics": metrics, "ids": ids}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_evaluate_distributed_gathers_and_dedupes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork, not spawn: children reuse the imported modules (spawn re-imports torch per rank)
    mp.start_processes(_ddp_worker, args=(3, port, str(tmp_path)), nprocs=3, join=True, start_method="fork")
    outs = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(3)]
    assert outs[0]["ids"] == [100, 101, 102, 103]  # rank 0: merged, one per image
    assert all(o["metrics"] == outs[0]["metrics"] for o in outs)  # broadcast to all
    assert outs[0]["metrics"]["map50_95"] == pytest.approx(1)
