"""Tests for finetune.data: data.yaml parsing, the dataset, augmentation and loaders.

Real files in tmp_path, tiny images, so the whole module runs in a few seconds on a shared
2-core machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from finetune.data import (
    YoloDataset,
    build_dataloader,
    collate_fn,
    label_path_for,
    load_data_config,
    resolve_hyp,
)
from finetune.data.augment import PAD_VALUE, affine_matrix, warp_boxes, warp_image
from finetune.errors import FinetuneError

# torchvision 0.29 deprecates its codecs (the dataset silences this outside pytest too).
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

NO_AUG = {k: 0.0 for k in ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "fliplr", "flipud", "mosaic")}


# ---------------------------------------------------------------------- helpers
def write_image(path: Path, size=(64, 48), color=(40, 80, 120), rect=None, rect_color=(250, 250, 250), fmt=None):
    """A flat image, optionally with one filled rectangle ``rect=(x1, y1, x2, y2)`` (exclusive)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    if rect:
        image.paste(rect_color, rect)
    image.save(path, format=fmt or ("PNG" if path.suffix == ".png" else "JPEG"), quality=95)
    return path


def write_label(image_path: Path, lines: list[str]) -> Path:
    label = label_path_for(image_path)
    label.parent.mkdir(parents=True, exist_ok=True)
    label.write_text("".join(line + "\n" for line in lines))
    return label


def make_dataset(root: Path, n_train=3, n_val=2, spec=None) -> Path:
    """images/{train,val}/*.jpg with one label each, and a data.yaml (``spec`` overrides keys)."""
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            img = write_image(root / "images" / split / f"{i}.jpg")
            write_label(img, [f"{i % 2} 0.5 0.5 0.25 0.25"])
    data = {"path": ".", "train": "images/train", "val": "images/val", "names": ["a", "b"]}
    data.update(spec or {})
    data = {k: v for k, v in data.items() if v is not None}
    yaml_path = root / "data.yaml"
    yaml_path.write_text(yaml.safe_dump(data))
    return yaml_path


def xywhn_to_xyxy(t: torch.Tensor, size: int) -> torch.Tensor:
    cx, cy, w, h = (t[:, i] * size for i in range(4))
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


# ---------------------------------------------------------------------- config
def test_config_directory_form(tmp_path):
    cfg = load_data_config(make_dataset(tmp_path))
    assert cfg.path == tmp_path
    assert [p.name for p in cfg.train] == ["0.jpg", "1.jpg", "2.jpg"]
    assert len(cfg.val) == 2 and cfg.names == ["a", "b"] and cfg.nc == 2
    assert cfg.yaml_path == (tmp_path / "data.yaml").resolve()


def test_config_list_file_form_and_names_mapping(tmp_path):
    yaml_path = make_dataset(tmp_path, spec={"train": "train.txt", "names": {0: "a", 1: "b"}, "nc": 2})
    absolute = tmp_path / "images" / "train" / "2.jpg"
    (tmp_path / "train.txt").write_text(f"./images/train/0.jpg\nimages/train/1.jpg\n\n{absolute}\n")
    cfg = load_data_config(yaml_path)
    assert cfg.train == [tmp_path / "images/train/0.jpg", tmp_path / "images/train/1.jpg", absolute]
    assert cfg.names == ["a", "b"]


def test_config_list_of_dirs_nc_only_and_default_root(tmp_path):
    yaml_path = make_dataset(tmp_path, spec={"path": None, "train": ["images/train", "images/val"], "names": None, "nc": 3})
    cfg = load_data_config(yaml_path)
    assert cfg.path == tmp_path
    assert len(cfg.train) == 5 and cfg.names == ["class0", "class1", "class2"] and cfg.nc == 3


def test_config_relative_root(tmp_path):
    make_dataset(tmp_path / "ds")
    yaml_path = tmp_path / "cfg" / "data.yaml"
    yaml_path.parent.mkdir()
    yaml_path.write_text(yaml.safe_dump({"path": "../ds", "train": "images/train", "val": "images/val", "names": ["a", "b"]}))
    assert load_data_config(yaml_path).path == tmp_path / "ds"


