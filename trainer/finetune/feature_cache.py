"""``--cache features``: the frozen prefix runs once per image view, not once per epoch.

With modules ``0..N-1`` frozen and their BatchNorm statistics fixed (``--freeze-bn true``),
what the trainable modules read from the frozen ones -- the last frozen output and any skip
connections (:func:`finetune.models.yolo.prefix_outputs_needed`) -- is a pure function of the
input image. The cache computes those tensors once and the run trains modules ``N..`` from
them (``DetectionModel.forward`` accepts them in place of images).

Augmentation is kept by computing ``K`` views of every training image up front
(``--cache-views K``): view 0 is the plain letterboxed image, views ``1..K-1`` the loader's
random geometry, flips and colour jitter (a flipped image is a view of its own: convolutions
are not flip-equivariant), each drawn from a seed of (``--seed``, view, image), so a view does
not depend on the world size or on which rank built it. Epoch ``e`` trains on view
``e mod K``; ``K = 1`` means no augmentation. Mosaic composes different images per epoch
and cannot be cached: the mode refuses ``--hyp mosaic`` > 0. Validation reads the features
of the plain validation images the same way.

Layout, under ``OUT/feature-cache/``: one ``.npy`` per (split, module, rank block) holding
``[rows, H, W, C]`` (channels-last, the layout the model runs in) in float16, rows
view-major (row = view * images + image); ``labels.r<rank>.pt`` the targets (and validation
metas) of that rank's rows; ``cache.json`` the manifest, written last by rank 0, so a cache
without one is incomplete and rebuilt. Each rank builds its contiguous block of rows of both
splits; every rank then reads all of them, into RAM when they fit (half the memory
available, see :func:`ram_budget`), otherwise memory-mapped from the output volume.

The cache is keyed (:func:`cache_key`) by the frozen modules' weights and buffers and their
configuration, the freeze depth, the image size, the dataset's files (path, size and mtime
of every image, and the parsed labels), the augmentation hyperparameters, ``K``, the seed and
the storage dtype; a manifest with another key is deleted and the cache rebuilt. ``--resume``
and a restarted job find the cache of the same key and reuse it.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .checkpoint import atomic_write_bytes, write_json
from .data.augment import images_to_float
from .data.config import label_path_for
from .data.dataset import YoloDataset, build_dataloader, collate_fn
from .distributed import DistInfo, all_gather_object, barrier, broadcast_object
from .errors import FinetuneError
from .models.yolo import parse_model, run_prefix

log = logging.getLogger("finetune")

CACHE_DIR = "feature-cache"
MANIFEST = "cache.json"
CACHE_FORMAT = "finetune-feature-cache/v1"
# Hyperparameters that change what a view looks like (mosaic is refused in this mode).
AUGMENTATION_KEYS = ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "fliplr", "flipud")
BUILD_BATCH = 32  # images per forward pass of the frozen prefix while building
_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}
SPLITS = ("train", "val")


# --------------------------------------------------------------------------- batches
@dataclass
class FrozenFeatures:
    """A batch of the frozen prefix's outputs, standing in for its images (module index ->
    ``[B, C, H, W]``, channels-last, in the cache's dtype)."""

    tensors: dict[int, Tensor]
    image_size: int

    def __len__(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    @property
    def shape(self) -> torch.Size:
        """The shape of the image batch these features are of."""
        return torch.Size((len(self), 3, self.image_size, self.image_size))

    def pin_memory(self) -> FrozenFeatures:
        return FrozenFeatures({i: t.pin_memory() for i, t in self.tensors.items()}, self.image_size)

    def to_model(self, device: torch.device) -> dict[int, Tensor]:
        """What ``DetectionModel.forward`` takes: float32 tensors on ``device``."""
        return {i: t.to(device, non_blocking=True).float() for i, t in self.tensors.items()}


def model_input(batch: Tensor | FrozenFeatures, device: torch.device) -> Tensor | dict[int, Tensor]:
    """A loader's batch as the model takes it: uint8 images scaled to float on ``device``, or
    cached features as float32 tensors there."""
    if isinstance(batch, FrozenFeatures):
        return batch.to_model(device)
    return images_to_float(batch.to(device, non_blocking=True))


def _already_collated(batch):
    return batch


# --------------------------------------------------------------------------- key
def _tensor_digest(h, tensor: Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def cache_key(model, depth: int, imgsz: int, datasets: Sequence[YoloDataset], hyp: dict[str, float], views: int,
              seed: int, dtype: torch.dtype) -> str:
    """sha256 over everything the cached tensors depend on (see the module docstring)."""
    h = hashlib.sha256()
    yaml = model.yaml
    layers = (yaml["backbone"] + yaml["head"])[:depth]
    h.update(json.dumps({"format": CACHE_FORMAT, "depth": depth, "imgsz": imgsz, "views": views, "seed": seed,
                         "dtype": str(dtype), "layers": layers, "depth_multiple": yaml["depth_multiple"],
                         "width_multiple": yaml["width_multiple"], "ch": yaml.get("ch", 3),
                         "augmentation": {k: float(hyp[k]) for k in AUGMENTATION_KEYS}},
                        sort_keys=True, default=str).encode())
    for i, module in enumerate(model.model[:depth]):
        for name, tensor in sorted(module.state_dict().items()):
            h.update(f"{i}.{name}".encode())
            _tensor_digest(h, tensor)
    for dataset in datasets:
        h.update(f"split {len(dataset.image_paths)}".encode())
        for path, labels in zip(dataset.image_paths, dataset.labels):
            st = os.stat(path)
            label = label_path_for(Path(path))
            lst = label.stat() if label.is_file() else None
            h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0"
                     f"{(lst.st_size, lst.st_mtime_ns) if lst else None}\0".encode())
            h.update(np.ascontiguousarray(labels, dtype=np.float32).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- memory
def available_memory_bytes() -> int:
    """Memory this process may still take: the smaller of the node's available memory and
    what the container's cgroup (v2) limit leaves."""
    available = psutil.virtual_memory().available
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(int(available), 0)


def ram_budget(local_ranks: int) -> int:
    """Bytes one rank may hold in RAM: half the available memory, shared by this node's ranks."""
    return available_memory_bytes() // 2 // max(local_ranks, 1)


# --------------------------------------------------------------------------- sources
class _Views(Dataset):
    """Row ``r`` of a split: view ``r // n`` of image ``r % n`` as (uint8 image, targets, meta).

    View 0 is the plain letterboxed image; other views are the augmenting dataset's sample
    with torch's RNG seeded from (seed, view, image).
    """

    def __init__(self, plain: YoloDataset, augmenting: YoloDataset | None, seed: int):
        self.plain, self.augmenting, self.seed = plain, augmenting, seed
        self.n = len(plain)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, row: int):
        view, index = divmod(int(row), self.n)
        if view == 0 or self.augmenting is None:
            return self.plain[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + view) * 1_000_033 + index) % 2**63)
            return self.augmenting[index]


