"""`--cache features`: the frozen prefix's stored outputs train the rest exactly as images would."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from finetune.config import TrainConfig
from finetune.data.augment import images_to_float
from finetune.data.config import label_path_for, load_data_config
from finetune.data.dataset import YoloDataset, collate_fn
from finetune.distributed import DistInfo
from finetune.errors import FinetuneError
from finetune.feature_cache import FrozenFeatures, cache_key, open_or_build
from finetune.freeze import freeze_modules
from finetune.hyperparameters import defaults as default_hyperparameters
from finetune.loss import YoloLoss
from finetune.models.config import load_model_config, resolve_freeze
from finetune.models.yolo import DetectionModel, prefix_outputs_needed

from trainer_helpers import finetune_cmd, run

IMGSZ = 64


def depth_of(preset: str) -> int:
    return resolve_freeze(preset, load_model_config("yolov5n"))


SINGLE = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


def frozen_model(depth: int, tiny_dataset, nc: int = 3) -> DetectionModel:
    """yolov5n with BatchNorm statistics measured on the dataset's images (as pretrained
    weights have them: with the init statistics, mean 0 and variance 1, the random network's
    gradients change by 15% for a 1e-5 change of its inputs), then ``depth`` modules frozen."""
    torch.manual_seed(0)
    model = DetectionModel("yolov5n", nc=nc)
    train, _val = datasets(tiny_dataset)
    train.augment = False
    images, _targets, _metas = collate_fn(train.__getitems__(list(range(len(train)))))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a plain average over the calibration batch
    with torch.no_grad():
        model.train()
        model(images_to_float(images))
    freeze_modules(model, depth, freeze_bn=True)
    return model.to(memory_format=torch.channels_last)


def datasets(tiny_dataset, hyp=None, imgsz=IMGSZ):
    cfg = load_data_config(tiny_dataset)
    train = YoloDataset(cfg.train, imgsz, augment=True, hyp={**default_hyperparameters(), **(hyp or {})}, nc=cfg.nc)
    val = YoloDataset(cfg.val, imgsz, augment=False, nc=cfg.nc)
    return train, val


def build(tmp_path, tiny_dataset, depth, views=1, dtype=torch.float16, hyp=None, imgsz=IMGSZ, model=None, **kw):
    train, val = datasets(tiny_dataset, hyp, imgsz)
    model = model or frozen_model(depth, tiny_dataset)
    merged = {**default_hyperparameters(), **(hyp or {})}
    return open_or_build(model, depth, imgsz, train, val, merged, views, 0, tmp_path, SINGLE, dtype=dtype, **kw)


def loss_and_grads(model, inputs, targets):
    model.train()
    model.zero_grad(set_to_none=True)
    loss_fn = YoloLoss.from_model(model, default_hyperparameters(), IMGSZ)
    loss, _items = loss_fn([p.float() for p in model(inputs)], targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


# Half precision rounds each stored activation to 11 significant bits (relative error up to
# 2**-11 ~ 5e-4). Measured on this model: the loss moves by < 1e-5 relative and no gradient
# element by more than 0.4% of its tensor's largest (backbone; 0.04% at all-but-detect).
# Stated tolerance: loss rtol 1e-4, every gradient element within 1% of its tensor's largest.
HALF_LOSS_RTOL, HALF_GRAD_SHARE = 1e-4, 1e-2


@pytest.mark.parametrize("preset", ["backbone", "all-but-detect"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cached_batch_gives_the_uncached_loss_and_gradients(tiny_dataset, tmp_path, preset, dtype):
    depth = depth_of(preset)
    model = frozen_model(depth, tiny_dataset)
    cache = build(tmp_path, tiny_dataset, depth, dtype=dtype, model=model)
    train, _val = datasets(tiny_dataset)
    train.augment = False  # view 0 is the plain letterboxed image
    # The batch the cache was built from (all 24 images, one build batch): the CPU's
    # convolutions round differently for different batch sizes (by one unit in the last
    # place), so a prefix run on a sub-batch is not bit-for-bit the stored one, and training-mode
    # BatchNorm over this tiny batch's 2x2 maps turns such a difference into ~1e-4 of a gradient.
    indices = list(range(len(train)))
    images, targets, _metas = collate_fn(train.__getitems__(indices))
    some = [0, 3, 5, 7]
    direct = model.frozen_outputs(images_to_float(images[some]))
    stored, _, _ = cache.train.__getitems__(some)
    scale = 1e-5 if dtype == torch.float32 else 2**-10  # float16: 10 bits of mantissa
    for i, t in direct.items():  # every element within `scale` of the tensor's largest
        torch.testing.assert_close(stored.tensors[i].float(), t, rtol=scale, atol=scale * t.abs().max().item())
    features, cached_targets, _ = cache.train.__getitems__(indices)
    assert isinstance(features, FrozenFeatures) and features.shape == images.shape
    assert sorted(features.tensors) == prefix_outputs_needed(model.model, depth)
    torch.testing.assert_close(cached_targets, targets, rtol=0, atol=0)

    loss, grads = loss_and_grads(model, images_to_float(images), targets)
    cached_loss, cached_grads = loss_and_grads(model, features.to_model(torch.device("cpu")), cached_targets)
    assert grads.keys() == cached_grads.keys() and grads
    if dtype == torch.float32:
        torch.testing.assert_close(cached_loss, loss, rtol=1e-5, atol=0)
        for name in grads:
            torch.testing.assert_close(cached_grads[name], grads[name], rtol=1e-5, atol=1e-8, msg=name)
    else:
        torch.testing.assert_close(cached_loss, loss, rtol=HALF_LOSS_RTOL, atol=0)
        for name in grads:
            share = ((cached_grads[name] - grads[name]).abs().max() / grads[name].abs().max()).item()
            assert share <= HALF_GRAD_SHARE, (name, share)


def test_views_are_augmented_reproducible_and_chosen_by_epoch(tiny_dataset, tmp_path):
    depth = depth_of("all-but-detect")
    cache = build(tmp_path / "a", tiny_dataset, depth, views=3)
    again = build(tmp_path / "b", tiny_dataset, depth, views=3)
    memory_mapped = build(tmp_path / "c", tiny_dataset, depth, views=3, ram_limit=0)
    plain = build(tmp_path / "d", tiny_dataset, depth, views=1)
    assert cache.in_ram and not memory_mapped.in_ram
    n = len(cache.train)
    indices = list(range(n))
    by_view = []
    for epoch in range(4):
        for split in (cache.train, again.train, memory_mapped.train):
            split.set_epoch(epoch)
        features, targets, _ = cache.train.__getitems__(indices)
        for other in (again, memory_mapped):
            other_features, other_targets, _ = other.train.__getitems__(indices)
            torch.testing.assert_close(other_targets, targets, rtol=0, atol=0)
            for i, t in features.tensors.items():
                assert torch.equal(other_features.tensors[i], t)
        by_view.append((features, targets))
    plain_features, plain_targets, _ = plain.train.__getitems__(indices)
    for i, t in plain_features.tensors.items():
        assert torch.equal(by_view[0][0].tensors[i], t)  # view 0: the un-augmented image
        assert torch.equal(by_view[3][0].tensors[i], t)  # epoch 3 of K = 3: view 0 again
        assert not torch.equal(by_view[1][0].tensors[i], t)  # views 1 and 2 are augmented
        assert not torch.equal(by_view[2][0].tensors[i], by_view[1][0].tensors[i])
    torch.testing.assert_close(by_view[0][1], plain_targets, rtol=0, atol=0)


def test_cache_is_reused_for_the_same_key_and_rebuilt_when_it_changes(tiny_dataset, tmp_path):
    depth = depth_of("backbone")
    model = frozen_model(depth, tiny_dataset)
    first = build(tmp_path, tiny_dataset, depth, views=2, model=model)
    assert not first.reused
    files = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "feature-cache").iterdir()}

    # Training changes only the unfrozen modules: the same cache.
    with torch.no_grad():
        model.model[-1].m[0].weight.add_(1.0)
    same = build(tmp_path, tiny_dataset, depth, views=2, model=model)
    assert same.reused
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "feature-cache").iterdir()} == files

    train, val = datasets(tiny_dataset)
    hyp = default_hyperparameters()

    def key(**change):
        args = {"model": model, "depth": depth, "imgsz": IMGSZ, "datasets": (train, val), "hyp": hyp, "views": 2,
                "seed": 0, "dtype": torch.float16, **change}
        return cache_key(**args)

    base = key()
    other_weights = frozen_model(depth, tiny_dataset)
    with torch.no_grad():
        other_weights.model[0].conv.weight.mul_(1.01)
    changed = {
        "frozen weights": key(model=other_weights),
        "depth": key(depth=depth + 1),
        "image size": key(imgsz=IMGSZ + 32),
        "augmentation": key(hyp={**hyp, "fliplr": 0.25}),
        "views": key(views=3),
        "seed": key(seed=1),
        "dtype": key(dtype=torch.float32),
    }
    for what, value in changed.items():
        assert value != base, what

    # The dataset's files: a changed label file changes the key and the cache is rebuilt.
    label = label_path_for(train.image_paths[0])
    label.write_text(label.read_text() + "0 0.5 0.5 0.2 0.2\n")
    try:
        assert key(datasets=datasets(tiny_dataset)) != base
        rebuilt = build(tmp_path, tiny_dataset, depth, views=2, model=model)
        assert not rebuilt.reused
        assert json.loads((tmp_path / "feature-cache" / "cache.json").read_text())["key"] != first.manifest["key"]
        # A different image size rebuilds it again, with arrays of the new shape.
        bigger = build(tmp_path, tiny_dataset, depth, views=2, model=model, imgsz=IMGSZ + 32)
        assert not bigger.reused
        features, _, _ = bigger.train.__getitems__([0])
        assert features.shape[-1] == IMGSZ + 32
    finally:
        label.write_text("".join(label.read_text().splitlines(keepends=True)[:-1]))


@pytest.mark.parametrize("flags, expected", [
    (("--freeze", "0"), "--freeze 0 freezes none"),
    (("--freeze", "backbone", "--freeze-bn", "false"), "--freeze-bn false"),
    (("--freeze", "backbone", "--hyp", "mosaic=0.5"), "cannot cache mosaic"),
    (("--freeze", "backbone", "--cache-views", "0"), "--cache-views 0"),
])
def test_cli_refuses_what_the_cache_cannot_do_with_one_line(tiny_dataset, tmp_path, flags, expected):
    result = run(finetune_cmd("train", "--data", str(tiny_dataset), "--model", "yolov5n",
                              "--epochs", "1", "--imgsz", "64", "--out", str(tmp_path / "run"),
                              "--cache", "features", *flags), timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "feature-cache").exists()


def test_config_refusals_match_the_cli(tmp_path):
    base = {"data": tmp_path / "d.yaml", "out": tmp_path / "o", "cache": "features"}
    with pytest.raises(FinetuneError, match="freezes none"):
        TrainConfig(**base, freeze="0")
    with pytest.raises(FinetuneError, match="BatchNorm"):
        TrainConfig(**base, freeze="all-but-detect", freeze_bn=False)
    cfg = TrainConfig(**base, freeze="all-but-detect", cache_views=2)
    assert TrainConfig.from_argv(cfg.to_argv()) == cfg


def test_training_from_the_cache_reports_it_and_resume_reuses_it(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", str(tiny_dataset), "--model", "yolov5n", "--batch", "4", "--imgsz", "64",
            "--workers", "0", "--out", str(out), "--hyp", "nbs=4", "--hyp", "warmup_epochs=0",
            "--freeze", "all-but-detect", "--cache", "features", "--cache-views", "2"]
    first = run(finetune_cmd(*args, "--epochs", "1"), timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "feature cache: outputs of modules 17, 20, 23 for 24 train images x 2 view(s)" in first.stderr
    summary = json.loads((out / "metrics.json").read_text())["feature_cache"]
    assert summary["views"] == 2 and summary["reused"] is False and summary["bytes"] > 0
    assert summary["images_per_second"] > 0 and summary["build_time_s"] > 0
    arrays = {f.name: f.stat().st_mtime_ns for f in (out / "feature-cache").glob("*.npy")}
    assert len(arrays) == 6  # 3 modules x (train, val), one rank block each

    resumed = run(finetune_cmd(*args, "--epochs", "2", "--resume"), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "reused from" in resumed.stderr
    assert {f.name: f.stat().st_mtime_ns for f in (out / "feature-cache").glob("*.npy")} == arrays
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["feature_cache"]["reused"] is True and summary["epochs_completed"] == 2


def test_memory_mapped_rows_match_in_ram_rows(tiny_dataset, tmp_path):
    depth = depth_of("backbone")
    in_ram = build(tmp_path / "ram", tiny_dataset, depth)
    mapped = build(tmp_path / "map", tiny_dataset, depth, ram_limit=0)
    rows = np.array([5, 0, 2])
    for split_a, split_b in ((in_ram.train, mapped.train), (in_ram.val, mapped.val)):
        a, _, metas_a = split_a.__getitems__(rows.tolist())
        b, _, metas_b = split_b.__getitems__(rows.tolist())
        assert metas_a == metas_b
        for i in a.tensors:
            assert torch.equal(a.tensors[i], b.tensors[i])
    assert os.path.getsize(mapped.directory / "cache.json") > 0


@pytest.mark.slow
def test_torchrun_ranks_share_one_cache_and_resume_reuses_it(tiny_dataset, tmp_path):
    """Two gloo ranks each build their block of rows; both train from all of it; a resumed
    two-rank run finds the same key and reads it without building; the rows are what one
    process builds alone."""
    from trainer_helpers import launch_cmd

    out = tmp_path / "ddp"
    args = ["train", "--data", str(tiny_dataset), "--model", "yolov5n", "--batch", "4", "--imgsz", "64",
            "--workers", "0", "--out", str(out), "--hyp", "nbs=4", "--hyp", "warmup_epochs=0",
            "--freeze", "backbone", "--cache", "features", "--cache-views", "2", "--log-format", "json"]
    first = run(launch_cmd(2, *args, "--epochs", "1"), timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    directory = out / "feature-cache"
    manifest = json.loads((directory / "cache.json").read_text())
    assert manifest["world_size"] == 2 and manifest["views"] == 2
    for rank in (0, 1):
        assert (directory / f"labels.r{rank}.pt").is_file()
        for module in manifest["modules"]:
            for split in ("train", "val"):
                assert (directory / f"{split}-m{module}.r{rank}.npy").is_file()
    built = {f.name: f.stat().st_mtime_ns for f in directory.iterdir()}

    resumed = run(launch_cmd(2, *args, "--epochs", "2", "--resume"), timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "reused from" in resumed.stdout + resumed.stderr
    assert {f.name: f.stat().st_mtime_ns for f in directory.iterdir()} == built
    assert json.loads((out / "metrics.json").read_text())["feature_cache"]["reused"] is True

    # One process with the run's weights computes the same key (the key does not depend on
    # the world size) and the same rows: targets exactly, features to float16 rounding (the
    # ranks' convolutions ran on other batches).
    depth = depth_of("backbone")
    model = DetectionModel("yolov5n", nc=3)
    model.load_state_dict(torch.load(out / "last.pt", weights_only=True)["model"])
    freeze_modules(model, depth, freeze_bn=True)
    model = model.to(memory_format=torch.channels_last)
    hyp = default_hyperparameters()
    shared = open_or_build(model, depth, IMGSZ, *datasets(tiny_dataset), hyp, 2, 0, out, SINGLE)
    assert shared.reused and shared.manifest["world_size"] == 2
    alone = open_or_build(model, depth, IMGSZ, *datasets(tiny_dataset), hyp, 2, 0, tmp_path / "alone", SINGLE)
    assert not alone.reused and alone.manifest["key"] == manifest["key"]
    for a, b in ((shared.train, alone.train), (shared.val, alone.val)):
        for epoch in (0, 1):
            a.set_epoch(epoch)
            b.set_epoch(epoch)
            rows = list(range(len(a)))
            fa, ta, ma = a.__getitems__(rows)
            fb, tb, mb = b.__getitems__(rows)
            assert torch.equal(ta, tb) and ma == mb
            for i, t in fb.tensors.items():
                t = t.float()
                torch.testing.assert_close(fa.tensors[i].float(), t, rtol=2**-10, atol=2**-10 * t.abs().max().item())
