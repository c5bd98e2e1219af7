"""Model configs (YOLOv5 YAML form), freeze presets and freeze-depth validation.

This module must import without torch: the operator image has no torch and uses it to
validate a FineTune's ``model`` and ``freeze`` fields before any pod starts. Everything
here is plain Python over the parsed YAML dict.

A config is a dict with ``nc``, ``depth_multiple``, ``width_multiple``, ``anchors`` (one
list of ``w, h`` pairs per detection level) and ``backbone`` / ``head`` lists of
``[from, number, module, args]`` rows. Module ``i`` of the built model is row ``i`` of
``backbone + head``.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import FinetuneError

# libyaml's safe loader where PyYAML was built with it (the same safe subset, in C).
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

BUILTIN_MODELS: tuple[str, ...] = ("yolov5n", "yolov5s", "yolov5m", "yolov5l", "yolov5x")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Module names a config may use; "nn.Upsample" and "Upsample" are the same module.
SUPPORTED_MODULES: tuple[str, ...] = (
    "Conv", "Bottleneck", "C3", "SPPF", "Concat", "Upsample", "nn.Upsample", "Detect",
)

_REQUIRED_KEYS = ("nc", "depth_multiple", "width_multiple", "anchors", "backbone", "head")


def load_model_config(name_or_path: str | os.PathLike | dict) -> dict:
    """Return the config dict for a built-in model name or a model YAML path.

    A dict is validated and returned as a deep copy, so callers can pass either form.
    """
    if isinstance(name_or_path, dict):
        cfg = copy.deepcopy(name_or_path)
        validate_model_config(cfg, source="the model config")
        return cfg
    path = _config_path(str(name_or_path))
    if path.parent == CONFIG_DIR:
        # A built-in config: parsed once per process (the operator validates every new
        # FineTune against one, and parsing YAML was a seventh of its work in a burst).
        return copy.deepcopy(_builtin_config(path))
    return _parse_config_file(path)


@functools.lru_cache(maxsize=None)
def _builtin_config(path: Path) -> dict:
    return _parse_config_file(path)


def _parse_config_file(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise FinetuneError(
            f"cannot read model config {path}: {e.strerror or e}; check the --model path"
        ) from None
    try:
        cfg = yaml.load(text, Loader=_YAML_LOADER)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FinetuneError(
            f"model config {path} is not valid YAML ({first}); fix the file or use one of "
            f"{', '.join(BUILTIN_MODELS)}"
        ) from None
    validate_model_config(cfg, source=f"model config {path}")
    return cfg


def _config_path(name: str) -> Path:
    """Map a built-in name (optionally with .yaml) or a file path to a file path."""
    stem = name[:-5] if name.endswith(".yaml") else name
    if stem in BUILTIN_MODELS and not Path(name).is_file():
        return CONFIG_DIR / f"{stem}.yaml"
    path = Path(name).expanduser()
    looks_like_path = path.suffix in (".yaml", ".yml") or os.sep in name or "/" in name
    if looks_like_path:
        if not path.is_file():
            raise FinetuneError(
                f"model config {name} not found; check the --model path or use one of "
                f"{', '.join(BUILTIN_MODELS)}"
            )
        return path
    raise FinetuneError(
        f"unknown model {name!r}; use one of {', '.join(BUILTIN_MODELS)} "
        "or a path to a model YAML"
    )


def validate_model_config(cfg: Any, source: str = "the model config") -> None:
    """Raise FinetuneError unless ``cfg`` is a buildable YOLOv5-style config."""

    def bad(problem: str) -> FinetuneError:
        return FinetuneError(
            f"{source} is malformed: {problem}; fix it (see the built-in yolov5s.yaml "
            "for the expected form)"
        )

    if not isinstance(cfg, dict):
        raise bad("expected a mapping at the top level")
    missing = [k for k in _REQUIRED_KEYS if k not in cfg]
    if missing:
        raise bad(f"missing key(s) {', '.join(missing)}")
    if not _is_int(cfg["nc"]) or cfg["nc"] < 1:
        raise bad(f"nc must be a positive integer, got {cfg['nc']!r}")
    for key in ("depth_multiple", "width_multiple"):
        if not isinstance(cfg[key], (int, float)) or isinstance(cfg[key], bool) or cfg[key] <= 0:
            raise bad(f"{key} must be a positive number, got {cfg[key]!r}")
    _validate_anchors(cfg["anchors"], bad)
    rows = _rows(cfg, bad)
    for i, row in enumerate(rows):
        _validate_row(i, row, bad)
    if rows[-1][2] != "Detect" or any(r[2] == "Detect" for r in rows[:-1]):
        raise bad("the last module (and only the last) must be Detect")
    detect_from = rows[-1][0]
    if not isinstance(detect_from, list) or len(detect_from) != len(cfg["anchors"]):
        raise bad("Detect's 'from' must list one input per anchor level")


def _validate_anchors(anchors: Any, bad) -> None:
    if not isinstance(anchors, list) or not anchors:
        raise bad("anchors must be a list with one list of w,h pairs per level")
    for level in anchors:
        if (not isinstance(level, list) or not level or len(level) % 2
                or not all(isinstance(v, (int, float)) and v > 0 for v in level)):
            raise bad(f"anchor level {level!r} must be a non-empty list of positive w,h pairs")
    if len({len(level) for level in anchors}) != 1:
        raise bad("every anchor level must have the same number of anchors")


def _rows(cfg: dict, bad) -> list:
    for key in ("backbone", "head"):
        if not isinstance(cfg[key], list) or (key == "backbone" and not cfg[key]):
            raise bad(f"{key} must be a non-empty list of [from, number, module, args] rows")
    rows = cfg["backbone"] + cfg["head"]
    if not cfg["head"]:
        raise bad("head must end with a Detect module")
    return rows


def _validate_row(i: int, row: Any, bad) -> None:
    if not isinstance(row, list) or len(row) != 4:
        raise bad(f"module {i} must be a [from, number, module, args] row, got {row!r}")
    frm, number, module, args = row
    sources = frm if isinstance(frm, list) else [frm]
    if not sources or not all(_is_int(s) and (s == -1 or 0 <= s < i) for s in sources):
        raise bad(f"module {i} has invalid 'from' {frm!r} (use -1 or earlier module indices)")
    if i == 0 and sources != [-1]:
        raise bad("module 0 must take the input (from -1)")
    if not _is_int(number) or number < 1:
        raise bad(f"module {i} has invalid number {number!r}")
    if module not in SUPPORTED_MODULES:
        raise bad(f"module {i} is {module!r}; supported: {', '.join(SUPPORTED_MODULES)}")
    if not isinstance(args, list):
        raise bad(f"module {i} args must be a list, got {args!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def module_count(cfg: dict) -> int:
    """Number of modules in the built model (25 for the standard YOLOv5 P5 configs)."""
    return len(cfg["backbone"]) + len(cfg["head"])


def detect_index(cfg: dict) -> int:
    """Index of the Detect module (the last row)."""
    rows = cfg["backbone"] + cfg["head"]
    return max(i for i, row in enumerate(rows) if row[2] == "Detect")


# Named freeze depths, as functions of the model config: the whole backbone, or everything before Detect.
_FREEZE_PRESET_DEPTHS = {"backbone": lambda cfg: len(cfg["backbone"]), "all-but-detect": detect_index}
FREEZE_PRESETS: tuple[str, ...] = tuple(_FREEZE_PRESET_DEPTHS)


def freeze_presets(cfg: dict) -> dict[str, int]:
    """``{preset name: freeze depth}`` for this model config."""
    return {name: depth(cfg) for name, depth in _FREEZE_PRESET_DEPTHS.items()}


def resolve_freeze(freeze: str | int | None, cfg: dict) -> int:
    """Turn a ``--freeze`` value (int, digit string or preset name) into a module count.

    Freezing ``N`` freezes modules ``0..N-1``. Valid depths are ``0..module_count - 1``:
    freezing every module (Detect included) would leave nothing to train, so it is
    rejected here, where the operator validates, rather than failing later in the pod.
    """
    presets = freeze_presets(cfg)
    count = module_count(cfg)
    hint = (f"use a depth from 0 to {count - 1} or one of "
            + ", ".join(f"{k} (= {v})" for k, v in presets.items()))
    if freeze is None:
        return 0
    if isinstance(freeze, bool):
        raise FinetuneError(f"invalid freeze value {freeze!r}; {hint}")
    if isinstance(freeze, str):
        text = freeze.strip().lower()
        if text in presets:
            return presets[text]
        if not text.lstrip("-").isdigit():
            raise FinetuneError(f"unknown freeze value {freeze!r}; {hint}")
        freeze = int(text)
    if not isinstance(freeze, int):
        raise FinetuneError(f"invalid freeze value {freeze!r}; {hint}")
    if freeze < 0 or freeze >= count:
        raise FinetuneError(
            f"freeze depth {freeze} is out of range for a model with {count} modules; {hint}"
        )
    return freeze
