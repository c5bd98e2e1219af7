"""Letterboxing and train-time augmentation for detection samples.

Images are ``uint8`` tensors ``[3, H, W]`` (RGB) stored channels-last (``H, W, 3`` in
memory, see :func:`channels_last`), the layout the trainer runs the model in. Boxes are
``float32`` numpy arrays ``[n, 4]`` in absolute ``xyxy`` pixels of the image they travel
with, classes ``[n]`` arrays: numpy's per-operation cost on such tiny arrays is a fraction
of torch's. The loader augments a batch at a time (:func:`augment_batch`): images one by
one, the boxes of the whole batch in one array, so the box arithmetic costs a few
operations per batch, in the process that trains on small CPU nodes. Every geometric step
returns the exact pixel map it applied, and boxes follow that map. Resizing and flipping
images use ``torchvision.transforms.v2.functional``, colour jitter OpenCV (see
:func:`random_colors`). All randomness is drawn from torch's global RNG, which
``DataLoader`` seeds per worker, so a seeded run is reproducible.

Hyperparameter keys, defaults and ranges are those of :mod:`finetune.hyperparameters`
(YOLOv5's: ``hsv_h``, ``scale``, ``fliplr``, ...); :func:`resolve_hyp` checks a run's values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import cv2
import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from finetune.hyperparameters import resolve as resolve_hyp  # noqa: F401  (re-exported: the loader checks its hyp with it)

PAD_VALUE = 114  # the gray YOLOv5 letterboxes with; pretrained weights have seen it

# OpenCV's own thread pool: none. Its calls here take tens of microseconds per image, the
# model's threads (or the other loader processes) have the cores, and a pool inherited
# across the DataLoader's fork can hang (YOLOv5 sets the same for that reason).
cv2.setNumThreads(0)

# Boxes that an augmentation shrinks below this are no longer a fair training target.
MIN_BOX_PX = 2.0
MIN_AREA_RATIO = 0.1
MAX_ASPECT = 20.0


# ----------------------------------------------------------------------------- randomness
def _uniform(low: float, high: float) -> float:
    """One draw from torch's global RNG, so DataLoader worker seeding governs it."""
    return low + (high - low) * float(torch.rand(()))


# ----------------------------------------------------------------------------- layout
# Samples are kept channels-last (pixel-interleaved) from decoding to the batch: the model
# trains ~25% faster on CPU in that layout (yolov5n, 2 cores, measured), uint8 bilinear
# resizing has a ~2.5x faster (AVX2) kernel for it, and a batch of such samples is stacked
# without transposing.
def channels_last(image: torch.Tensor) -> torch.Tensor:
    """``image`` ``[C, H, W]`` with ``H, W, C`` memory order (no copy if it already has it)."""
    return image.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def gray_canvas(height: int, width: int, channels: int = 3) -> torch.Tensor:
    """A letterbox-gray uint8 ``[C, H, W]`` image, channels-last."""
    return torch.full((height, width, channels), PAD_VALUE, dtype=torch.uint8).permute(2, 0, 1)


# ----------------------------------------------------------------------------- letterbox
def resize_longest(image: torch.Tensor, imgsz: int) -> tuple[torch.Tensor, float]:
    """Resize so the longest side is ``imgsz`` (aspect kept); returns the image and the gain."""
    h0, w0 = image.shape[-2:]
    ratio = imgsz / max(h0, w0)
    if ratio == 1.0:
        return image, ratio
    size = [max(1, round(h0 * ratio)), max(1, round(w0 * ratio))]
    return F.resize(image, size, antialias=True), ratio


