"""A synthetic YOLO dataset of coloured shapes on noisy backgrounds.

It exists so the whole pipeline (operator → trainer → metrics) can be exercised, and
transfer learning demonstrated, without downloading anything: make a "source" dataset with
some shape classes, train on it, then fine-tune on a "target" dataset with other classes.
Everything is drawn with PIL from one ``numpy`` generator, so a seed gives byte-identical
files (for a given Pillow/libjpeg build) and reruns are reproducible.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageChops, ImageDraw

from finetune.errors import FinetuneError

SHAPES = ("circle", "square", "triangle", "star", "cross", "ellipse", "diamond", "hexagon")

_EMPTY_FRACTION = 0.08  # share of images with no objects (background examples)
_MAX_IOU = 0.3  # overlap allowed between objects: partial occlusion, never hidden
_MAX_COVERED = 0.5  # a later shape may cover at most this fraction of an earlier box
_PLACEMENT_TRIES = 20
_JPEG_QUALITY = 90


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    classes: list[str] | None = None,
    n_train: int = 200,
    n_val: int = 50,
    imgsz: int = 320,
    seed: int = 0,
    max_objects: int = 6,
    min_size_frac: float = 0.08,
    max_size_frac: float = 0.45,
    fmt: str = "jpg",
) -> Path:
    """Write ``images/{train,val}``, ``labels/{train,val}`` and ``data.yaml`` under ``out_dir``.

    ``classes`` picks shape classes (in that order; default all of :data:`SHAPES`). Images
    are ``imgsz`` wide and mostly ``0.75*imgsz`` high (some portrait or square, to exercise
    letterboxing). Object sizes are fractions of the image's shorter side. Returns the path
    of ``data.yaml``.
    """
    names = _check_args(
        classes, n_train, n_val, imgsz, max_objects, min_size_frac, max_size_frac, fmt
    )
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        image_dir, label_dir = out / "images" / split, out / "labels" / split
        _prepare_dir(image_dir, split)
        _prepare_dir(label_dir, split)
        for i in range(count):
            image, rows = _make_image(rng, names, imgsz, max_objects, min_size_frac, max_size_frac)
            stem = f"{split}_{i:05d}"
            _save_image(image, image_dir / f"{stem}.{fmt}", fmt)
            (label_dir / f"{stem}.txt").write_text("".join(rows))
    data_yaml = out / "data.yaml"
    spec = {
        "path": ".",  # relative to data.yaml: the folder can be moved or mounted anywhere
        "train": "images/train",
        "val": "images/val",
        "nc": len(names),
        "names": names,
    }
    data_yaml.write_text(yaml.safe_dump(spec, sort_keys=False))
    return data_yaml


def _check_args(classes, n_train, n_val, imgsz, max_objects, min_frac, max_frac, fmt) -> list[str]:
    names = list(SHAPES) if classes is None else list(classes)
    unknown = [c for c in names if c not in SHAPES]
    if unknown:
        raise FinetuneError(f"unknown shape class(es) {unknown}; choose from {', '.join(SHAPES)}")
    if not names or len(set(names)) != len(names):
        raise FinetuneError(f"classes {names} must be a non-empty list without repeats")
    if fmt not in ("jpg", "png"):
        raise FinetuneError(f"image format {fmt!r} is not supported; use 'jpg' or 'png'")
    if imgsz < 32 or n_train < 0 or n_val < 0 or max_objects < 0:
        raise FinetuneError("imgsz must be >= 32 and image/object counts >= 0")
    if not 0 < min_frac <= max_frac <= 0.9:
        raise FinetuneError(
            f"object size fractions {min_frac}..{max_frac} must satisfy 0 < min <= max <= 0.9"
        )
    return names


def _prepare_dir(folder: Path, split: str) -> None:
    """Create ``folder`` and remove files a previous, larger run of ours left behind."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{split}_*"):
        if stale.suffix in (".jpg", ".png", ".txt") and stale.is_file():
            stale.unlink()


def _save_image(image: Image.Image, path: Path, fmt: str) -> None:
    if fmt == "jpg":
        image.save(path, format="JPEG", quality=_JPEG_QUALITY)
    else:
        image.save(path, format="PNG")


