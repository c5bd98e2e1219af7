"""The CPU speed measures of the input path and the trainer: uint8 colour jitter, channels-last
layout, the loader-process heuristic and the allocator settings. Each keeps the results the
plain way would give; these tests check that (speed itself is bench/freeze.py's business)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from finetune import distributed
from finetune.config import workers_arg
from finetune.data import augment as A
from finetune.data.dataset import YoloDataset, auto_workers, collate_fn
from finetune.distributed import usable_cpus
from finetune.models.yolo import build_model

CL = torch.channels_last


def _batch(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def test_colour_jitter_applies_each_images_own_matrix_in_uint8():
    images = [A.channels_last(image) for image in _batch()]
    originals = [image.clone() for image in images]
    hyp = A.resolve_hyp({"hsv_h": 0.3, "hsv_s": 0.9, "hsv_v": 0.5})
    torch.manual_seed(7)
    out = A.random_colors(images, hyp)
    torch.manual_seed(7)
    matrices = A.random_color_matrices(len(images), hyp)
    assert not torch.allclose(matrices[0], matrices[1])  # one draw per image
    for image, original, jittered, matrix in zip(images, originals, out, matrices):
        expected = torch.einsum("ij,jhw->ihw", matrix.double(), original.double()).clamp(0, 255)
        assert jittered.dtype == torch.uint8 and jittered.shape == original.shape
        assert jittered.permute(1, 2, 0).is_contiguous()  # channels-last, as the batch wants it
        assert (jittered.double() - expected).abs().max() <= 1  # rounded to the nearest level
        assert torch.equal(image, original)  # the input (possibly the RAM cache) is untouched
        # The jitter really changes colours.
        assert (jittered.double() - original.double()).abs().max() > 10


def test_colour_matrices_match_hsv_semantics():
    hue0 = torch.zeros(1)
    # value scales every channel; saturation 0 leaves luma gray; hue by a full turn is identity
    v = A.color_matrices(hue0, torch.ones(1), torch.tensor([0.5]))[0]
    assert torch.allclose(v, 0.5 * torch.eye(3), atol=1e-6)
    gray = A.color_matrices(hue0, torch.zeros(1), torch.ones(1))[0] @ torch.tensor([1.0, 0.0, 0.0])
    assert torch.allclose(gray, torch.full((3,), 0.299), atol=1e-6)
    turn = A.color_matrices(torch.ones(1), torch.ones(1), torch.ones(1))[0]
    assert torch.allclose(turn, torch.eye(3), atol=1e-6)
    # a third of a turn maps red to green, as HSV's hue does
    third = A.color_matrices(torch.tensor([1 / 3]), torch.ones(1), torch.ones(1))[0]
    assert torch.allclose(third @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)


def test_no_gains_leave_colours_alone_and_the_batch_conversion_keeps_the_layout():
    images = [A.channels_last(image) for image in _batch()]
    off = A.resolve_hyp({"hsv_h": 0, "hsv_s": 0, "hsv_v": 0})
    assert all(a is b for a, b in zip(A.random_colors(images, off), images))
    for layout in (torch.contiguous_format, CL):
        batch = torch.stack(images).contiguous(memory_format=layout)
        out = A.images_to_float(batch)
        assert torch.equal(out, batch.float() / 255) and out.is_contiguous(memory_format=layout)


def test_samples_and_batches_are_channels_last_with_unchanged_values(tiny_dataset):
    from finetune.data.config import load_data_config

    cfg = load_data_config(tiny_dataset)
    ds = YoloDataset(cfg.train, imgsz=64, augment=False, nc=cfg.nc)
    samples = [ds[i] for i in range(3)]
    for image, _, _ in samples:
        assert image.shape == (3, 64, 64) and image.permute(1, 2, 0).is_contiguous()
    images, targets, _ = collate_fn(samples)
    assert images.is_contiguous(memory_format=CL)
    assert torch.equal(images, torch.stack([s[0].contiguous() for s in samples]))
    assert targets[:, 0].tolist() == sorted(targets[:, 0].tolist())


def test_model_outputs_do_not_depend_on_the_memory_layout():
    torch.manual_seed(0)
    model = build_model("yolov5n", nc=3).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        plain, raw_plain = model(x)
        model_cl = model.to(memory_format=CL)
        cl, raw_cl = model_cl(x.contiguous(memory_format=CL))
    assert torch.allclose(plain, cl, atol=1e-4, rtol=1e-4)
    for a, b in zip(raw_plain, raw_cl):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device,cpus,expected", [
    ("cuda", 16, 8), ("cuda", 4, 3), ("cuda", 2, 1), ("cuda", 1, 0),
    ("cpu", 1, 0), ("cpu", 2, 0), ("cpu", 8, 2), ("cpu", 64, 8),
])
def test_auto_workers(device, cpus, expected):
    assert auto_workers(torch.device(device), cpus_per_rank=cpus) == expected


def test_usable_cpus_honours_the_container_cpu_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    cpu_max, v1 = tmp_path / "cpu.max", tmp_path / "v1"
    v1.mkdir()
    assert usable_cpus(cpu_max, v1) == 16  # no cgroup files: the affinity
    cpu_max.write_text("max 100000\n")
    assert usable_cpus(cpu_max, v1) == 16  # no limit
    cpu_max.write_text("250000 100000\n")
    assert usable_cpus(cpu_max, v1) == 2  # limit 2.5 CPUs
    cpu_max.write_text("50000 100000\n")
    assert usable_cpus(cpu_max, v1) == 1  # never 0
    cpu_max.unlink()
    (v1 / "cpu.cfs_quota_us").write_text("400000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(cpu_max, v1) == 4  # cgroup v1
    monkeypatch.setattr(distributed, "usable_cpus", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.cpus_per_process() == 4


def test_cpu_threads_follow_the_share_unless_omp_num_threads_is_set(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(distributed, "cpus_per_process", lambda: 1)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert distributed.set_cpu_threads(torch.device("cpu")) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert distributed.set_cpu_threads(torch.device("cpu")) is None
        assert distributed.set_cpu_threads(torch.device("cuda")) is None
    finally:
        torch.set_num_threads(before)


def test_workers_flag_accepts_a_count_or_auto():
    import argparse

    assert workers_arg("auto") is None and workers_arg("0") == 0 and workers_arg(" 3 ") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="'auto'"):
        workers_arg("two")


def _tuned(env: dict[str, str]) -> str:
    code = "from finetune.allocator import tune_malloc; print(tune_malloc())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_malloc_tuning_applies_on_glibc_and_yields_to_the_users_settings():
    assert _tuned({}) == "True"  # Debian's glibc
    assert _tuned({"FINETUNE_MALLOC_TUNING": "0"}) == "False"
    assert _tuned({"MALLOC_TOP_PAD_": "0"}) == "False"


def test_batch_box_path_keeps_boxes_inside_and_with_their_image_and_class():
    torch.manual_seed(3)
    hyp = A.resolve_hyp({"scale": 0.5, "translate": 0.2, "fliplr": 0.5, "flipud": 0.5})
    # Three images of different sizes; box k of image j has class j (portrait boxes in
    # image 0, landscape in image 1, a tiny one that usually drops in image 2).
    images = [torch.zeros(3, 40, 64, dtype=torch.uint8), torch.zeros(3, 64, 50, dtype=torch.uint8),
              torch.zeros(3, 64, 64, dtype=torch.uint8)]
    boxes = np.array([[5, 5, 20, 30], [22, 2, 30, 38], [30, 10, 48, 20], [2, 40, 45, 60], [0, 0, 3, 3]],
                     dtype=np.float32)
    owner = np.array([0, 0, 1, 1, 2])
    kept_counts = []
    for _ in range(50):
        out_images, out_boxes, keep = A.augment_batch(images, boxes, owner, hyp, 64)
        assert [tuple(im.shape) for im in out_images] == [(3, 64, 64)] * 3
        assert out_boxes.dtype == np.float32 and len(out_boxes) == len(keep)
        assert (np.diff(keep) > 0).all()  # input order kept, so boxes stay grouped by image
        assert (out_boxes >= 0).all() and (out_boxes <= 64).all()
        assert (out_boxes[:, 2:] > out_boxes[:, :2]).all()
        # scale/translate/flips keep aspect ratios: image 0's boxes stay portrait, image 1's
        # landscape, unless the border clipped them
        image_of = owner[keep]
        inside = (out_boxes[:, 0] > 0) & (out_boxes[:, 1] > 0) & (out_boxes[:, 2] < 64) & (out_boxes[:, 3] < 64)
        w, h = out_boxes[:, 2] - out_boxes[:, 0], out_boxes[:, 3] - out_boxes[:, 1]
        assert (w[inside & (image_of == 0)] < h[inside & (image_of == 0)]).all()
        assert (w[inside & (image_of == 1)] > h[inside & (image_of == 1)]).all()
        kept_counts.append(len(keep))
    assert min(kept_counts) < max(kept_counts)  # the augmentation varied


def test_a_batch_of_samples_is_the_samples_one_by_one(tmp_path):
    """`__getitems__` (the batch path DataLoader uses) and `__getitem__` agree: without
    augmentation exactly, with it in shapes and box counts' bounds."""
    from finetune.data.dataset import YoloDataset
    from finetune.data.synth import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "d", n_train=6, n_val=2, imgsz=96, seed=1)
    from finetune.data.config import load_data_config

    cfg = load_data_config(data)
    plain = YoloDataset(cfg.train, 64, augment=False, nc=cfg.nc)
    batch = plain.__getitems__([3, 0, 5])
    for (image, targets, meta), index in zip(batch, [3, 0, 5]):
        one_image, one_targets, one_meta = plain[index]
        assert torch.equal(image, one_image) and torch.equal(targets, one_targets) and meta == one_meta
    assert sum(len(t) for _, t, _ in batch) > 0
    augmented = YoloDataset(cfg.train, 64, augment=True, nc=cfg.nc, hyp={"mosaic": 0.5})
    torch.manual_seed(0)
    for image, targets, meta in augmented.__getitems__(list(range(6))):
        assert image.shape == (3, 64, 64) and targets.shape[1] == 6
        assert ((targets[:, 2:] >= 0) & (targets[:, 2:] <= 1)).all()