class _Rows:
    """A split's rows of one module's output, from one array per rank block."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])

    def take(self, rows: np.ndarray) -> Tensor:
        if len(self.arrays) == 1:
            return torch.from_numpy(np.ascontiguousarray(self.arrays[0][rows]))
        block = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((len(rows), *self.arrays[0].shape[1:]), dtype=self.arrays[0].dtype)
        for b in np.unique(block):
            mask = block == b
            out[mask] = self.arrays[b][rows[mask] - self.starts[b]]
        return torch.from_numpy(out)


class CachedSplit(Dataset):
    """One split of the cache as a dataset of its images: ``__getitems__`` returns a whole
    batch ``(FrozenFeatures, targets [n, 6], metas)`` of the current view (``set_epoch``)."""

    def __init__(self, rows: dict[int, _Rows], targets: list[Tensor], metas: list[dict], images: int, views: int,
                 imgsz: int):
        self.rows, self.targets, self.metas = rows, targets, metas
        self.images, self.views, self.imgsz = images, views, imgsz
        self.view = 0

    def set_epoch(self, epoch: int) -> None:
        self.view = epoch % self.views

    def __len__(self) -> int:
        return self.images

    def __getitems__(self, indices: Sequence[int]):
        rows = np.asarray(indices, dtype=np.int64) + self.view * self.images
        tensors = {i: r.take(rows).permute(0, 3, 1, 2) for i, r in self.rows.items()}
        targets = []
        for k, row in enumerate(rows.tolist()):
            t = self.targets[row]
            targets.append(torch.cat([torch.full((len(t), 1), float(k)), t], 1))
        metas = [self.metas[row] for row in rows.tolist()] if self.metas else [{} for _ in rows]
        return FrozenFeatures(tensors, self.imgsz), torch.cat(targets, 0), metas

    def __getitem__(self, index: int):
        return self.__getitems__([index])


# --------------------------------------------------------------------------- the cache
@dataclass
class FeatureCache:
    directory: Path
    manifest: dict[str, Any]
    train: CachedSplit
    val: CachedSplit
    in_ram: bool
    reused: bool
    build_time_s: float

    @property
    def bytes(self) -> int:
        return int(self.manifest["bytes"])

    def summary(self) -> dict[str, Any]:
        """What metrics.json records."""
        m = self.manifest
        return {"bytes": self.bytes, "build_time_s": round(self.build_time_s, 3),
                "built_in_s": m["build_time_s"], "reused": self.reused, "in_ram": self.in_ram,
                "views": m["views"], "train_images": m["images"]["train"], "val_images": m["images"]["val"],
                "modules": [int(i) for i in m["modules"]], "dtype": m["dtype"], "directory": str(self.directory)}

    def describe(self) -> str:
        m = self.manifest
        where = "in RAM" if self.in_ram else f"memory-mapped from {self.directory}"
        how = (f"reused from {self.directory} (built in {m['build_time_s']:.1f} s)" if self.reused
               else f"built in {self.build_time_s:.1f} s by {m['world_size']} rank(s)")
        return (f"feature cache: outputs of modules {', '.join(str(i) for i in m['modules'])} for "
                f"{m['images']['train']} train images x {m['views']} view(s) and {m['images']['val']} val images, "
                f"{m['bytes'] / 2**20:.1f} MiB {m['dtype'].replace('torch.', '')} {where}, {how}")


def open_or_build(model, depth: int, imgsz: int, train_set: YoloDataset, val_set: YoloDataset,
                  hyp: dict[str, float], views: int, seed: int, out: Path, info: DistInfo, workers: int = 0,
                  dtype: torch.dtype = torch.float16, ram_limit: int | None = None) -> FeatureCache:
    """The run's cache under ``out/feature-cache``: reused when its manifest has this run's
    key, otherwise (re)built by all ranks together. Every rank calls it.

    ``train_set`` is the augmenting training dataset (its plain twin is derived from it),
    ``model`` the (unwrapped) model with its frozen modules loaded. ``ram_limit``: bytes of
    cache a rank may load into RAM (default :func:`ram_budget`); above it the arrays stay
    memory-mapped.
    """
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(f"feature cache dtype must be float16 or float32, not {dtype}")
    t0 = time.perf_counter()
    directory = Path(out) / CACHE_DIR
    plain_train = _plain_twin(train_set)
    key = broadcast_object(cache_key(model, depth, imgsz, (train_set, val_set), hyp, views, seed, dtype)
                           if info.is_main else None, info)
    manifest = _read_manifest(directory) if info.is_main else None
    reused = broadcast_object(bool(manifest and manifest.get("key") == key), info)
    if not reused:
        if info.is_main:
            if manifest is not None or directory.exists():
                log.info("feature cache: %s holds another run's cache (the frozen weights, depth, image size, "
                         "data or augmentation differ); rebuilding it", directory)
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True, exist_ok=True)
        barrier(info)
        _build_blocks(model, depth, plain_train, train_set if views > 1 else None, val_set, views, seed, directory,
                      info, workers, dtype)
        barrier(info)
        built_s = max(all_gather_object(time.perf_counter() - t0, info))
        if info.is_main:
            manifest = _manifest(model, depth, key, views, len(plain_train), len(val_set), imgsz, dtype, info,
                                 directory, built_s)
            write_json(directory / MANIFEST, manifest)
        barrier(info)
    manifest = broadcast_object(manifest if info.is_main else None, info)
    limit = ram_budget(int(os.environ.get("LOCAL_WORLD_SIZE", 1))) if ram_limit is None else ram_limit
    in_ram = manifest["bytes"] <= limit
    train, val = (_open_split(directory, manifest, split, in_ram) for split in SPLITS)
    build_time = max(all_gather_object(time.perf_counter() - t0, info))
    return FeatureCache(directory, manifest, train, val, in_ram, reused, build_time)


def cached_loader(split: CachedSplit, batch_size: int, shuffle: bool, info: DistInfo, seed: int):
    """A loader over a cached split: the same sampler (and resumable order) as the image
    loader, batches cut straight from the arrays in the training process."""
    return build_dataloader(split, batch_size, 0, shuffle=shuffle, distributed=info.distributed, seed=seed,
                            collate=_already_collated)


def _plain_twin(dataset: YoloDataset) -> YoloDataset:
    """The same images and labels without augmentation (view 0), sharing the verification."""
    twin = copy.copy(dataset)
    twin.augment = False
    return twin


def _block(rows: int, info: DistInfo) -> tuple[int, int]:
    return rows * info.rank // info.world_size, rows * (info.rank + 1) // info.world_size


def _array_name(split: str, module: int, rank: int) -> str:
    return f"{split}-m{module}.r{rank}.npy"


def _build_blocks(model, depth: int, plain_train: YoloDataset, augmenting: YoloDataset | None,
                  val_set: YoloDataset, views: int, seed: int, directory: Path, info: DistInfo, workers: int,
                  dtype: torch.dtype) -> None:
    """This rank's block of rows of both splits: run the frozen prefix, write the arrays."""
    labels: dict[str, Any] = {}
    was_training = model.training
    model.eval()  # frozen BatchNorm layers are in eval mode either way (--freeze-bn true)
    try:
        for split, source, rows in (("train", _Views(plain_train, augmenting, seed), views * len(plain_train)),
                                    ("val", _Views(val_set, None, seed), len(val_set))):
            start, end = _block(rows, info)
            loader = DataLoader(source, batch_size=BUILD_BATCH, sampler=range(start, end), num_workers=workers,
                                collate_fn=collate_fn)
            arrays: dict[int, np.ndarray] = {}
            targets: list[Tensor] = []
            metas: list[dict] = []
            done = 0
            for images, batch_targets, batch_metas in loader:
                outputs = model.frozen_outputs(images_to_float(images.to(info.device, non_blocking=True)))
                for i, t in outputs.items():
                    if i not in arrays:
                        arrays[i] = np.lib.format.open_memmap(
                            directory / f".{_array_name(split, i, info.rank)}.tmp", mode="w+",
                            dtype=_NUMPY_DTYPES[dtype], shape=(end - start, t.shape[2], t.shape[3], t.shape[1]))
                    arrays[i][done:done + len(images)] = t.permute(0, 2, 3, 1).to(dtype).cpu().numpy()
                for k in range(len(images)):
                    targets.append(batch_targets[batch_targets[:, 0] == k, 1:].clone())
                metas += batch_metas
                done += len(images)
            if end == start:  # an empty block (more ranks than rows): zero rows of the right shape
                arrays = _empty_arrays(model, depth, plain_train.imgsz, info, dtype, directory, split)
            for i, array in arrays.items():
                array.flush()
                del array
                os.replace(directory / f".{_array_name(split, i, info.rank)}.tmp",
                           directory / _array_name(split, i, info.rank))
            labels[split] = {"targets": targets, "metas": metas if split == "val" else []}
    finally:
        model.train(was_training)
    buffer = io.BytesIO()
    torch.save(labels, buffer)
    atomic_write_bytes(directory / f"labels.r{info.rank}.pt", buffer.getvalue())


