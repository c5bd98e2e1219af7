"""Tests for finetune.data.synth: determinism, class subsets, valid labels and layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image

from finetune.data import SHAPES, YoloDataset, load_data_config, make_synthetic_dataset
from finetune.errors import FinetuneError

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

SMALL = dict(n_train=8, n_val=3, imgsz=96)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_labels(root: Path) -> list[list[float]]:
    rows = []
    for label in sorted((root / "labels").rglob("*.txt")):
        rows += [[float(v) for v in line.split()] for line in label.read_text().splitlines()]
    return rows


def test_same_seed_gives_identical_bytes(tmp_path):
    make_synthetic_dataset(tmp_path / "a", seed=7, **SMALL)
    make_synthetic_dataset(tmp_path / "b", seed=7, **SMALL)
    a, b = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert len(a) == 2 * (8 + 3) + 1 and a == b


def test_different_seed_or_classes_differ(tmp_path):
    base = make_synthetic_dataset(tmp_path / "a", seed=0, **SMALL)
    other_seed = make_synthetic_dataset(tmp_path / "b", seed=1, **SMALL)
    target = make_synthetic_dataset(tmp_path / "c", seed=0, classes=["star", "cross", "hexagon"], **SMALL)
    a = tree_bytes(base.parent)
    assert a != tree_bytes(other_seed.parent)
    assert yaml.safe_load(base.read_text())["names"] != yaml.safe_load(target.read_text())["names"]


def test_class_subset_layout_and_loadable(tmp_path):
    classes = ["star", "cross", "hexagon"]
    data_yaml = make_synthetic_dataset(tmp_path, classes=classes, seed=3, **SMALL)
    spec = yaml.safe_load(data_yaml.read_text())
    assert spec == {"path": ".", "train": "images/train", "val": "images/val", "nc": 3, "names": classes}
    assert len(list((tmp_path / "images" / "train").glob("*.jpg"))) == 8
    assert len(list((tmp_path / "labels" / "val").glob("*.txt"))) == 3
    cfg = load_data_config(data_yaml)
    assert cfg.names == classes and len(cfg.train) == 8 and len(cfg.val) == 3
    ds = YoloDataset(cfg.train, imgsz=96, names=cfg.names)
    assert ds.stats["skipped_images"] == 0 and ds.stats["skipped_label_lines"] == 0
    assert ds.stats["labels"] > 0


def test_labels_are_valid_and_varied(tmp_path):
    make_synthetic_dataset(tmp_path, classes=["circle", "square"], n_train=40, n_val=0, imgsz=64, seed=2)
    rows = read_labels(tmp_path)
    assert rows and all(len(r) == 5 for r in rows)
    assert {int(r[0]) for r in rows} == {0, 1}
    for _, cx, cy, w, h in rows:
        assert 0 < w <= 1 and 0 < h <= 1
        assert cx - w / 2 >= 0 and cy - h / 2 >= 0 and cx + w / 2 <= 1 and cy + h / 2 <= 1
    counts = [len(p.read_text().splitlines()) for p in (tmp_path / "labels" / "train").glob("*.txt")]
    assert min(counts) == 0 and max(counts) > 1  # background images and crowded ones
    sizes = {Image.open(p).size for p in (tmp_path / "images" / "train").glob("*.jpg")}
    assert (64, 48) in sizes  # mostly 4:3 landscape


def test_label_box_is_the_tight_box_of_the_shape(tmp_path):
    """With a single large object the box must hug the drawn pixels (within JPEG/noise slack)."""
    make_synthetic_dataset(tmp_path, classes=["square"], n_train=6, n_val=0, imgsz=128, max_objects=1, min_size_frac=0.4, max_size_frac=0.5, seed=4, fmt="png")
    checked = 0
    for label in sorted((tmp_path / "labels" / "train").glob("*.txt")):
        lines = label.read_text().splitlines()
        if not lines:
            continue
        image = Image.open(tmp_path / "images" / "train" / f"{label.stem}.png").convert("RGB")
        w, h = image.size
        _, cx, cy, bw, bh = (float(v) for v in lines[0].split())
        x1, y1, x2, y2 = (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h
        inside = image.getpixel((int(cx * w), int(cy * h)))
        # Just inside each edge is the shape's colour; just outside is not.
        for px, py in ((x1 + 2, cy * h), (x2 - 3, cy * h), (cx * w, y1 + 2), (cx * w, y2 - 3)):
            assert sum(abs(a - b) for a, b in zip(image.getpixel((int(px), int(py))), inside)) < 80
        for px, py in ((x1 - 3, cy * h), (x2 + 2, cy * h), (cx * w, y1 - 3), (cx * w, y2 + 2)):
            if 0 <= px < w and 0 <= py < h:
                assert sum(abs(a - b) for a, b in zip(image.getpixel((int(px), int(py))), inside)) > 80
        checked += 1
    assert checked >= 3


def test_unknown_class_lists_valid_ones(tmp_path):
    with pytest.raises(FinetuneError) as err:
        make_synthetic_dataset(tmp_path, classes=["circle", "blob"])
    assert "blob" in str(err.value) and all(shape in str(err.value) for shape in SHAPES)


def test_rerun_with_fewer_images_removes_stale_files(tmp_path):
    make_synthetic_dataset(tmp_path, n_train=5, n_val=2, imgsz=64)
    make_synthetic_dataset(tmp_path, n_train=3, n_val=1, imgsz=64, fmt="png")
    assert sorted(p.name for p in (tmp_path / "images" / "train").iterdir()) == [f"train_0000{i}.png" for i in range(3)]
    assert len(list((tmp_path / "labels" / "train").iterdir())) == 3
    assert len(load_data_config(tmp_path / "data.yaml").val) == 1


def test_shapes_cover_the_required_classes():
    assert len(SHAPES) >= 6 and {"circle", "square", "triangle", "star", "cross", "hexagon"} <= set(SHAPES)
