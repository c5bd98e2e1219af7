"""`finetune val`: COCO mAP of a checkpoint on a dataset's val split."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .data.config import load_data_config
from .data.dataset import YoloDataset, auto_workers, build_dataloader
from .distributed import select_device, set_cpu_threads
from .errors import FinetuneError
from .evaluate import evaluate, to_coco_results
from .models import build_model, load_checkpoint, load_pretrained
from .progress import configure_logging

log = logging.getLogger("finetune")


def model_from_checkpoint(weights: Path, nc: int | None = None):
    """Rebuild the architecture a checkpoint was trained with, then load its weights."""
    ckpt = load_checkpoint(weights)
    cfg = ckpt.get("model_yaml")
    if not isinstance(cfg, dict):
        raise FinetuneError(f"weights file {weights} does not say which architecture it is for (no model config); "
                            f"use `finetune train --model ... --weights {weights}` instead")
    ckpt_nc = ckpt.get("nc") or cfg.get("nc")
    if nc is not None and ckpt_nc is not None and int(ckpt_nc) != nc:
        raise FinetuneError(f"weights file {weights} was trained for {ckpt_nc} classes but the dataset has {nc}; "
                            f"evaluate it on a dataset with the same classes")
    model = build_model(cfg, nc=int(ckpt_nc or nc))
    load_pretrained(model, weights, log)
    return model, ckpt


def validate(data: Path, weights: Path, imgsz: int = 640, batch: int = 16, conf_thres: float = 0.001,
             iou_thres: float = 0.6, save_json: Path | None = None, workers: int | None = None,
             device: str = "auto") -> dict[str, Any]:
    configure_logging("text", 0)
    if imgsz % 32:
        raise FinetuneError(f"--imgsz {imgsz}: must be a multiple of 32")
    data_cfg = load_data_config(data)
    dev = select_device(device, 0)
    set_cpu_threads(dev)
    model, _ckpt = model_from_checkpoint(weights, data_cfg.nc)
    model = model.to(dev).eval()
    dataset = YoloDataset(data_cfg.val, imgsz, augment=False, nc=data_cfg.nc)
    log.info(f"val: {dataset.summary()}")
    workers = auto_workers(dev) if workers is None else workers
    loader, _ = build_dataloader(dataset, batch, workers, shuffle=False, distributed=False)
    metrics, predictions, metas = evaluate(model, loader, dev, conf_thres=conf_thres, iou_thres=iou_thres)
    if save_json is not None:
        results = to_coco_results(predictions, metas)
        save_json.parent.mkdir(parents=True, exist_ok=True)
        save_json.write_text(json.dumps(results))
        log.info(f"wrote {len(results)} detections in COCO results format to {save_json}")
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
