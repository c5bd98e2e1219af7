"""Reading a YOLO ``data.yaml`` into the list of image files for each split.

The format is the one YOLOv5 users already have: ``path`` (the dataset root), ``train`` and
``val`` (a folder of images, a ``.txt`` file listing image paths, or a list of those), and
``names`` (a list or an ``{index: name}`` mapping) and/or ``nc``. Every problem a user can
fix is raised as one ``FinetuneError`` naming the file and the fix, because the trainer runs
inside a pod where a traceback is the least readable way to say "your labels are missing".
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import FinetuneError

# Limits on a data.yaml from someone else. A real one is a few hundred bytes and the largest
# public detection label sets have a few thousand classes (LVIS 1,203; Objects365 365), so
# these only refuse files that are not data.yamls or are built to exhaust memory: an ``nc``
# of a billion would make a billion names and a head with a billion outputs.
MAX_DATA_YAML_BYTES = 1 << 20
MAX_CLASSES = 10_000
MAX_CLASS_NAME_CHARS = 256

# Extensions we look for when a split is a folder. JPEG/WebP decode with libjpeg-turbo /
# libwebp through torchvision; the others with PIL in the dataset.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class DataConfig:
    """A parsed ``data.yaml``: resolved image files per split plus the class names."""

    path: Path
    train: list[Path]
    val: list[Path]
    names: list[str]
    nc: int
    yaml_path: Path
    extra: dict[str, Any] = field(default_factory=dict)


def printable_path(path: str | os.PathLike) -> str:
    """``path`` safe to print or log: bytes that are not UTF-8 (which Python keeps as lone
    surrogates, e.g. ``\\udcff``) are written as ``\\xff`` instead of failing a UTF-8 log."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def label_path_for(image_path: str | os.PathLike) -> Path:
    """The YOLO label file for an image: last ``/images/`` → ``/labels/``, extension → ``.txt``.

    An image with no ``images`` folder in its path keeps its folder, so the label sits beside
    it (the same fallback YOLOv5 has).
    """
    text = os.fspath(image_path)
    marker, replacement = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    head, sep, tail = text.rpartition(marker)
    if sep:
        text = head + replacement + tail
    return Path(text).with_suffix(".txt")


def load_data_config(path: str | os.PathLike) -> DataConfig:
    """Parse and validate ``data.yaml``; raise ``FinetuneError`` for anything the user must fix."""
    yaml_path = Path(path).expanduser()
    raw = _read_yaml(yaml_path)
    root = _resolve_root(raw, yaml_path)
    names = _parse_names(raw, yaml_path)
    splits = {}
    for split in ("train", "val"):
        entry = raw.get(split)
        if entry in (None, "", []):
            raise FinetuneError(
                f"{yaml_path}: missing '{split}' key; add '{split}: images/{split}' "
                f"(a folder of images, a .txt list of image paths, or a list of those)"
            )
        splits[split] = _collect_images(entry, root, yaml_path, split)
    _require_some_labels(splits["train"], yaml_path)
    extra = {k: v for k, v in raw.items() if k not in {"path", "train", "val", "names", "nc"}}
    return DataConfig(
        path=root,
        train=splits["train"],
        val=splits["val"],
        names=names,
        nc=len(names),
        yaml_path=yaml_path.resolve(),
        extra=extra,
    )


class _AliasRefused(yaml.composer.ComposerError):
    pass


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases as they are composed: a "billion laughs" file
    (an alias repeated in an alias repeated ...) is never expanded. No data.yaml needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(None, None, f"*{event.anchor}", event.start_mark)
        return super().compose_node(parent, index)


def _read_yaml(yaml_path: Path) -> dict:
    if not yaml_path.is_file():
        raise FinetuneError(
            f"data.yaml not found: {yaml_path}; pass --data with the path to your dataset's "
            f"YOLO data.yaml"
        )
    too_big = FinetuneError(
        f"{yaml_path}: larger than {MAX_DATA_YAML_BYTES // 2**20} MiB, the limit for a data.yaml; "
        f"pass --data with the dataset's YOLO data.yaml (a few lines naming the splits and classes)"
    )
    try:
        if yaml_path.stat().st_size > MAX_DATA_YAML_BYTES:
            raise too_big
        with open(yaml_path, "rb") as f:
            data = f.read(MAX_DATA_YAML_BYTES + 1)  # +1: a file that grew since the stat
    except OSError as exc:
        raise FinetuneError(f"{yaml_path}: cannot be read ({exc.strerror}); check its permissions") from None
    if len(data) > MAX_DATA_YAML_BYTES:
        raise too_big
    try:
        raw = yaml.load(data.decode("utf-8"), Loader=_NoAliasLoader)
    except UnicodeDecodeError as exc:
        raise FinetuneError(
            f"{yaml_path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            f"save it as UTF-8"
        ) from None
    except _AliasRefused as exc:
        raise FinetuneError(
            f"{yaml_path}: uses the YAML alias {exc.problem} (line {exc.problem_mark.line + 1}), and a "
            f"data.yaml may not (aliases can expand a small file into gigabytes); write the value out"
        ) from None
    except yaml.YAMLError as exc:
        raise FinetuneError(f"{yaml_path}: not valid YAML ({_yaml_problem(exc)}); fix the syntax") from None
    except ValueError as exc:  # PyYAML's constructors let these through: 2001-13-01, a 5,000-digit int
        raise FinetuneError(f"{yaml_path}: not valid YAML ({' '.join(str(exc).split())}); fix the value") from None
    except RecursionError:
        raise FinetuneError(f"{yaml_path}: not a data.yaml (nested too deeply to read)") from None
    if not isinstance(raw, dict):
        raise FinetuneError(
            f"{yaml_path}: expected a mapping with path/train/val/names keys, got "
            f"{type(raw).__name__}; rewrite it as a YOLO data.yaml"
        )
    return raw


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's problem and where it is, on one line (its own text spans several lines and
    starts with context such as "while scanning a simple key")."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        text = exc.problem
        if exc.problem_mark is not None:
            text += f" at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _resolve_root(raw: dict, yaml_path: Path) -> Path:
    """``path`` is the dataset root: relative to the yaml's folder, defaulting to that folder."""
    base = yaml_path.resolve().parent
    value = raw.get("path")
    if value in (None, ""):
        return base
    root = Path(str(value)).expanduser()
    root = root if root.is_absolute() else (base / root)
    root = Path(os.path.normpath(root))
    if not root.is_dir():
        raise FinetuneError(
            f"{yaml_path}: dataset root 'path: {value}' is not a folder ({root}); "
            f"fix 'path' (relative paths are relative to the data.yaml's folder)"
        )
    return root


