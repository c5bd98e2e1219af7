"""Reading checkpoints (ours and Ultralytics YOLOv5's) and loading pretrained weights.

Our checkpoints hold only plain state dicts, numbers and strings, so they load with
``torch.load(weights_only=True)``. Ultralytics YOLOv5 ``.pt`` files pickle whole module
objects (``models.yolo.DetectionModel``, ``models.common.Conv``, ``torch.nn`` layers...)
and would normally need Ultralytics' code installed and a full, code-running unpickle.
Instead we unpickle them with a restricted unpickler: tensor rebuilding, plain containers
and a few inert value types are allowed; every module class becomes an inert stand-in
that only stores its attributes; any other global (``os.system``, ``builtins.eval``...)
is refused before it can be called. The state dict is then read from the stand-in tree.
"""

from __future__ import annotations

import _compat_pickle
import io
import logging
import math
import os
import pickle
import types
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import nn

from finetune.errors import FinetuneError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- stand-ins


class _Inert:
    """Stand-in for a pickled object of a class we do not import: stores state, runs nothing."""

    _origin = "object"

    def __init__(self, *args: Any, **kwargs: Any):
        self.__dict__["_args"] = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            merged: dict = {}
            for part in state:
                if isinstance(part, dict):
                    merged.update(part)
            state = merged
        if isinstance(state, dict):
            # Dunder names could shadow pickle's own hooks on a later BUILD; drop them.
            self.__dict__.update({k: v for k, v in state.items()
                                  if isinstance(k, str) and not k.startswith("__")})
        else:
            self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<inert {self._origin}>"


class _InertModule(_Inert):
    """Stand-in for an ``nn.Module`` subclass (torch.nn layers, YOLOv5 model classes)."""


class _InertNamespace(_Inert):
    """Stand-in for ``argparse.Namespace`` (YOLOv5's ``opt``); converted to a dict."""


def _inert_path(*parts: Any) -> str:
    """pathlib paths unpickle as plain strings."""
    return str(PurePosixPath(*(str(p) for p in parts))) if parts else ""


_MODULE_PREFIXES = ("torch.nn.modules.", "models.", "ultralytics.")
_PATH_MODULES = ("pathlib", "pathlib._local")
_PATH_CLASSES = ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")
_BUILTINS = {t.__name__: t for t in (set, frozenset, list, dict, tuple, slice, complex, bytearray)}
_TORCH_REBUILD = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                  "_rebuild_parameter", "_rebuild_parameter_with_state")
_stand_in_classes: dict[tuple[str, str], type] = {}


def _stand_in(module: str, name: str) -> type:
    """One inert subclass per original class, so messages can name the original."""
    key = (module, name)
    if key not in _stand_in_classes:
        _stand_in_classes[key] = type(name, (_InertModule,), {"_origin": f"{module}.{name}"})
    return _stand_in_classes[key]


class _ForbiddenGlobal(FinetuneError):
    """A pickle referenced a global outside the allow-list."""


def _numpy_global(module: str, name: str) -> Any:
    """numpy arrays/scalars (YOLOv5 stores ``best_fitness`` as one); data, not code."""
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
        return getattr(multiarray, name)
    if module == "numpy" and name in ("ndarray", "dtype"):
        return getattr(np, name)
    if module == "numpy.dtypes" and name.endswith("DType"):
        return getattr(np.dtypes, name)
    return None


