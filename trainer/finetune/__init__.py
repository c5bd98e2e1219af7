"""FineTune trainer: YOLOv5 fine-tuning with layer freezing."""
__version__ = "0.1.0"
