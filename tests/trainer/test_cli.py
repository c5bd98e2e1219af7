"""The `finetune` command as a user meets it: help, errors as one line, val, synth."""

from __future__ import annotations

import json

import pytest
import torch

from trainer_helpers import finetune_cmd, run


def assert_one_line_error(done, *fragments: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_documents_every_train_flag():
    done = run(finetune_cmd("train", "--help"))
    assert done.returncode == 0
    for flag in ("--data", "--model", "--weights", "--freeze", "--freeze-bn", "--epochs", "--batch", "--imgsz",
                 "--optimizer", "--lr0", "--patience", "--amp", "--cache", "--seed", "--hyp", "--workers", "--out",
                 "--resume", "--metrics-port", "--log-format", "--device"):
        assert flag in done.stdout, flag


def test_missing_data_yaml(tmp_path):
    done = run(finetune_cmd("train", "--data", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "r")))
    assert_one_line_error(done, "nope.yaml")


def test_freeze_too_deep(tiny_dataset, tmp_path):
    done = run(finetune_cmd("train", "--data", str(tiny_dataset), "--model", "yolov5n", "--freeze", "40",
                            "--out", str(tmp_path / "r")))
    assert_one_line_error(done, "40", "backbone")


def test_bad_weights_file(tiny_dataset, tmp_path):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"this is not a checkpoint")
    done = run(finetune_cmd("train", "--data", str(tiny_dataset), "--model", "yolov5n", "--weights", str(bad),
                            "--out", str(tmp_path / "r"), "--epochs", "1", "--imgsz", "64"))
    assert_one_line_error(done, "weights.pt")


def test_no_labels(tmp_path):
    from finetune.data.synth import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "d", classes=["circle"], n_train=4, n_val=2, imgsz=64, seed=0)
    for label in (tmp_path / "d" / "labels" / "train").glob("*.txt"):
        label.unlink()
    done = run(finetune_cmd("train", "--data", str(data), "--model", "yolov5n", "--out", str(tmp_path / "r"),
                            "--imgsz", "64"))
    assert_one_line_error(done, "label")


def test_unknown_hyperparameter(tiny_dataset, tmp_path):
    done = run(finetune_cmd("train", "--data", str(tiny_dataset), "--out", str(tmp_path / "r"), "--hyp", "lr00=1"))
    assert_one_line_error(done, "lr00")


@pytest.mark.slow
def test_train_then_val_with_coco_json(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    done = run(finetune_cmd("train", "--data", str(tiny_dataset), "--model", "yolov5n", "--epochs", "1",
                            "--batch", "8", "--imgsz", "64", "--workers", "0", "--freeze", "backbone", "--out", str(out)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "10 frozen" not in done.stderr  # counts are parameters, not modules
    assert "modules 0..9 frozen" in done.stderr
    preds = tmp_path / "preds.json"
    done = run(finetune_cmd("val", "--data", str(tiny_dataset), "--weights", str(out / "best.pt"), "--imgsz", "64",
                            "--workers", "0", "--save-json", str(preds)))
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(done.stdout)
    assert set(metrics) >= {"map50", "map50_95", "precision", "recall"}
    trained = json.loads((out / "metrics.json").read_text())["best"]
    assert metrics["map50_95"] == pytest.approx(trained["map50_95"], abs=1e-6)
    results = json.loads(preds.read_text())
    assert isinstance(results, list)
    for r in results[:20]:
        assert set(r) == {"image_id", "category_id", "bbox", "score"} and len(r["bbox"]) == 4


def test_synth_command_writes_data_yaml(tmp_path):
    done = run(finetune_cmd("synth", "--out", str(tmp_path / "s"), "--classes", "star,cross", "--train", "3",
                            "--val", "2", "--imgsz", "64"))
    assert done.returncode == 0, done.stderr
    import yaml

    cfg = yaml.safe_load((tmp_path / "s" / "data.yaml").read_text())
    names = cfg["names"] if isinstance(cfg["names"], list) else list(cfg["names"].values())
    assert names == ["star", "cross"]


def test_python_api_is_reachable():
    import finetune.train as t

    assert callable(t.train)
    from finetune.config import TrainConfig

    assert TrainConfig.__dataclass_fields__["freeze"].default == "0"
    assert torch.__version__.startswith("2.14")


@pytest.mark.slow
def test_divergence_stops_with_a_readable_error_and_keeps_no_nan_checkpoint(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    done = run(finetune_cmd("train", "--data", str(tiny_dataset), "--model", "yolov5n", "--epochs", "3",
                            "--batch", "8", "--imgsz", "64", "--workers", "0", "--lr0", "1e12",
                            "--hyp", "warmup_epochs=0", "--hyp", "nbs=8", "--out", str(out)))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: training diverged") and "--lr0" in last_line, last_line
    if (out / "last.pt").exists():  # only epochs that ended finite were saved
        last = torch.load(out / "last.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
