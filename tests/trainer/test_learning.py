"""Learning works: the real trainer overfits a few dozen synthetic images."""

from __future__ import annotations

import json

import pytest

from trainer_helpers import finetune_cmd, run

pytestmark = pytest.mark.slow

NO_AUGMENTATION = ["--hyp", "fliplr=0", "--hyp", "scale=0", "--hyp", "translate=0", "--hyp", "hsv_h=0",
                   "--hyp", "hsv_s=0", "--hyp", "hsv_v=0"]


def test_overfitting_24_images_reaches_map50_of_0_6(tmp_path):
    from finetune.data.synth import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", classes=["circle", "square", "triangle"], n_train=24, n_val=2,
                                  imgsz=96, seed=5, max_objects=3, min_size_frac=0.15)
    # Validate on the training images themselves: this measures fitting, not generalisation.
    data.write_text(data.read_text().replace("val: images/val", "val: images/train"))
    out = tmp_path / "run"
    done = run(finetune_cmd("train", "--data", str(data), "--model", "yolov5n", "--epochs", "60", "--batch", "4",
                            "--imgsz", "96", "--workers", "0", "--cache", "ram", "--optimizer", "AdamW",
                            "--lr0", "0.003", "--hyp", "lrf=0.1", "--hyp", "nbs=4", "--hyp", "warmup_epochs=1",
                            *NO_AUGMENTATION, "--out", str(out)), timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    best = json.loads((out / "metrics.json").read_text())["best"]
    assert best["map50"] >= 0.6, best
