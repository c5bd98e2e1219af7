"""The YOLO-format detection dataset, its collate function, and the DataLoader factory.

Bad data never stops a run: undecodable or truncated images, and images declaring more pixels
than the limit (decompression bombs), are dropped when the dataset is built (a cheap PIL
header check), malformed label lines are dropped while the labels are read, and the counts
end up in ``dataset.stats`` and ``dataset.summary()`` for the log. The labels are read once,
up front, because they are tiny and it lets us report problems before the first epoch
instead of from inside a worker process.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import os
import random
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchvision.io as tio
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from finetune.data.augment import (
    augment_batch,
    channels_last,
    gray_canvas,
    mosaic4,
    normalized_to_letterbox,
    pad_to_square,
    resize_longest,
    resolve_hyp,
    xyxy_to_xywhn,
)
from finetune.data.config import label_path_for, printable_path
from finetune.distributed import cpus_per_process
from finetune.errors import FinetuneError

log = logging.getLogger(__name__)

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec and warns on every
# decode. They are still the fastest decoders we have installed (libjpeg-turbo); silence just
# that message so it does not flood worker logs. Migrate when torchvision removes them.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
)

COORD_TOLERANCE = 0.01  # labelling tools round; a box edge at 1.004 is still a good box
# Formats (as PIL names them from the header) torchvision decodes; PNG is not one of them:
# torchvision 0.29's decode_png kills the process on a PNG libpng rejects mid-stream (a
# short or corrupt IDAT), which PIL's header check passes; PIL raises instead, ~15% slower.
_TORCHVISION_FORMATS = {"JPEG", "WEBP"}

# The most pixels an image may declare in its header, checked before it is decoded, so a
# few-KB file claiming 30000x30000 is skipped rather than decoded to 2.7 GB in every worker.
# PIL's own default (Image.MAX_IMAGE_PIXELS): 256 MiB as 8-bit RGB, above 48 Mpx photos and
# 8K frames; each loader worker holds one decoded image. FINETUNE_MAX_IMAGE_PIXELS changes it:
# an environment variable reaches `finetune train`/`val` and their loader workers with no flag
# to thread through (the FineTune resource has no field for it: its pods get a fixed env).
MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3
MAX_IMAGE_PIXELS_ENV = "FINETUNE_MAX_IMAGE_PIXELS"
_MAX_EXAMPLES = 3  # skipped files quoted in the summary line
_Shape = tuple[int, int]


class YoloDataset(Dataset):
    """Images + YOLO ``.txt`` labels → ``(image uint8 [3,S,S], targets [n,6], meta)``.

    ``targets`` rows are ``(0, class, cx, cy, w, h)`` normalized to the returned square image
    (column 0 is filled with the index in the batch by :func:`collate_fn`). ``meta`` holds
    ``path``, ``image_id`` (index), ``orig_shape`` ``(h0, w0)``, ``ratio`` (resize gain) and
    ``pad`` ``(padw, padh)``: a letterboxed point maps back by ``(x - padw) / ratio``. With
    ``augment=True`` the meta still describes the plain letterbox; the random geometry on top
    of it is not meant to be undone.
    """

    def __init__(
        self,
        image_paths: Sequence[str | os.PathLike],
        imgsz: int = 640,
        augment: bool = False,
        hyp: Mapping[str, object] | None = None,
        cache: str = "none",
        names: Sequence[str] | None = None,
        nc: int | None = None,
        prefix: str = "",
    ) -> None:
        if cache not in ("none", "ram"):
            raise FinetuneError(f"--cache {cache!r} is not supported; use 'none' or 'ram'")
        if imgsz < 32:
            raise FinetuneError(f"image size {imgsz} is too small; pass --imgsz 32 or more")
        self.imgsz = int(imgsz)
        self.augment = bool(augment)
        self.hyp = resolve_hyp(hyp)
        self.names = list(names) if names is not None else None
        self.nc = nc if nc is not None else (len(self.names) if self.names else None)
        self.prefix = prefix
        self.cache = cache
        self.skipped: list[tuple[str, str]] = []  # (path, reason) of dropped images
        self._warned: set[str] = set()
        self.max_pixels = max_image_pixels()
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < self.max_pixels:
            # PIL refuses twice its own limit in Image.open, before we see the size: a raised
            # cap must raise PIL's too (loader workers fork with it).
            Image.MAX_IMAGE_PIXELS = self.max_pixels

        self.image_paths, self.labels = self._verify([Path(p) for p in image_paths])
        self._ram: list[tuple[torch.Tensor, tuple[int, int]]] | None = None
        if cache == "ram":
            self._fill_ram_cache()
        if self.skipped and not self.image_paths:
            path, reason = self.skipped[0]
            raise FinetuneError(
                f"{prefix}all {len(self.skipped)} images are unusable (e.g. {printable_path(path)}: {reason}); "
                f"check the dataset files or point data.yaml at the right folder"
            )
        self.stats = self._count()

    # ------------------------------------------------------------------ construction
    def _verify(self, paths: list[Path]) -> tuple[list[Path], list[np.ndarray]]:
        """Keep images PIL can identify (and JPEGs that are not truncated); read their labels."""
        kept, labels = [], []
        self._bad_lines = 0
        for path in paths:
            reason = verify_image(path, self.max_pixels)
            if reason:
                self.skipped.append((str(path), reason))
                continue
            boxes, bad = read_label_file(label_path_for(path), self.nc)
            self._bad_lines += bad
            kept.append(path)
            labels.append(boxes)
        return kept, labels

    def _fill_ram_cache(self) -> None:
        """Decode every image once (resized to the longest side = imgsz) into memory.

        Decoding doubles as a full verify: an image libjpeg/libpng rejects is dropped here.
        Threads help because torchvision's decoders and resize release the GIL.
        """
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            loaded = list(pool.map(self._decode_resized, self.image_paths))
        keep = [i for i, item in enumerate(loaded) if item is not None]
        for i, item in enumerate(loaded):
            if item is None:
                self.skipped.append((str(self.image_paths[i]), "cannot be decoded"))
        self.image_paths = [self.image_paths[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]
        self._ram = [loaded[i] for i in keep]  # type: ignore[misc]

    def _count(self) -> dict[str, int]:
        return {
            "images": len(self.image_paths),
            "skipped_images": len(self.skipped),
            "labels": int(sum(len(lab) for lab in self.labels)),
            "skipped_label_lines": self._bad_lines,
            "empty_images": int(sum(1 for lab in self.labels if len(lab) == 0)),
        }

    def summary(self) -> str:
        """One log line: what was kept and what was skipped (with a few examples)."""
        s = self.stats
        text = (
            f"{self.prefix}{s['images']} images, {s['labels']} labels, "
            f"{s['empty_images']} background images, "
            f"{s['skipped_images']} unusable images skipped, "
            f"{s['skipped_label_lines']} bad label lines skipped"
        )
        if self.cache == "ram" and self._ram is not None:
            text += f", {self.ram_bytes() / 2**20:.0f} MiB cached in RAM"
        if self.skipped:
            examples = "; ".join(f"{printable_path(Path(p).name)}: {r}" for p, r in self.skipped[:_MAX_EXAMPLES])
            text += f" (e.g. {examples})"
        return text

    def ram_bytes(self) -> int:
        """Bytes held by the RAM cache (0 without one)."""
        if not self._ram:
            return 0
        return sum(img.numel() for img, _ in self._ram)

    # ------------------------------------------------------------------ loading
    def _decode_resized(self, path: Path) -> tuple[torch.Tensor, tuple[int, int]] | None:
        """Decoded RGB uint8 image resized to longest side = imgsz, and its original (h, w)."""
        image = decode_rgb(path, self.max_pixels)
        if image is None:
            return None
        orig_shape = (int(image.shape[1]), int(image.shape[2]))
        resized, _ = resize_longest(channels_last(image), self.imgsz)
        return channels_last(resized), orig_shape

    def load_resized(self, index: int) -> tuple[torch.Tensor, tuple[int, int], bool]:
        """(resized image, original (h, w), ok) for ``index``, from the cache or disk.

        A file that passed the header check but fails to decode (or vanished) must not kill a
        multi-hour run: it comes back as a gray image with ``ok=False`` (so its labels are
        ignored), logged once per worker.
        """
        if self._ram is not None:
            image, orig_shape = self._ram[index]
            return image, orig_shape, True
        loaded = self._decode_resized(self.image_paths[index])
        if loaded is not None:
            return loaded[0], loaded[1], True
        path = str(self.image_paths[index])
        if path not in self._warned:
            self._warned.add(path)
            log.warning("%scannot decode %s; using a blank image without labels", self.prefix, printable_path(path))
        blank = gray_canvas(self.imgsz, self.imgsz)
        return blank, (self.imgsz, self.imgsz), False

    def _load_sample(self, index: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray, _Shape]:
        """(resized image, boxes xyxy in its pixels, classes, original (h, w)) for one index."""
        resized, orig_shape, ok = self.load_resized(index)
        labels = self.labels[index] if ok else self.labels[index][:0]
        ratio = self.imgsz / max(orig_shape)
        boxes = normalized_to_letterbox(labels[:, 1:5], orig_shape, ratio, (0, 0))
        return resized, boxes, labels[:, 0].copy(), orig_shape

    def _use_mosaic(self) -> bool:
        p = self.hyp["mosaic"]
        return self.augment and p > 0 and float(torch.rand(())) < p

    # ------------------------------------------------------------------ Dataset API
    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
        """The samples at ``indices``; ``DataLoader`` asks for a batch's samples at once.

        Images are loaded, composed (mosaic) and warped one by one, but their boxes travel
        in one array through the augmentation and into targets (see :func:`augment_batch`).
        """
        images, boxes, classes, metas = [], [], [], []
        for index in indices:
            resized, image_boxes, image_classes, orig_shape = self._load_sample(index)
            height, width = resized.shape[-2:]
            pad = ((self.imgsz - width) // 2, (self.imgsz - height) // 2)
            if self._use_mosaic():
                others = [self._load_sample(i)[:3] for i in torch.randint(len(self), (3,)).tolist()]
                image, image_boxes, image_classes = mosaic4([(resized, image_boxes, image_classes), *others],
                                                            self.imgsz)
            elif self.augment:
                image = resized  # the random geometry centres it on the square itself
            else:
                image, pad = pad_to_square(resized, self.imgsz)
                image_boxes = image_boxes + np.array([pad[0], pad[1], pad[0], pad[1]], dtype=np.float32)
            images.append(image)
            boxes.append(image_boxes)
            classes.append(image_classes)
            metas.append({
                "path": str(self.image_paths[index]),
                "image_id": int(index),
                "orig_shape": orig_shape,
                "ratio": self.imgsz / max(orig_shape),
                "pad": pad,
            })
        owner = np.repeat(np.arange(len(images)), [len(b) for b in boxes])
        all_boxes, all_classes = np.concatenate(boxes), np.concatenate(classes)
        if self.augment:
            images, all_boxes, keep = augment_batch(images, all_boxes, owner, self.hyp, self.imgsz)
            all_classes, owner = all_classes[keep], owner[keep]
        targets = np.zeros((len(all_boxes), 6), dtype=np.float32)
        targets[:, 1] = all_classes
        targets[:, 2:] = np.clip(xyxy_to_xywhn(all_boxes, self.imgsz, self.imgsz), 0, 1)
        per_image = np.split(targets, np.cumsum(np.bincount(owner, minlength=len(images)))[:-1])
        return [(channels_last(image), torch.from_numpy(t), meta) for image, t, meta in zip(images, per_image, metas)]


# ---------------------------------------------------------------------- file checks
def max_image_pixels() -> int:
    """The pixel cap: ``FINETUNE_MAX_IMAGE_PIXELS`` if set, else :data:`MAX_IMAGE_PIXELS`."""
    text = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if not text:
        return MAX_IMAGE_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise FinetuneError(
            f"{MAX_IMAGE_PIXELS_ENV}={text!r} is not a positive number of pixels; set it to e.g. "
            f"200000000 or unset it for the default {MAX_IMAGE_PIXELS}"
        )
    return value


def _too_large(max_pixels: int, size: tuple[int, int] | None = None) -> str:
    declared = f"{size[0]}x{size[1]}, " if size else ""
    return f"too large ({declared}over {max_pixels} pixels; {MAX_IMAGE_PIXELS_ENV} raises the limit)"


def verify_image(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> str | None:
    """Why ``path`` is not a usable image, or None. Header-level only, so it is cheap.

    PIL identifies the format and size without decoding; the size must be within
    ``max_pixels``, and a JPEG must also end with the EOI marker, which catches the commonest
    corruption (a partial download or copy).
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
            if width * height > max_pixels:
                return _too_large(max_pixels, im.size)
            im.verify()
            fmt = im.format
    except FileNotFoundError:
        return "file not found"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # a warning under -W error
        return _too_large(max_pixels)
    except Exception as exc:  # PIL raises many types for garbage input
        return f"not an image ({type(exc).__name__})"
    if width < 2 or height < 2:
        return f"too small ({width}x{height})"
    if fmt == "JPEG":
        try:
            with open(path, "rb") as f:
                f.seek(-2, os.SEEK_END)
                if f.read() != b"\xff\xd9":
                    return "truncated JPEG"
        except OSError as exc:
            return f"unreadable ({exc.strerror})"
    return None