def _parse_names(raw: dict, yaml_path: Path) -> list[str]:
    names = raw.get("names")
    nc = raw.get("nc")
    if isinstance(names, (dict, list, tuple)) and len(names) > MAX_CLASSES:
        raise FinetuneError(
            f"{yaml_path}: 'names' lists {len(names)} classes, more than the limit of {MAX_CLASSES}; "
            f"fix 'names'"
        )
    if isinstance(names, dict):
        names = _names_from_mapping(names, yaml_path)
    elif isinstance(names, (list, tuple)):
        names = [str(n) for n in names]
    elif names is not None:
        raise FinetuneError(
            f"{yaml_path}: 'names' must be a list or an {{index: name}} mapping, got "
            f"{type(names).__name__}; fix 'names'"
        )
    if nc is not None and (not isinstance(nc, int) or isinstance(nc, bool) or nc < 1):
        raise FinetuneError(f"{yaml_path}: 'nc: {nc}' is not a positive integer; fix 'nc'")
    if nc is not None and nc > MAX_CLASSES:
        raise FinetuneError(f"{yaml_path}: 'nc: {nc}' is more than the limit of {MAX_CLASSES} classes; fix 'nc'")
    if names is None and nc is None:
        raise FinetuneError(f"{yaml_path}: no 'names' or 'nc'; add 'names: [class0, class1, ...]'")
    if names is not None and nc is not None and nc != len(names):
        raise FinetuneError(
            f"{yaml_path}: 'nc: {nc}' disagrees with {len(names)} 'names'; make them match "
            f"or drop 'nc'"
        )
    if names is None:
        names = [f"class{i}" for i in range(nc)]
    if not names:
        raise FinetuneError(f"{yaml_path}: 'names' is empty; list at least one class name")
    for index, name in enumerate(names):
        if len(name) > MAX_CLASS_NAME_CHARS:
            raise FinetuneError(
                f"{yaml_path}: class {index}'s name is {len(name)} characters, more than the limit of "
                f"{MAX_CLASS_NAME_CHARS}; shorten it in 'names'"
            )
    return names


def _names_from_mapping(mapping: dict, yaml_path: Path) -> list[str]:
    try:
        indexed = {int(k): str(v) for k, v in mapping.items()}
    except (TypeError, ValueError):
        raise FinetuneError(
            f"{yaml_path}: 'names' mapping keys must be integers 0..n-1; fix 'names'"
        ) from None
    if sorted(indexed) != list(range(len(indexed))):
        raise FinetuneError(
            f"{yaml_path}: 'names' mapping keys {sorted(indexed)} are not 0..{len(indexed) - 1}; "
            f"number the classes consecutively from 0"
        )
    return [indexed[i] for i in range(len(indexed))]


def _collect_images(entry: Any, root: Path, yaml_path: Path, split: str) -> list[Path]:
    """Expand a split entry (folder, list file, image, or a list of those) into image files."""
    entries = entry if isinstance(entry, (list, tuple)) else [entry]
    images: list[Path] = []
    for item in entries:
        p = Path(str(item)).expanduser()
        p = Path(os.path.normpath(p if p.is_absolute() else root / p))
        if p.is_dir():
            images += sorted(
                f for f in p.rglob("*") if f.suffix.lower() in IMG_EXTENSIONS and f.is_file()
            )
        elif p.is_file() and p.suffix.lower() == ".txt":
            images += _read_list_file(p)
        elif p.is_file() and p.suffix.lower() in IMG_EXTENSIONS:
            images.append(p)
        else:
            raise FinetuneError(
                f"{yaml_path}: {split} path '{item}' does not exist ({p}); fix '{split}' "
                f"(relative paths are relative to the dataset root {root})"
            )
    if not images:
        raise FinetuneError(
            f"{yaml_path}: no images found for '{split}' in {entries} (looked for "
            f"{', '.join(IMG_EXTENSIONS)}); point '{split}' at a folder of images or a .txt list"
        )
    return images


def _read_list_file(list_file: Path) -> list[Path]:
    """Image paths, one a line; relative ones are relative to the list file's folder."""
    out = []
    for line in list_file.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line).expanduser()
        out.append(Path(os.path.normpath(p if p.is_absolute() else list_file.parent / p)))
    return out


def _require_some_labels(train_images: list[Path], yaml_path: Path) -> None:
    """A train split with no label file at all is almost always a layout mistake."""
    if any(label_path_for(p).is_file() for p in train_images):
        return
    example = train_images[0]
    raise FinetuneError(
        f"{yaml_path}: no labels found for the {len(train_images)} train images (e.g. none at "
        f"{label_path_for(example)}); expected labels/<name>.txt beside images/ "
        f"(…/images/x.jpg → …/labels/x.txt)"
    )
