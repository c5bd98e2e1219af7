"""Reading checkpoints (ours and Ultralytics YOLOv5's) and loading pretrained weights.

Files are read by :func:`finetune.serialization.read_torch_file`, which never runs code from
them: Ultralytics ``.pt`` files pickle whole module objects (``models.yolo.DetectionModel``,
``models.common.Conv``, ``torch.nn`` layers...), and each of those classes becomes an inert
stand-in that only stores its attributes. The state dict is then read from the stand-in tree.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.errors import FinetuneError
from finetune.serialization import InertModule, InertNamespace, read_torch_file

log = logging.getLogger(__name__)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint into a plain dict whose ``model``/``ema`` are state dicts.

    Ultralytics checkpoints get their module objects replaced by float32 state dicts and
    ``names``/``nc``/``model_yaml`` filled in from the model object; ``weights_format``
    is then ``"ultralytics"``.
    """
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"weights file {path} not found; check the --weights path")
    obj = read_torch_file(path)
    if isinstance(obj, InertModule):  # torch.save(model) of a bare module
        obj = {"model": obj}
    if not isinstance(obj, dict):
        raise FinetuneError(
            f"weights file {path} holds a {type(obj).__name__}, not a checkpoint dict; "
            "pass a .pt checkpoint saved by this trainer or by YOLOv5"
        )
    return _normalise(obj, path)


def _normalise(ckpt: dict, path: Path) -> dict:
    """Replace stand-in modules with state dicts; make extras plain Python values."""
    out: dict = {}
    ultralytics_model = None
    for key, value in ckpt.items():
        if key in ("model", "ema") and isinstance(value, InertModule):
            out[key] = _state_dict_of(value, path)
            if ultralytics_model is None:
                ultralytics_model = value
        else:
            out[key] = _plain(value)
    if ultralytics_model is not None:
        attrs = ultralytics_model.__dict__
        out["weights_format"] = "ultralytics"
        out.setdefault("model_yaml", _plain(attrs.get("yaml")))
        if attrs.get("names") is not None:
            out.setdefault("names", _plain(attrs.get("names")))
        if attrs.get("nc") is not None:
            out.setdefault("nc", _plain(attrs.get("nc")))
    return out


def _plain(value: Any) -> Any:
    """Turn inert namespaces and numpy values into dicts / Python numbers.

    Containers that need no change are returned as they are (a state dict keeps its
    ``_metadata``, which load_state_dict reads).
    """
    if isinstance(value, InertNamespace):
        return {k: _plain(v) for k, v in value.__dict__.items() if k != "_args"}
    if isinstance(value, dict):
        items = [(k, _plain(v)) for k, v in value.items()]
        if all(new is value[k] for k, new in items):
            return value
        return OrderedDict(items) if isinstance(value, OrderedDict) else dict(items)
    if isinstance(value, list):
        items = [_plain(v) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else items
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    return value


def _state_dict_of(root: InertModule, path: Path) -> OrderedDict:
    """Collect parameters and persistent buffers as nn.Module.state_dict would (float32).

    Iterative, and each module visited once: a hostile file can nest modules deeper than
    Python's recursion limit or make a module its own child.
    """
    out: OrderedDict = OrderedDict()
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(root, "")]
    while stack:
        module, prefix = stack.pop()
        where = prefix.rstrip(".") or "root"
        if not isinstance(module, InertModule) or id(module) in seen:
            what = type(module).__name__ if id(module) not in seen else "a module that contains itself"
            raise FinetuneError(f"weights file {path} has a malformed model ({where} is {what}); "
                                "re-export the weights as a state dict")
        seen.add(id(module))
        attrs = module.__dict__
        skip = attrs.get("_non_persistent_buffers_set") or set()
        if not isinstance(skip, (set, frozenset)):
            raise FinetuneError(f"weights file {path} has a malformed model ({where} has an unreadable buffer list)")
        for name, t in _named(attrs, "_parameters", where, path):
            if t is not None:
                out[prefix + name] = _as_float32(t, prefix + name, path)
        for name, t in _named(attrs, "_buffers", where, path):
            if t is not None and name not in skip:
                out[prefix + name] = _as_float32(t, prefix + name, path)
        children = [(child, f"{prefix}{name}.") for name, child in _named(attrs, "_modules", where, path)
                    if child is not None]
        stack.extend(reversed(children))  # depth-first in declaration order, as state_dict() is
    return out


def _named(attrs: dict, key: str, where: str, path: Path) -> list[tuple[str, Any]]:
    """A stand-in module's ``_parameters`` / ``_buffers`` / ``_modules`` as (name, value) pairs."""
    value = attrs.get(key) or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise FinetuneError(f"weights file {path} has a malformed model ({where}.{key} is not a name mapping)")
    return list(value.items())


def _as_float32(t: Any, key: str, path: Path) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise FinetuneError(f"weights file {path} is malformed: {key} is not a tensor; re-export it")
    t = t.detach()
    return t.float() if t.is_floating_point() else t


# --------------------------------------------------------------------------- pretrained