def decode_rgb(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor | None:
    """RGB uint8 ``[3, H, W]``, EXIF orientation applied, as labelling tools display it; None
    when the file is unreadable or its header declares more than ``max_pixels``.

    The file is read once, by Python (which takes any file name, where torchvision's
    ``read_file`` needs UTF-8), and the size checked from those bytes, so a file replaced
    since :func:`verify_image` cannot slip a bigger image past the cap. JPEG and WebP decode
    with torchvision (libjpeg-turbo, libwebp), the rest with PIL.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                return None
            if im.format in _TORCHVISION_FORMATS:
                return tio.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                        mode=tio.ImageReadMode.RGB, apply_exif_orientation=True)
            ImageOps.exif_transpose(im, in_place=True)
            if im.mode.startswith("I;16"):  # 16-bit gray: keep the high byte, as a scale to 8 bits
                gray = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
                array = np.repeat(gray[:, :, None], 3, axis=2)
            else:
                array = np.asarray(im.convert("RGB"))
        return torch.from_numpy(array.copy()).permute(2, 0, 1)  # channels-last already
    except Exception:  # corrupt data raises RuntimeError/OSError/ValueError, varying by codec
        return None


def read_label_file(path: Path, nc: int | None) -> tuple[np.ndarray, int]:
    """Valid ``class cx cy w h`` rows as float32 ``[n, 5]`` and the number of lines dropped.

    A missing file means a background image (zero rows, nothing dropped).
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return np.zeros((0, 5), np.float32), 0
    except OSError:
        return np.zeros((0, 5), np.float32), 1
    rows, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        row = parse_label_line(line, nc)
        if row is None:
            bad += 1
        else:
            rows.append(row)
    return (np.array(rows, np.float32).reshape(-1, 5), bad)


def parse_label_line(line: str, nc: int | None) -> list[float] | None:
    """One label line → ``[class, cx, cy, w, h]`` (box clipped to the image), or None if bad."""
    parts = line.split()
    if len(parts) != 5:
        return None
    try:
        cls, cx, cy, w, h = (float(p) for p in parts)
    except ValueError:
        return None
    if not all(math.isfinite(v) for v in (cls, cx, cy, w, h)):
        return None
    if not cls.is_integer() or cls < 0 or (nc is not None and cls >= nc):
        return None
    low, high = -COORD_TOLERANCE, 1 + COORD_TOLERANCE
    if not all(low <= v <= high for v in (cx, cy, w, h)) or w <= 0 or h <= 0:
        return None
    x1, y1 = max(cx - w / 2, 0.0), max(cy - h / 2, 0.0)
    x2, y2 = min(cx + w / 2, 1.0), min(cy + h / 2, 1.0)
    if x2 <= x1 or y2 <= y1:
        return None
    return [cls, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]


# ---------------------------------------------------------------------- batching
def collate_fn(batch):
    """Stack images into a channels-last ``[n, 3, H, W]`` batch (stacking channels-last
    samples any other way would transpose every pixel); concatenate targets with column 0 =
    the image's index in the batch."""
    images, targets, metas = zip(*batch)
    for i, t in enumerate(targets):
        t[:, 0] = i
    stacked = torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
    return stacked, torch.cat(targets, 0), list(metas)


def _seed_worker(worker_id: int) -> None:
    """Seed numpy/random from torch's per-worker seed so any library we call is reproducible.

    (Our own augmentation draws from torch, which DataLoader already seeds per worker.)
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


MAX_AUTO_WORKERS = 8  # YOLOv5's ceiling for its --workers default


def auto_workers(device: torch.device, cpus_per_rank: int | None = None) -> int:
    """Data-loader processes per rank for ``--workers auto``.

    On CUDA the CPU cores are free for loading: one process per core this rank may use,
    less one for the training process itself, at most 8. On CPU the model's threads already
    use every core and a loader process takes its time from them: on 2 cores loading inside
    the training process was ~10% faster than one loader process, and one faster than two
    (bench/freeze.py), so up to 2 cores per rank it loads in-process, beyond that one
    loader per 4 cores. ``cpus_per_rank`` defaults to this process's share of the CPUs
    it may use (:func:`finetune.distributed.cpus_per_process`: affinity, container limit).
    """
    per_rank = cpus_per_process() if cpus_per_rank is None else max(1, cpus_per_rank)
    if device.type == "cuda":
        return min(MAX_AUTO_WORKERS, per_rank - 1)
    return 0 if per_rank <= 2 else min(MAX_AUTO_WORKERS, per_rank // 4)


class ResumableSampler(DistributedSampler):
    """A DistributedSampler (also for a single process) whose epoch can start part-way through.

    The order of epoch ``e`` depends only on ``(seed, e)``, not on how many epochs this process
    has iterated before, so a run resumed mid-epoch from a checkpoint skips exactly the samples
    it already trained on (``set_epoch(e, start=...)``), and one resumed at an epoch boundary
    sees the same order an uninterrupted run would.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None, rank: int | None, shuffle: bool, seed: int,
                 drop_last: bool):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch ``epoch``, from this rank's ``start``-th sample of it on."""
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


