"""YOLOv5 models: configs (torch-free), architecture and pretrained-weight loading.

``finetune.models.config`` imports without torch; the model classes are loaded lazily so
``import finetune.models`` does not pull torch into the operator.
"""

from __future__ import annotations

from finetune.models.config import (
    BUILTIN_MODELS,
    freeze_presets,
    load_model_config,
    module_count,
    resolve_freeze,
)

__all__ = [
    "BUILTIN_MODELS", "freeze_presets", "load_model_config", "module_count", "resolve_freeze",
    "DetectionModel", "Detect", "build_model", "load_checkpoint", "load_pretrained",
]

_LAZY = {
    "DetectionModel": "finetune.models.yolo",
    "Detect": "finetune.models.yolo",
    "build_model": "finetune.models.yolo",
    "load_checkpoint": "finetune.models.weights",
    "load_pretrained": "finetune.models.weights",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'finetune.models' has no attribute {name!r}")