def _empty_arrays(model, depth: int, imgsz: int, info: DistInfo, dtype: torch.dtype, directory: Path,
                  split: str) -> dict[int, np.ndarray]:
    return {i: np.lib.format.open_memmap(directory / f".{_array_name(split, i, info.rank)}.tmp", mode="w+",
                                         dtype=_NUMPY_DTYPES[dtype], shape=(0, s[1], s[2], s[0]))
            for i, s in _output_shapes(model, depth, imgsz).items()}


def _output_shapes(model, depth: int, imgsz: int) -> dict[int, tuple[int, int, int]]:
    """``(C, H, W)`` of each cached output for one image, from a shape-only (meta device) twin."""
    ch = model.yaml.get("ch", 3)
    with torch.device("meta"):
        layers, _save = parse_model(model.yaml, ch)
        outputs = run_prefix(layers.eval(), torch.zeros(1, ch, imgsz, imgsz), depth)
    return {i: tuple(int(s) for s in t.shape[1:]) for i, t in outputs.items()}


def _manifest(model, depth: int, key: str, views: int, train_images: int, val_images: int, imgsz: int,
              dtype: torch.dtype, info: DistInfo, directory: Path, built_s: float) -> dict[str, Any]:
    shapes = _output_shapes(model, depth, imgsz)
    size = sum(f.stat().st_size for f in directory.iterdir() if f.name.endswith(".npy"))
    return {"format": CACHE_FORMAT, "key": key, "depth": depth, "imgsz": imgsz, "views": views,
            "images": {"train": train_images, "val": val_images}, "modules": [str(i) for i in shapes],
            "shapes": {str(i): list(s) for i, s in shapes.items()}, "dtype": str(dtype), "world_size": info.world_size,
            "bytes": size, "build_time_s": round(built_s, 3)}


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == CACHE_FORMAT else None


def _open_split(directory: Path, manifest: dict[str, Any], split: str, in_ram: bool) -> CachedSplit:
    from .serialization import read_torch_file

    ranks = range(int(manifest["world_size"]))
    rows: dict[int, _Rows] = {}
    try:
        for module in manifest["modules"]:
            arrays = [np.load(directory / _array_name(split, int(module), r), mmap_mode=None if in_ram else "r")
                      for r in ranks]
            rows[int(module)] = _Rows([np.concatenate(arrays)] if in_ram else arrays)
        targets: list[Tensor] = []
        metas: list[dict] = []
        for r in ranks:
            labels = read_torch_file(directory / f"labels.r{r}.pt", what=f"feature cache {directory}",
                                     allow_stand_ins=False)[split]
            targets += labels["targets"]
            metas += labels["metas"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FinetuneError(f"feature cache {directory} is unreadable ({type(e).__name__}: {e}); delete it and "
                            "start again (it is rebuilt)") from None
    images = int(manifest["images"][split])
    views = int(manifest["views"]) if split == "train" else 1
    return CachedSplit(rows, targets, metas, images, views, int(manifest["imgsz"]))