def build_dataloader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    shuffle: bool,
    distributed: bool,
    seed: int = 0,
    drop_last: bool = False,
    num_replicas: int | None = None,
    rank: int | None = None,
    collate=collate_fn,
) -> tuple[DataLoader, ResumableSampler | None]:
    """A DataLoader over ``dataset`` with ``batch_size`` images per rank.

    With ``distributed`` each rank reads its own shard; with ``shuffle`` the order comes from a
    :class:`ResumableSampler` either way (one replica when not distributed). Call
    ``sampler.set_epoch(epoch)`` every epoch so the shuffle changes; ``num_replicas`` and
    ``rank`` default to the process group's. Worker seeds derive from ``seed`` and the rank, so
    augmentation is reproducible and differs between ranks. With ``workers=0`` the caller's
    ``torch.manual_seed`` governs augmentation. ``collate`` turns what the dataset returns
    for a batch's indices into the batch (the feature cache's datasets cut whole batches).
    """
    sampler = None
    rank_for_seed = 0
    if distributed or shuffle:
        sampler = ResumableSampler(dataset, num_replicas=num_replicas if distributed else 1,
                                   rank=rank if distributed else 0, shuffle=shuffle, seed=seed, drop_last=drop_last)
        rank_for_seed = sampler.rank
    generator = torch.Generator()
    generator.manual_seed(seed + 1_000_003 * rank_for_seed)
    return (
        DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,  # the sampler shuffles
            sampler=sampler,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            drop_last=drop_last,
            collate_fn=collate,
            worker_init_fn=_seed_worker,
            generator=generator,
            persistent_workers=workers > 0,
        ),
        sampler,
    )