def test_label_path_replaces_last_images_component():
    assert label_path_for("/d/images/x/images/train/a.b.jpg") == Path("/d/images/x/labels/train/a.b.txt")
    assert label_path_for("/d/pics/a.png") == Path("/d/pics/a.txt")


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"train": None}, ["missing 'train'"]),
        ({"val": None}, ["missing 'val'"]),
        ({"val": "images/nope"}, ["does not exist", "images/nope"]),
        ({"train": "empty"}, ["no images found", "train"]),
        ({"nc": 3}, ["disagrees", "nc"]),
        ({"names": {0: "a", 2: "b"}}, ["0..1"]),
    ],
)
def test_config_errors_name_the_file_and_the_fix(tmp_path, spec, words):
    (tmp_path / "empty").mkdir()
    yaml_path = make_dataset(tmp_path, spec=spec)
    with pytest.raises(FinetuneError) as err:
        load_data_config(yaml_path)
    message = str(err.value)
    assert str(yaml_path) in message and "\n" not in message
    for word in words:
        assert word in message


def test_config_missing_file_and_not_a_mapping(tmp_path):
    with pytest.raises(FinetuneError, match="data.yaml not found.*nope.yaml"):
        load_data_config(tmp_path / "nope.yaml")
    bad = tmp_path / "data.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(FinetuneError, match=f"{bad}.*expected a mapping"):
        load_data_config(bad)


def test_config_no_labels_at_all(tmp_path):
    yaml_path = make_dataset(tmp_path)
    for label in (tmp_path / "labels" / "train").iterdir():
        label.unlink()
    with pytest.raises(FinetuneError, match=r"no labels found.*expected labels/<name>.txt beside images/") as err:
        load_data_config(yaml_path)
    assert str(yaml_path) in str(err.value)


# ---------------------------------------------------------------------- letterbox geometry
def test_item_shapes_and_letterbox_maps_box_exactly(tmp_path):
    # 200x100 image; a white box at x 50..110, y 20..60 → letterbox 64: ratio .32, pad (0, 16).
    img = write_image(tmp_path / "images" / "a.png", size=(200, 100), rect=(50, 20, 110, 60))
    write_label(img, ["1 0.4 0.4 0.3 0.4"])
    ds = YoloDataset([img], imgsz=64, augment=False, nc=2)
    image, targets, meta = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert targets.shape == (1, 6) and targets.dtype == torch.float32
    assert meta == {"path": str(img), "image_id": 0, "orig_shape": (100, 200), "ratio": 0.32, "pad": (0, 16)}
    torch.testing.assert_close(targets[0], torch.tensor([0, 1, 0.4, 0.45, 0.3, 0.2]))
    # Gray padding above/below, the white box where the target says.
    assert (image[:, :16] == PAD_VALUE).all() and (image[:, 48:] == PAD_VALUE).all()
    x1, y1, x2, y2 = xywhn_to_xyxy(targets[:, 2:], 64)[0].tolist()
    assert image[:, int((y1 + y2) / 2), int((x1 + x2) / 2)].min() > 240
    # meta maps back to the original pixels exactly.
    padw, padh = meta["pad"]
    back = [(x1 - padw) / meta["ratio"], (y1 - padh) / meta["ratio"], (x2 - padw) / meta["ratio"], (y2 - padh) / meta["ratio"]]
    assert back == pytest.approx([50, 20, 110, 60], abs=1e-4)


def test_portrait_image_pads_left_and_right(tmp_path):
    img = write_image(tmp_path / "images" / "p.jpg", size=(30, 60))
    write_label(img, ["0 0.5 0.5 1.0 1.0"])
    image, targets, meta = YoloDataset([img], imgsz=32, nc=1)[0]
    assert meta["pad"] == (8, 0) and meta["ratio"] == pytest.approx(32 / 60)
    torch.testing.assert_close(targets[0, 2:], torch.tensor([0.5, 0.5, 0.5, 1.0]))
    assert (image[:, :, :8] == PAD_VALUE).all() and (image[:, :, 24:] == PAD_VALUE).all()