def _encode_bytes(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` limited to the text encodings pickle itself uses."""
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError(f"unexpected encoding {encoding!r} in pickled bytes")
    return text.encode(encoding)


def _allowed_global(module: str, name: str) -> Any:
    """The object a pickle may reference as ``module.name``, or None if forbidden."""
    if module == "torch._utils" and name in _TORCH_REBUILD:
        return getattr(torch._utils, name)
    if module == "torch":
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype) or name in ("device", "Size"):
            return value
        return None
    if module == "collections" and name == "OrderedDict":
        return OrderedDict
    if module == "builtins" and name in _BUILTINS:
        return _BUILTINS[name]
    if module == "_codecs" and name == "encode":  # protocol-2 pickles encode bytes this way
        return _encode_bytes
    if module == "argparse" and name == "Namespace":
        return _InertNamespace
    if module in _PATH_MODULES and name in _PATH_CLASSES:
        return _inert_path
    if module.startswith("numpy"):
        return _numpy_global(module, name)
    if module.startswith(_MODULE_PREFIXES) or module in ("models", "ultralytics"):
        return _stand_in(module, name)
    return None


def _restricted_pickle_module(path: Path) -> types.ModuleType:
    """A module-like object for ``torch.load(pickle_module=...)`` with a safe find_class."""

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            # Protocol-2 pickles spell Python 3 modules the Python 2 way (__builtin__).
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            value = _allowed_global(module, name)
            if value is None:
                raise _ForbiddenGlobal(
                    f"weights file {path} was refused: it references {module}.{name}, which "
                    "could run code when loaded (only tensors, plain containers and YOLOv5 "
                    "model classes are allowed); use weights from a trusted source, or "
                    "re-save them as a plain state dict with torch.save(model.state_dict())"
                )
            return value

    mod = types.ModuleType("finetune_restricted_pickle")
    mod.Unpickler = RestrictedUnpickler
    mod.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()
    mod.loads = lambda data, **kw: RestrictedUnpickler(io.BytesIO(data), **kw).load()
    return mod


# --------------------------------------------------------------------------- loading


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint into a plain dict whose ``model``/``ema`` are state dicts.

    Ultralytics checkpoints get their module objects replaced by float32 state dicts and
    ``names``/``nc``/``model_yaml`` filled in from the model object; ``weights_format``
    is then ``"ultralytics"``.
    """
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"weights file {path} not found; check the --weights path")
    _refuse_torchscript(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not plain weights: try the restricted unpickler
        obj = _load_restricted(path)
    if isinstance(obj, _InertModule):  # torch.save(model) of a bare module
        obj = {"model": obj}
    if not isinstance(obj, dict):
        raise FinetuneError(
            f"weights file {path} holds a {type(obj).__name__}, not a checkpoint dict; "
            "pass a .pt checkpoint saved by this trainer or by YOLOv5"
        )
    return _normalise(obj, path)


def _refuse_torchscript(path: Path) -> None:
    """torch.load hands TorchScript archives to torch.jit.load, which loads code."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return
    if any(n.endswith("constants.pkl") for n in names):
        raise FinetuneError(
            f"weights file {path} is a TorchScript export, not a training checkpoint; "
            "pass the .pt checkpoint (e.g. best.pt) instead"
        )


def _load_restricted(path: Path) -> Any:
    if os.getenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        raise FinetuneError(
            f"weights file {path} is not a plain-tensor checkpoint and TORCH_FORCE_WEIGHTS_ONLY_LOAD "
            "is set; unset it to load YOLOv5 checkpoints through the restricted unpickler"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=_restricted_pickle_module(path))
    except FinetuneError:
        raise
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:160]
        raise FinetuneError(
            f"weights file {path} is not a readable PyTorch checkpoint ({reason}); pass a .pt "
            "file saved by this trainer or by YOLOv5 (re-download it if it was truncated)"
        ) from None


def _normalise(ckpt: dict, path: Path) -> dict:
    """Replace stand-in modules with state dicts; make extras plain Python values."""
    out: dict = {}
    ultralytics_model = None
    for key, value in ckpt.items():
        if key in ("model", "ema") and isinstance(value, _InertModule):
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
    if isinstance(value, _InertNamespace):
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


def _state_dict_of(root: _InertModule, path: Path) -> OrderedDict:
    """Collect parameters and persistent buffers as nn.Module.state_dict would (float32)."""
    out: OrderedDict = OrderedDict()

    def visit(module: Any, prefix: str) -> None:
        if not isinstance(module, _InertModule):
            raise FinetuneError(
                f"weights file {path} has a malformed model ({prefix or 'root'} is a "
                f"{type(module).__name__}); re-export the weights as a state dict"
            )
        attrs = module.__dict__
        skip = attrs.get("_non_persistent_buffers_set") or set()
        for name, t in (attrs.get("_parameters") or {}).items():
            if t is not None:
                out[prefix + name] = _as_float32(t, prefix + name, path)
        for name, t in (attrs.get("_buffers") or {}).items():
            if t is not None and name not in skip:
                out[prefix + name] = _as_float32(t, prefix + name, path)
        for name, child in (attrs.get("_modules") or {}).items():
            if child is not None:
                visit(child, f"{prefix}{name}.")

    visit(root, "")
    return out


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
