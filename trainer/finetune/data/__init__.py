"""YOLO-format data: ``data.yaml`` parsing, the dataset with augmentation, the DataLoader
factory, and a synthetic shapes dataset for tests and demos."""

from finetune.data.augment import resolve_hyp
from finetune.data.config import DataConfig, label_path_for, load_data_config
from finetune.data.dataset import YoloDataset, auto_workers, build_dataloader, collate_fn
from finetune.data.synth import SHAPES, make_synthetic_dataset

__all__ = [
    "SHAPES",
    "DataConfig",
    "YoloDataset",
    "auto_workers",
    "build_dataloader",
    "collate_fn",
    "label_path_for",
    "load_data_config",
    "make_synthetic_dataset",
    "resolve_hyp",
]