def load_pretrained(model: nn.Module, path: str | os.PathLike,
                    logger: logging.Logger | None = None) -> dict:
    """Load pretrained weights into ``model``; returns what was loaded.

    The checkpoint's EMA weights are preferred over its raw model weights (as YOLOv5
    does). When the class count differs, the Detect output convs keep their fresh
    initialisation and everything else loads; any other mismatch means the weights are
    for a different architecture and is an error.
    """
    logger = logger or log
    path = Path(path)
    ckpt = load_checkpoint(path)
    state, which = _pick_state(ckpt, path)
    target = model.state_dict()
    head_prefix = f"model.{len(model.model) - 1}.m."
    ckpt_nc = _checkpoint_nc(ckpt, state, model, head_prefix)
    nc_differs = ckpt_nc is not None and ckpt_nc != model.nc

    _check_keys(state, target, ckpt, model, path)
    skipped = [k for k in state if nc_differs and k.startswith(head_prefix)]
    to_load = {k: v for k, v in state.items() if k not in skipped}
    for k, v in to_load.items():
        if v.shape != target[k].shape:
            raise _architecture_error(
                path, ckpt, state, model,
                f"{k} has shape {tuple(v.shape)} in the weights but {tuple(target[k].shape)} in the model",
            )
    result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys and sorted(result.missing_keys) == sorted(skipped)

    fmt = ckpt.get("weights_format", "finetune")
    if skipped:
        logger.warning(
            f"pretrained weights {path} ({fmt}, {which}): loaded {len(to_load)}/{len(target)} tensors; "
            f"skipped {len(skipped)} Detect output tensors ({', '.join(skipped)}) because the "
            f"checkpoint has {ckpt_nc} classes and the model {model.nc}; they keep their fresh "
            "initialisation and are learned from your data"
        )
    else:
        logger.info(f"pretrained weights {path} ({fmt}, {which}): loaded all {len(to_load)} tensors")
    return {
        "path": str(path), "format": fmt, "source": which, "loaded": len(to_load),
        "total": len(target), "skipped": skipped, "checkpoint_nc": ckpt_nc,
        "names": _names_list(ckpt.get("names")),
    }


def _is_state_dict(value: Any) -> bool:
    return (isinstance(value, Mapping) and len(value) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def _pick_state(ckpt: dict, path: Path) -> tuple[Mapping, str]:
    for key in ("ema", "model"):
        if _is_state_dict(ckpt.get(key)):
            return ckpt[key], key
    if _is_state_dict(ckpt):  # torch.save(model.state_dict())
        return ckpt, "state_dict"
    raise FinetuneError(
        f"weights file {path} has no model weights (no 'ema' or 'model' state dict); pass a "
        "checkpoint saved by this trainer or a YOLOv5 .pt file"
    )


def _checkpoint_nc(ckpt: dict, state: Mapping, model: nn.Module, head_prefix: str) -> int | None:
    """Class count the weights were trained for, read from the Detect conv's shape."""
    w = state.get(head_prefix + "0.weight")
    na = model.model[-1].na
    if w is not None and w.shape[0] % na == 0:
        return w.shape[0] // na - 5
    nc = ckpt.get("nc")
    return nc if isinstance(nc, int) else None


def _check_keys(state: Mapping, target: Mapping, ckpt: dict, model: nn.Module, path: Path) -> None:
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model tensors missing from the weights (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors in the weights (e.g. {unexpected[0]})")
        raise _architecture_error(path, ckpt, state, model, "; ".join(parts))


def _architecture_error(path: Path, ckpt: dict, state: Mapping, model: nn.Module,
                        detail: str) -> FinetuneError:
    weights_for = _guess_model(ckpt.get("model_yaml"), state)
    ours = _guess_model(getattr(model, "yaml", None), model.state_dict()) or "the chosen model"
    hint = (f"the weights look like {weights_for}; pass --model {weights_for}"
            if weights_for and weights_for != ours else
            "pass the --model the weights were trained with")
    return FinetuneError(
        f"weights file {path} does not fit {ours}: {detail}; {hint}, or other weights"
    )


def _guess_model(yaml_cfg: Any, state: Mapping) -> str | None:
    """Name the built-in model matching a config's multiples, or the stem's width."""
    from finetune.models.config import BUILTIN_MODELS, load_model_config

    builtins = {name: load_model_config(name) for name in BUILTIN_MODELS}
    if isinstance(yaml_cfg, dict):
        for name, cfg in builtins.items():
            if (yaml_cfg.get("depth_multiple"), yaml_cfg.get("width_multiple")) == \
                    (cfg["depth_multiple"], cfg["width_multiple"]) and \
                    yaml_cfg.get("backbone") == cfg["backbone"]:
                return name
    stem = state.get("model.0.conv.weight")
    if stem is not None and state.get("model.8.m.0.cv1.conv.weight") is not None:
        for name, cfg in builtins.items():
            if stem.shape[0] == math.ceil(64 * cfg["width_multiple"] / 8) * 8:
                return name
    return None


def _names_list(names: Any) -> list[str] | None:
    """YOLOv5 stores names as a list or as {index: name}; return a list."""
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names)]
    if isinstance(names, (list, tuple)):
        return [str(n) for n in names]
    return None