def pad_to_square(image: torch.Tensor, imgsz: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Centre the (already resized) image on an ``imgsz`` square of gray; returns (padw, padh)."""
    h, w = image.shape[-2:]
    padw, padh = (imgsz - w) // 2, (imgsz - h) // 2
    if padw == 0 and padh == 0 and h == w == imgsz:
        return image, (0, 0)
    out = gray_canvas(imgsz, imgsz, image.shape[0])
    out[:, padh : padh + h, padw : padw + w] = image
    return out, (padw, padh)


def normalized_to_letterbox(
    xywhn: np.ndarray, orig_shape: tuple[int, int], ratio: float, pad: tuple[int, int]
) -> np.ndarray:
    """YOLO ``cx cy w h`` (normalized to the original image) → ``xyxy`` pixels after letterbox.

    Both axes use the single gain ``ratio`` (not the rounded resized size) so that
    ``(x - padw) / ratio`` maps a letterboxed coordinate back to the original exactly.
    """
    h0, w0 = orig_shape
    size = np.array([w0, h0, w0, h0], dtype=np.float32)
    centre, half = xywhn[:, 0:2], xywhn[:, 2:4] / 2
    xyxy = np.concatenate([centre - half, centre + half], axis=1) * size
    xyxy = np.clip(xyxy, 0, size) * np.float32(ratio)
    return (xyxy + np.array([pad[0], pad[1], pad[0], pad[1]], dtype=np.float32)).astype(np.float32)


def xyxy_to_xywhn(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Absolute ``xyxy`` → normalized ``cx cy w h`` (the target format the loss expects)."""
    size = np.array([width, height], dtype=np.float32)
    centre = (boxes[:, 0:2] + boxes[:, 2:4]) / (2 * size)
    return np.concatenate([centre, (boxes[:, 2:4] - boxes[:, 0:2]) / size], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- mosaic
def mosaic4(
    tiles: list[tuple[torch.Tensor, np.ndarray, np.ndarray]], imgsz: int
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Put four (image, boxes, classes) tiles around a random centre of a ``2*imgsz`` canvas.

    Each image (longest side already ``imgsz``) is anchored by one corner at the centre, in
    the order top-left, top-right, bottom-left, bottom-right, and cut at the canvas edge.
    The caller crops the canvas back to ``imgsz`` with :func:`random_geometry`.
    """
    size = 2 * imgsz
    canvas = gray_canvas(size, size)
    xc = int(_uniform(imgsz * 0.5, imgsz * 1.5))
    yc = int(_uniform(imgsz * 0.5, imgsz * 1.5))
    all_boxes, all_classes = [], []
    for k, (image, boxes, classes) in enumerate(tiles):
        h, w = image.shape[-2:]
        x0 = xc - w if k in (0, 2) else xc  # tile's top-left corner on the canvas
        y0 = yc - h if k in (0, 1) else yc
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x0 + w, size), min(y0 + h, size)
        canvas[:, cy0:cy1, cx0:cx1] = image[:, cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        all_boxes.append(boxes + np.array([x0, y0, x0, y0], dtype=np.float32))
        all_classes.append(classes)
    return canvas, np.concatenate(all_boxes), np.concatenate(all_classes)


# ----------------------------------------------------------------------------- geometry
# The random affine is hand-written (one ``affine_grid`` + ``grid_sample`` from the source
# straight to the output size) instead of ``F.affine`` + ``F.center_crop``: on one core at
# 320² ``F.affine`` took ~4 ms (it builds its grid with a float ``bmm`` and blends a fill
# mask), and for a mosaic it must warp the whole 2x canvas before cropping (~30 ms), while
# warping only the output pixels costs ~2 ms either way.
def affine_matrix(
    angle: float,
    scale: float,
    shear: tuple[float, float],
    translate: tuple[float, float],
    src_size: tuple[int, int],
    out_size: int,
) -> torch.Tensor:
    """3x3 map from source pixel coordinates to output pixel coordinates.

    Source centre → origin, shear (degrees, x then y), rotate (degrees, counter-clockwise on
    screen) and scale about it, then → output centre shifted by ``translate`` pixels.
    Coordinates are pixel-edge based (pixel k spans [k, k+1)), the same as box coordinates.
    """
    src_h, src_w = src_size
    to_origin = torch.tensor(
        [[1.0, 0, -src_w / 2], [0, 1, -src_h / 2], [0, 0, 1]], dtype=torch.float64
    )
    sx, sy = math.tan(math.radians(shear[0])), math.tan(math.radians(shear[1]))
    shear_m = torch.tensor([[1.0, sx, 0], [sy, 1, 0], [0, 0, 1]], dtype=torch.float64)
    a = math.radians(angle)
    c, s = math.cos(a) * scale, math.sin(a) * scale
    rotate = torch.tensor([[c, s, 0], [-s, c, 0], [0, 0, 1]], dtype=torch.float64)
    to_out = torch.tensor(
        [[1.0, 0, out_size / 2 + translate[0]], [0, 1, out_size / 2 + translate[1]], [0, 0, 1]],
        dtype=torch.float64,
    )
    return to_out @ rotate @ shear_m @ to_origin


def warp_image(image: torch.Tensor, matrix: torch.Tensor, out_size: int) -> torch.Tensor:
    """Warp a uint8 image by ``matrix`` (source px → output px) into an ``out_size`` square.

    Bilinear; pixels that come from outside the source are gray ``PAD_VALUE`` (sampling
    ``image - PAD_VALUE`` with zero padding and adding it back avoids a fill mask).
    """
    src_h, src_w = image.shape[-2:]
    # grid_sample works in [-1, 1] coordinates: express the inverse map in those.
    half = out_size / 2
    to_norm_src = torch.tensor(
        [[2.0 / src_w, 0, -1], [0, 2.0 / src_h, -1], [0, 0, 1]], dtype=torch.float64
    )
    from_norm_out = torch.tensor([[half, 0, half], [0, half, half], [0, 0, 1]], dtype=torch.float64)
    theta = (to_norm_src @ torch.linalg.inv(matrix) @ from_norm_out).tolist()
    # Built by broadcasting: ``affine_grid``'s batched matmul costs ~1 ms at 320², this ~0.1.
    coords = (torch.arange(out_size, dtype=torch.float32) + 0.5) * (2.0 / out_size) - 1.0
    xs, ys = coords[None, :], coords[:, None]
    grid = torch.stack(
        [
            xs * theta[0][0] + ys * theta[0][1] + theta[0][2],
            xs * theta[1][0] + ys * theta[1][1] + theta[1][2],
        ],
        dim=-1,
    )[None]
    shifted = image.float().sub_(PAD_VALUE)[None]
    out = torch.nn.functional.grid_sample(
        shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return channels_last(out[0].add_(PAD_VALUE + 0.5).clamp_(0, 255).to(torch.uint8))


def scale_translate(
    image: torch.Tensor, scale: float, translate: tuple[float, float], out_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize ``image`` by ``scale`` and paste it, centred and shifted by ``translate``
    pixels, onto a gray ``out_size`` square. Returns the image and the exact 3x3 map
    (source px → output px) of what was done, so boxes follow the pixels exactly.

    Only the part of the source that lands on the square is resized: when zooming in, most
    of the resized image would be cut off (at scale 1.5 over half of it).
    """
    src_h, src_w = int(image.shape[-2]), int(image.shape[-1])
    # Where the scaled source's top-left corner lands on the output (float, centred + shift).
    left = out_size / 2 + translate[0] - src_w * scale / 2
    top = out_size / 2 + translate[1] - src_h * scale / 2
    # The source columns/rows that land on the output; whole pixels, one spare on each side.
    sx0 = min(max(math.floor(-left / scale) - 1, 0), src_w - 1)
    sy0 = min(max(math.floor(-top / scale) - 1, 0), src_h - 1)
    sx1 = max(min(math.ceil((out_size - left) / scale) + 1, src_w), sx0 + 1)
    sy1 = max(min(math.ceil((out_size - top) / scale) + 1, src_h), sy0 + 1)
    # In OpenCV's H, W, C view: its bilinear uint8 resize reads the crop in place (rows
    # strided) and, with torch's per-call overhead gone, costs ~30% less here (measured).
    crop = channels_last(image).permute(1, 2, 0).numpy()[sy0:sy1, sx0:sx1]
    crop_h, crop_w = sy1 - sy0, sx1 - sx0
    new_h, new_w = max(1, round(crop_h * scale)), max(1, round(crop_w * scale))
    if (new_h, new_w) != (crop_h, crop_w):
        crop = cv2.resize(crop, (new_w, new_h), interpolation=cv2.INTER_LINEAR).reshape(new_h, new_w, -1)
    gain_x, gain_y = new_w / crop_w, new_h / crop_h  # exact, after rounding the size
    ox, oy = round(left + sx0 * scale), round(top + sy0 * scale)  # the crop's corner on the output
    canvas = gray_canvas(out_size, out_size, image.shape[0])
    x0, y0 = max(ox, 0), max(oy, 0)
    x1, y1 = min(ox + new_w, out_size), min(oy + new_h, out_size)
    if x1 > x0 and y1 > y0:
        canvas.permute(1, 2, 0).numpy()[y0:y1, x0:x1] = crop[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
    matrix = torch.tensor(
        [[gain_x, 0.0, ox - sx0 * gain_x], [0.0, gain_y, oy - sy0 * gain_y], [0.0, 0.0, 1.0]],
        dtype=torch.float64,
    )
    return canvas, matrix


def warp_boxes(boxes: np.ndarray, matrix: torch.Tensor | np.ndarray) -> np.ndarray:
    """The enclosing ``xyxy`` box of each box's four corners mapped by ``matrix``: one 3x3
    map for all boxes, or ``[n, 3, 3]``, one per box (a batch's boxes, each by its image's)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    m = np.asarray(matrix, dtype=np.float64)
    if len(boxes) == 0:
        return boxes
    m = m.reshape(-1, 3, 3)[:, :2, :, None]  # [1 or n, 2, 3, 1]: broadcasts over the corners
    x1, y1, x2, y2 = boxes.astype(np.float64).T
    xs = np.stack([x1, x2, x2, x1], 1)
    ys = np.stack([y1, y1, y2, y2], 1)
    tx = m[:, 0, 0] * xs + m[:, 0, 1] * ys + m[:, 0, 2]
    ty = m[:, 1, 0] * xs + m[:, 1, 1] * ys + m[:, 1, 2]
    return np.stack([tx.min(1), ty.min(1), tx.max(1), ty.max(1)], 1).astype(np.float32)


# A batch at a time: the loader augments the samples of a batch together
# (``YoloDataset.__getitems__``). Each image is warped and flipped on its own, but the boxes
# of all images travel in one array, with ``owner`` (the index of each box's image), so the
# box arithmetic is a few numpy calls per batch instead of per image: with a handful of boxes
# per image it is numpy's per-call cost, not the arithmetic, that counts (~0.15 ms per image
# on a 2-core node, where the loader shares the cores with the model; measured).
def random_geometry(
    images: Sequence[torch.Tensor],
    boxes: np.ndarray,
    owner: np.ndarray,
    hyp: Mapping[str, float],
    out_size: int,
) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray]:
    """Random affine (rotate/scale/translate/shear) of each image about its centre into
    ``out_size``; returns the images, the moved boxes and the indices of the input boxes
    they are (the others were dropped).

    An input is a resized image (centred on the output, as the letterbox would be) or a
    larger mosaic canvas whose centre region is kept. Boxes take the enclosing box of their
    transformed corners, are clipped to the output, and are dropped when they become tiny or
    lose >90% of their (scaled) area.
    """
    # One draw for the batch, uniform in [-1, 1), from torch's global RNG (seeded per worker).
    draws = (torch.rand(len(images), 6, dtype=torch.float64) * 2 - 1).tolist()
    out_images = []
    matrices = np.empty((len(images), 3, 3))
    scales = np.empty(len(images))
    for k, (image, (d_angle, d_scale, d_shear_x, d_shear_y, d_tx, d_ty)) in enumerate(zip(images, draws)):
        angle, scale = d_angle * hyp["degrees"], 1 + d_scale * hyp["scale"]
        shear = (d_shear_x * hyp["shear"], d_shear_y * hyp["shear"])
        translate = (d_tx * hyp["translate"] * out_size, d_ty * hyp["translate"] * out_size)
        if angle == 0.0 and shear == (0.0, 0.0):
            # Scale + translate only (YOLOv5's fine-tuning default): a uint8 resize and a
            # paste, several times cheaper than a general warp, which matters on small CPU
            # nodes where augmentation competes with the model for the same cores.
            image, matrix = scale_translate(image, scale, translate, out_size)
        else:
            src_size = (int(image.shape[-2]), int(image.shape[-1]))
            matrix = affine_matrix(angle, scale, shear, translate, src_size, out_size)
            identity = src_size == (out_size, out_size) and torch.equal(matrix, torch.eye(3, dtype=matrix.dtype))
            if not identity:
                image = warp_image(image, matrix, out_size)
        out_images.append(image)
        matrices[k] = matrix.numpy()
        scales[k] = scale
    moved = np.clip(warp_boxes(boxes, matrices[owner]), 0, out_size)  # the output is square
    keep = np.flatnonzero(box_candidates(_area(boxes) * scales[owner] ** 2, moved))
    return out_images, moved[keep], keep


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def box_candidates(area_expected: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Mask of boxes still worth training on: ≥2 px each side, ≥10% of their expected area,
    and not a sliver (aspect < 20) that clipping at the border left behind."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    aspect = np.maximum(w / np.maximum(h, 1e-6), h / np.maximum(w, 1e-6))
    return (
        (w >= MIN_BOX_PX)
        & (h >= MIN_BOX_PX)
        & (w * h >= MIN_AREA_RATIO * area_expected)
        & (aspect < MAX_ASPECT)
    )


def random_flips(
    images: Sequence[torch.Tensor], boxes: np.ndarray, owner: np.ndarray, hyp: Mapping[str, float]
) -> tuple[list[torch.Tensor], np.ndarray]:
    """Left-right / up-down flips of each image with probabilities ``fliplr`` / ``flipud``;
    its boxes (``owner`` = their image's index) follow."""
    draws = torch.rand(len(images), 2).tolist()
    lr = np.array([u < hyp["fliplr"] for u, _ in draws], dtype=bool)
    ud = np.array([u < hyp["flipud"] for _, u in draws], dtype=bool)
    out = []
    for k, image in enumerate(images):
        if lr[k]:
            image = F.horizontal_flip(image)
        if ud[k]:
            image = F.vertical_flip(image)
        out.append(image)
    if len(boxes) == 0 or not (lr.any() or ud.any()):
        return out, boxes
    width = np.array([image.shape[-1] for image in images], dtype=np.float32)[owner]
    height = np.array([image.shape[-2] for image in images], dtype=np.float32)[owner]
    lr, ud = lr[owner], ud[owner]
    x1 = np.where(lr, width - boxes[:, 2], boxes[:, 0])
    x2 = np.where(lr, width - boxes[:, 0], boxes[:, 2])
    y1 = np.where(ud, height - boxes[:, 3], boxes[:, 1])
    y2 = np.where(ud, height - boxes[:, 1], boxes[:, 3])
    return out, np.stack([x1, y1, x2, y2], 1).astype(np.float32)


# ----------------------------------------------------------------------------- colour
# YOLOv5's HSV jitter as one 3x3 RGB matrix per image (hue rotation, saturation blend and
# value gain are each linear in RGB), applied by the loader to the uint8 image with OpenCV's
# ``cv2.transform``: one SIMD pass with rounding and saturation, ~40 us for a 320² image on
# one core. Torch has no such uint8 kernel; its fastest way of the same (a float 1x1
# convolution per image, then a clamp) cost ~200 us per image, measured, in the training
# process, where on small CPU nodes every millisecond is taken from the training step.
_LUMA = torch.tensor([0.299, 0.587, 0.114])
_CROSS = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) / math.sqrt(3.0)


def color_matrices(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``[n, 3, 3]`` RGB matrices from ``[n]`` gains: rotate hue by ``hue`` turns about the
    gray axis, blend saturation with luma, scale brightness (scaling all channels by ``value``
    scales HSV's V exactly)."""
    theta = (2 * math.pi * hue.double())[:, None, None]
    cos, sin = torch.cos(theta), torch.sin(theta)
    eye = torch.eye(3, dtype=torch.float64)
    rotation = cos * eye + sin * _CROSS.double() + (1 - cos) / 3.0  # Rodrigues about (1,1,1)
    sat = saturation.double()[:, None, None]
    blend = sat * eye + (1 - sat) * _LUMA.double().expand(3, 3)
    return (value.double()[:, None, None] * (blend @ rotation)).float()


def random_color_matrices(n: int, hyp: Mapping[str, float]) -> torch.Tensor | None:
    """One random hue/saturation/value jitter per image (YOLOv5's ``hsv_*`` gains) as
    ``[n, 3, 3]`` matrices, drawn from torch's global RNG; None when all gains are 0.

    Hand-written for speed: ``F.adjust_hue`` converts every pixel RGB→HSV→RGB and costs
    ~5 ms for one 320² image on one core; one 3x3 matrix does all three in one pass.
    """
    hgain, sgain, vgain = hyp["hsv_h"], hyp["hsv_s"], hyp["hsv_v"]
    if hgain == sgain == vgain == 0:
        return None
    gains = torch.rand(n, 3) * 2 - 1  # uniform in [-1, 1)
    return color_matrices(gains[:, 0] * hgain, 1 + gains[:, 1] * sgain, 1 + gains[:, 2] * vgain)


def random_colors(images: Sequence[torch.Tensor], hyp: Mapping[str, float]) -> list[torch.Tensor]:
    """Each uint8 channels-last image with its own random colour jitter
    (:func:`random_color_matrices`); the images themselves are not changed."""
    matrices = random_color_matrices(len(images), hyp)
    if matrices is None:
        return list(images)
    return [apply_color(image, matrix) for image, matrix in zip(images, matrices.numpy())]


def apply_color(image: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    """``matrix`` (3x3, RGB) applied to every pixel of a uint8 channels-last image: a new
    image, rounded and saturated to [0, 255]."""
    pixels = channels_last(image).permute(1, 2, 0).numpy()  # H, W, 3: a view, no copy
    return torch.from_numpy(cv2.transform(pixels, matrix)).permute(2, 0, 1)


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """A uint8 batch ``[n, 3, H, W]`` → float32 in ``[0, 1]`` on the same device and in the
    same memory layout."""
    return images.float().div_(255)


def augment_batch(
    images: Sequence[torch.Tensor],
    boxes: np.ndarray,
    owner: np.ndarray,
    hyp: Mapping[str, float],
    out_size: int,
) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray]:
    """The loader's train-time chain for a batch of samples: geometry (and the crop of a
    mosaic canvas), flips, colour. ``boxes`` are all images' ``xyxy`` boxes, ``owner`` the
    index of each box's image; returns the ``out_size`` images, the boxes and the indices of
    the input boxes they are (so classes and owners can follow)."""
    images, boxes, keep = random_geometry(images, boxes, owner, hyp, out_size)
    images, boxes = random_flips(images, boxes, owner[keep], hyp)
    return random_colors(images, hyp), boxes, keep