# ---------------------------------------------------------------------- bad data
def test_corrupt_images_and_label_lines_are_skipped_and_counted(tmp_path):
    d = tmp_path / "images"
    good = write_image(d / "good.jpg")
    write_label(good, [
        "0 0.5 0.5 0.2 0.2",  # ok
        "1 0.3 0.3 0.1 0.1",  # ok
        "0 0.5 0.5 0.2",  # wrong column count
        "x 0.5 0.5 0.2 0.2",  # non-numeric
        "5 0.5 0.5 0.2 0.2",  # class out of range
        "-1 0.5 0.5 0.2 0.2",  # negative class
        "0 1.5 0.5 0.2 0.2",  # outside the image
        "0 0.5 0.5 0 0.2",  # zero size
        "0 0.5 0.5 -0.1 0.2",  # negative size
        "0 nan 0.5 0.1 0.1",  # not finite
        "",  # blank lines are fine
    ])
    background = write_image(d / "background.jpg")  # no label file: a valid background image
    garbage = d / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg at all" * 10)
    whole = write_image(d / "trunc.jpg", size=(64, 64), rect=(5, 5, 40, 40)).read_bytes()
    truncated = d / "trunc.jpg"
    truncated.write_bytes(whole[: len(whole) // 2])
    write_label(truncated, ["0 0.5 0.5 0.2 0.2"])
    missing = d / "missing.jpg"

    ds = YoloDataset([good, background, garbage, truncated, missing], imgsz=32, nc=2)
    assert ds.stats == {"images": 2, "skipped_images": 3, "labels": 2, "skipped_label_lines": 8, "empty_images": 1}
    assert [Path(p).name for p in ds.image_paths] == ["good.jpg", "background.jpg"]
    summary = ds.summary()
    assert "3 unusable images skipped" in summary and "8 bad label lines skipped" in summary and "\n" not in summary
    assert ds[0][1].shape == (2, 6) and ds[1][1].shape == (0, 6)


def test_all_images_unusable_is_a_user_error(tmp_path):
    bad = tmp_path / "images" / "x.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"nope")
    with pytest.raises(FinetuneError, match=r"all 1 images are unusable.*x.jpg"):
        YoloDataset([bad], imgsz=32, nc=1)


def test_slightly_outside_box_is_clipped_not_dropped(tmp_path):
    img = write_image(tmp_path / "images" / "a.jpg", size=(32, 32))
    write_label(img, ["0 0.1 0.5 0.205 0.2"])  # left edge at -0.0025: rounding noise
    ds = YoloDataset([img], imgsz=32, nc=1)
    assert ds.stats["skipped_label_lines"] == 0
    assert ds[0][1][0, 2:].tolist() == pytest.approx([0.10125, 0.5, 0.2025, 0.2], abs=1e-5)


def test_image_that_vanishes_after_construction_does_not_crash(tmp_path):
    img = write_image(tmp_path / "images" / "a.jpg")
    write_label(img, ["0 0.5 0.5 0.2 0.2"])
    ds = YoloDataset([img], imgsz=32, augment=True, nc=1)
    img.unlink()
    image, targets, _ = ds[0]
    assert image.shape == (3, 32, 32) and targets.shape == (0, 6)


# ---------------------------------------------------------------------- augmentation
def one_box_dataset(tmp_path, hyp, imgsz=64):
    img = write_image(tmp_path / "images" / "a.png", size=(64, 64), color=(114, 114, 114), rect=(8, 16, 24, 40))
    write_label(img, ["0 0.25 0.4375 0.25 0.375"])  # exactly the white rectangle
    return YoloDataset([img], imgsz=imgsz, augment=True, hyp={**NO_AUG, **hyp}, nc=1)


def bright_extent(image: torch.Tensor) -> list[int]:
    ys, xs = torch.nonzero(image[0] > 200, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_flips_move_image_and_box_together(tmp_path):
    ds = one_box_dataset(tmp_path, {"fliplr": 1.0, "flipud": 1.0})
    image, targets, _ = ds[0]
    torch.testing.assert_close(targets[0, 2:], torch.tensor([0.75, 0.5625, 0.25, 0.375]))
    assert bright_extent(image) == [40, 24, 56, 48]
    assert xywhn_to_xyxy(targets[:, 2:], 64)[0].tolist() == [40, 24, 56, 48]


def test_affine_box_follows_the_pixels(tmp_path):
    ds = one_box_dataset(tmp_path, {"translate": 0.2, "scale": 0.5})
    for seed in range(5):
        torch.manual_seed(seed)
        image, targets, _ = ds[0]
        if len(targets) == 0:
            continue  # shifted out of view: dropped, which is allowed
        box = xywhn_to_xyxy(targets[:, 2:], 64)[0].tolist()
        assert box == pytest.approx(bright_extent(image), abs=1.5)


def test_random_affine_keeps_boxes_valid(tmp_path):
    img = write_image(tmp_path / "images" / "a.jpg", size=(80, 60))
    lines = ["0 0.5 0.5 0.3 0.3", "1 0.1 0.1 0.15 0.15", "0 0.9 0.85 0.2 0.3", "1 0.5 0.2 0.05 0.05"]
    write_label(img, lines)
    hyp = {"degrees": 30, "translate": 0.3, "scale": 0.6, "shear": 10, "mosaic": 0.5, "flipud": 0.5}
    ds = YoloDataset([img, img], imgsz=64, augment=True, hyp=hyp, nc=2)
    torch.manual_seed(0)
    counts = []
    for _ in range(25):
        image, targets, _ = ds[0]
        assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
        xyxy = xywhn_to_xyxy(targets[:, 2:], 64)
        assert ((xyxy >= -1e-4) & (xyxy <= 64 + 1e-4)).all()
        assert ((xyxy[:, 2:] - xyxy[:, :2]) >= 2 - 1e-4).all()  # tiny boxes dropped
        assert set(targets[:, 1].tolist()) <= {0.0, 1.0}
        counts.append(len(targets))
    assert max(counts) <= 4 * len(lines)  # a mosaic has at most 4 images' boxes
    assert min(counts) < max(counts)  # something actually varied


def test_warp_matches_box_transform_under_rotation():
    image = torch.full((3, 96, 96), PAD_VALUE, dtype=torch.uint8)
    image[:, 30:50, 20:70] = 255
    matrix = affine_matrix(25, 0.9, (5, 0), (4, -3), (96, 96), 64)
    warped = warp_image(image, matrix, 64)
    box = warp_boxes(torch.tensor([[20.0, 30, 70, 50]]), matrix)[0].tolist()
    assert box == pytest.approx(bright_extent(warped), abs=1.5)


def test_augmentation_is_deterministic_for_a_seed(tmp_path):
    ds = one_box_dataset(tmp_path, {"translate": 0.2, "scale": 0.5, "hsv_s": 0.7, "hsv_v": 0.4, "fliplr": 0.5})
    torch.manual_seed(3)
    a = [ds[0] for _ in range(3)]
    torch.manual_seed(3)
    b = [ds[0] for _ in range(3)]
    for (ia, ta, _), (ib, tb, _) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(ta, tb)


def test_resolve_hyp_defaults_and_errors():
    hyp = resolve_hyp({"fliplr": "0.25", "box": 0.05})
    assert hyp["fliplr"] == 0.25 and hyp["hsv_s"] == 0.7 and hyp["mosaic"] == 0.0
    with pytest.raises(FinetuneError, match="fliplr"):
        resolve_hyp({"fliplr": 2})
    with pytest.raises(FinetuneError, match="scale"):
        resolve_hyp({"scale": "big"})


# ---------------------------------------------------------------------- cache and loaders
def small_dataset(tmp_path, n=6, **kwargs):
    paths = []
    for i in range(n):
        img = write_image(tmp_path / "images" / f"{i}.jpg", size=(40 + 8 * i, 30), rect=(2, 3, 20, 25))
        write_label(img, [f"{i % 2} 0.4 0.5 0.3 0.4"])
        paths.append(img)
    return YoloDataset(paths, imgsz=32, nc=2, **kwargs)


def test_ram_cache_returns_the_same_items(tmp_path):
    plain = small_dataset(tmp_path)
    cached = small_dataset(tmp_path, cache="ram")
    assert cached.ram_bytes() > 0 and "cached in RAM" in cached.summary()
    for i in range(len(plain)):
        a, b = plain[i], cached[i]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_bad_cache_mode_is_a_user_error(tmp_path):
    with pytest.raises(FinetuneError, match="cache"):
        small_dataset(tmp_path, n=1, cache="disk")


def test_collate_fills_batch_index(tmp_path):
    ds = small_dataset(tmp_path, n=3)
    images, targets, metas = collate_fn([ds[0], ds[1], ds[2]])
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    assert targets[:, 0].tolist() == [0.0, 1.0, 2.0]
    assert [m["image_id"] for m in metas] == [0, 1, 2]


def test_distributed_sampler_splits_the_dataset(tmp_path):
    ds = small_dataset(tmp_path, n=6)
    seen = []
    for rank in (0, 1):
        loader, sampler = build_dataloader(ds, batch_size=2, workers=0, shuffle=True, distributed=True, seed=1, num_replicas=2, rank=rank)
        sampler.set_epoch(0)
        ids = [m["image_id"] for _, _, metas in loader for m in metas]
        assert len(ids) == 3
        seen.append(ids)
    assert sorted(seen[0] + seen[1]) == list(range(6))
    loader, sampler = build_dataloader(ds, 2, 0, True, True, seed=1, num_replicas=2, rank=0)
    orders = set()
    for epoch in range(4):
        sampler.set_epoch(epoch)
        orders.add(tuple(m["image_id"] for _, _, metas in loader for m in metas))
    assert len(orders) > 1  # set_epoch reshuffles


def test_non_distributed_loader_with_a_worker_is_reproducible(tmp_path):
    ds = small_dataset(tmp_path, n=4)
    ds.augment = True
    runs = []
    for _ in range(2):
        loader, sampler = build_dataloader(ds, batch_size=2, workers=1, shuffle=True, distributed=False, seed=5)
        assert sampler.num_replicas == 1 and loader.persistent_workers
        runs.append([(images, targets) for images, targets, _ in loader])
    for (ia, ta), (ib, tb) in zip(*runs):
        assert torch.equal(ia, ib) and torch.equal(ta, tb)


def test_an_epoch_resumed_part_way_skips_exactly_the_samples_already_seen(tmp_path):
    ds = small_dataset(tmp_path, n=4)
    for distributed, replicas in ((False, 1), (True, 2)):
        loader, sampler = build_dataloader(ds, batch_size=1, workers=0, shuffle=True, distributed=distributed,
                                           seed=3, num_replicas=replicas, rank=0)
        sampler.set_epoch(5)
        whole = list(sampler)
        sampler.set_epoch(5, start=1)
        assert list(sampler) == whole[1:] and len(loader) == len(whole) - 1
        # The order of an epoch depends only on (seed, epoch): iterating other epochs first changes nothing.
        for other in (0, 1, 2):
            sampler.set_epoch(other)
            list(sampler)
        sampler.set_epoch(5)
        assert list(sampler) == whole


def test_grayscale_16bit_png_and_bmp_decode_to_rgb_uint8(tmp_path):
    import numpy as np

    gray16 = tmp_path / "images" / "g16.png"
    gray16.parent.mkdir(parents=True)
    Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)).save(gray16)
    bmp = write_image(tmp_path / "images" / "c.bmp", size=(20, 10), fmt="BMP")
    ds = YoloDataset([gray16, bmp], imgsz=32, nc=1)
    assert ds.stats["images"] == 2
    for i in range(2):
        image, _, _ = ds[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    # 40000/65535 of full scale → 156 (not the low byte, 64); rows outside are padding.
    assert ds[0][0][:, 8:24].unique().tolist() == [156]


@pytest.mark.parametrize("scale,translate", [(0.5, (10.0, -5.0)), (1.3, (-20.0, 7.0)), (1.0, (0.0, 0.0)),
                                             (1.5, (6.0, -6.0)), (1.47, (-6.3, 5.9)), (0.53, (6.4, 6.4))])
def test_scale_translate_fast_path_boxes_follow_the_pixels(scale, translate):
    from finetune.data.augment import scale_translate, warp_boxes

    image = torch.full((3, 64, 64), 0, dtype=torch.uint8)
    image[:, 20:40, 10:30] = 255  # a white box x 10..30, y 20..40 (pixel edges)
    out, matrix = scale_translate(image, scale, translate, 64)
    box = torch.from_numpy(warp_boxes(np.array([[10.0, 20.0, 30.0, 40.0]]), matrix)[0])
    ys, xs = torch.nonzero(out[0] > 200, as_tuple=True)
    found = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    assert torch.allclose(box.float().clamp(0, 64), found, atol=1.01), (box, found)
    # outside the pasted image the canvas is the letterbox gray
    assert out.shape == (3, 64, 64)


@pytest.mark.parametrize("scale,translate", [(1.5, (6.0, -6.0)), (1.21, (-3.7, 2.2)), (0.6, (5.0, 1.0)), (1.0, (0.0, 0.0))])
def test_scale_translate_resizes_only_the_visible_part_as_a_whole_resize_would(scale, translate):
    """Resizing just the visible crop gives (nearly) the pixels of resizing the whole image
    and pasting it: only bilinear sampling phases differ."""
    from finetune.data.augment import scale_translate
    from torchvision.transforms.v2 import functional as TF

    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(48.0), indexing="ij")
    smooth = (127 + 60 * torch.sin(xx / 5) + 60 * torch.cos(yy / 7)).to(torch.uint8).expand(3, 64, 48).contiguous()
    out, matrix = scale_translate(smooth, scale, translate, 64)
    new_h, new_w = round(64 * scale), round(48 * scale)
    whole = TF.resize(smooth, [new_h, new_w], antialias=False)
    reference = torch.full((3, 64, 64), 114, dtype=torch.uint8)
    ox, oy = round(32 + translate[0] - 48 * scale / 2), round(32 + translate[1] - 64 * scale / 2)
    x0, y0, x1, y1 = max(ox, 0), max(oy, 0), min(ox + new_w, 64), min(oy + new_h, 64)
    reference[:, y0:y1, x0:x1] = whole[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[y0 + 1:y1 - 1, x0 + 1:x1 - 1] = True  # edges may move by one pixel (rounding)
    diff = (out.int() - reference.int()).abs()[:, inside]
    # (a slope of up to ~9 levels per pixel: a sub-pixel phase gives a few levels, a shifted
    # crop tens of levels)
    assert diff.float().mean() < 6 and diff.max() <= 25, (diff.float().mean(), diff.max())
    # The map sends the source's corners to where the whole resize puts them (both round
    # sizes to whole pixels, differently: ±1.5 px).
    corners = matrix @ torch.tensor([[0.0, 48.0], [0.0, 64.0], [1.0, 1.0]], dtype=torch.float64)
    assert abs(corners[0, 0] - ox) <= 1.5 and abs(corners[1, 0] - oy) <= 1.5
    assert abs(corners[0, 1] - (ox + new_w)) <= 1.5 and abs(corners[1, 1] - (oy + new_h)) <= 1.5


@pytest.mark.parametrize("gain", [(1.3, 0.7), (-1.0, 1.0), (0.5, -2.0)])
def test_warp_boxes_of_axis_aligned_maps_and_mirrors(gain):
    from finetune.data.augment import warp_boxes

    boxes = np.array([[10.0, 20.0, 30.0, 45.0], [0.0, 0.0, 5.0, 1.0]], dtype=np.float32)
    matrix = torch.tensor([[gain[0], 0.0, 7.5], [0.0, gain[1], -3.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    xs, ys = boxes[:, [0, 2, 2, 0]], boxes[:, [1, 1, 3, 3]]
    tx, ty = gain[0] * xs + 7.5, gain[1] * ys - 3.0
    expected = np.stack([tx.min(1), ty.min(1), tx.max(1), ty.max(1)], 1)
    assert np.allclose(warp_boxes(boxes, matrix), expected)