# ---------------------------------------------------------------------- one image
def _image_size(rng: np.random.Generator, imgsz: int) -> tuple[int, int]:
    """(width, height): mostly landscape 4:3, some portrait and square."""
    short = int(imgsz * 0.75)
    kind = rng.random()
    if kind < 0.8:
        return imgsz, short
    if kind < 0.9:
        return short, imgsz
    return imgsz, imgsz


def _make_image(
    rng, names, imgsz, max_objects, min_frac, max_frac
) -> tuple[Image.Image, list[str]]:
    """One image and its YOLO label lines."""
    width, height = _image_size(rng, imgsz)
    background = _background(rng, width, height)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    empty = max_objects == 0 or rng.random() < _EMPTY_FRACTION
    n_objects = 0 if empty else int(rng.integers(1, max_objects + 1))
    placed: list[tuple[float, float, float, float]] = []
    rows = []
    for _ in range(n_objects):
        cls = int(rng.integers(len(names)))
        shape = _place_shape(rng, names[cls], width, height, min_frac, max_frac, placed)
        if shape is None:
            continue
        _, geometry, box = shape
        color = _contrasting_color(rng, background, box)
        _draw(draw, geometry, color)
        placed.append(box)
        rows.append(_label_line(cls, box, width, height))
    _add_grain(rng, image)
    return image, rows


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A colour gradient with low-frequency blotches: texture a detector must learn to ignore.

    Both are laid out on a coarse grid and blown up with one bilinear resize (a linear
    gradient survives bilinear interpolation), which is ~10x cheaper than full-size numpy.
    """
    gw, gh = max(2, width // 24), max(2, height // 24)
    base = rng.uniform(30, 225, size=3)
    tilt = rng.uniform(-60, 60, size=(2, 3))
    xs = np.linspace(-0.5, 0.5, gw)[None, :, None]
    ys = np.linspace(-0.5, 0.5, gh)[:, None, None]
    cells = base + xs * tilt[0] + ys * tilt[1] + rng.uniform(-40, 40, size=(gh, gw, 3))
    coarse = Image.fromarray(np.clip(cells, 0, 255).astype(np.uint8))
    return np.asarray(coarse.resize((width, height), Image.Resampling.BILINEAR))


def _add_grain(rng: np.random.Generator, image: Image.Image) -> None:
    """Per-pixel noise of ±12 over everything (shapes included), like sensor noise."""
    noise = rng.integers(0, 25, size=(image.height, image.width, 3), dtype=np.uint8)
    image.paste(ImageChops.add(image, Image.fromarray(noise), scale=1.0, offset=-12))


def _contrasting_color(rng, background: np.ndarray, box) -> tuple[int, int, int]:
    """A saturated colour that stands out from the background under the box."""
    x1, y1, x2, y2 = (int(v) for v in box)
    local = background[y1 : max(y2, y1 + 1), x1 : max(x2, x1 + 1)].reshape(-1, 3).mean(0)
    color = rng.integers(0, 256, size=3)
    for _ in range(10):
        if np.abs(color - local).sum() >= 150:
            break
        color = rng.integers(0, 256, size=3)
    return int(color[0]), int(color[1]), int(color[2])


# ---------------------------------------------------------------------- shapes
def _place_shape(rng, kind, width, height, min_frac, max_frac, placed):
    """Size, position and geometry for a shape that overlaps the placed ones only a little.

    Returns ``(kind, geometry, tight_box)`` or None when no spot was found. The whole shape
    stays inside the image so the label is its true tight box.
    """
    short = min(width, height)
    for _ in range(_PLACEMENT_TRIES):
        size = short * math.exp(rng.uniform(math.log(min_frac), math.log(max_frac)))
        geometry, (bw, bh) = _geometry(rng, kind, size)
        if bw >= width - 2 or bh >= height - 2:
            continue
        x0 = rng.uniform(1, width - bw - 1)
        y0 = rng.uniform(1, height - bh - 1)
        box = (x0, y0, x0 + bw, y0 + bh)
        if all(_acceptable_overlap(box, other) for other in placed):
            return kind, _offset(geometry, x0, y0), box
    return None


def _geometry(rng, kind: str, size: float):
    """Shape geometry relative to its box's top-left corner, and the box's (w, h).

    Polygons are a list of vertices; circle/ellipse are an ``(x1, y1, x2, y2)`` bounding box.
    Square and diamond keep their orientation (one is the other turned 45°); the other
    polygons turn a little so the detector does not learn one pose.
    """
    if kind == "circle":
        return ("ellipse", (0.0, 0.0, size, size)), (size, size)
    if kind == "ellipse":
        aspect = rng.uniform(0.45, 0.7)
        w, h = (size, size * aspect) if rng.random() < 0.5 else (size * aspect, size)
        return ("ellipse", (0.0, 0.0, w, h)), (w, h)
    if kind == "square":
        return ("polygon", [(0.0, 0.0), (size, 0.0), (size, size), (0.0, size)]), (size, size)
    if kind == "diamond":
        squash = rng.uniform(0.7, 1.0)
        w, h = (size * squash, size) if rng.random() < 0.5 else (size, size * squash)
        return ("polygon", [(w / 2, 0.0), (w, h / 2), (w / 2, h), (0.0, h / 2)]), (w, h)
    turn = rng.uniform(-15, 15)
    points = _unit_polygon(kind, turn)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    span = max(max(xs) - min(xs), max(ys) - min(ys))
    vertices = [((x - min(xs)) * size / span, (y - min(ys)) * size / span) for x, y in points]
    w = (max(xs) - min(xs)) * size / span
    h = (max(ys) - min(ys)) * size / span
    return ("polygon", vertices), (w, h)


def _unit_polygon(kind: str, turn_degrees: float) -> list[tuple[float, float]]:
    """Vertices around the origin (radius ~1) for the polygonal classes, turned a little."""
    if kind == "triangle":
        radii, count, start = [1.0], 3, -90.0
    elif kind == "hexagon":
        radii, count, start = [1.0], 6, 0.0
    elif kind == "star":
        radii, count, start = [1.0, 0.42], 10, -90.0
    elif kind == "cross":
        t = 0.33  # arm half-width
        pts = [
            (-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t),
            (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t),
        ]  # fmt: skip
        return _rotate(pts, turn_degrees)
    else:
        raise AssertionError(kind)
    pts = []
    for i in range(count):
        angle = math.radians(start + 360.0 * i / count)
        r = radii[i % len(radii)]
        pts.append((r * math.cos(angle), r * math.sin(angle)))
    return _rotate(pts, turn_degrees)


def _rotate(points, degrees: float) -> list[tuple[float, float]]:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return [(x * c - y * s, x * s + y * c) for x, y in points]


def _offset(geometry, x0: float, y0: float):
    kind, data = geometry
    if kind == "ellipse":
        x1, y1, x2, y2 = data
        return kind, (x1 + x0, y1 + y0, x2 + x0, y2 + y0)
    return kind, [(x + x0, y + y0) for x, y in data]


def _draw(draw: ImageDraw.ImageDraw, geometry, color) -> None:
    shape, data = geometry
    if shape == "ellipse":
        draw.ellipse(data, fill=color)
    else:
        draw.polygon(data, fill=color)


def _acceptable_overlap(box, other) -> bool:
    """Allow partial occlusion: limited IoU, and the earlier box stays mostly visible."""
    ix = max(0.0, min(box[2], other[2]) - max(box[0], other[0]))
    iy = max(0.0, min(box[3], other[3]) - max(box[1], other[1]))
    inter = ix * iy
    if inter == 0:
        return True
    area_a = (box[2] - box[0]) * (box[3] - box[1])
    area_b = (other[2] - other[0]) * (other[3] - other[1])
    iou = inter / (area_a + area_b - inter)
    return iou <= _MAX_IOU and inter <= _MAX_COVERED * area_b


def _label_line(cls: int, box, width: int, height: int) -> str:
    x1, y1, x2, y2 = box
    return (
        f"{cls} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
        f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}\n"
    )
