"""Reading ``.pt`` files from strangers: no code runs, memory stays bounded, refusals are one line.

Every path of the trainer that reads a ``.pt`` file (``train --weights``, ``val --weights``,
``--resume``, ``compare``) goes through :func:`read_torch_file`. It never calls
``torch.load(weights_only=False)``, ``torch.jit.load`` or ``pickle.Unpickler``:

1. The file size is capped (``FINETUNE_MAX_WEIGHTS_BYTES``, default 4 GiB).
2. The file is opened with torch's own zip reader (``torch._C.PyTorchFileReader``), the one
   ``torch.load`` itself uses, so "is this TorchScript / a legacy tar or raw pickle / not a
   checkpoint at all" is decided by the parser that would read it. A file it cannot parse is
   refused, whatever another parser thinks of it; TorchScript archives (``constants.pkl``,
   ``code/``) are refused, so ``torch.jit.load`` and its ``__setstate__`` never run.
3. Every record must lie inside the file without overlapping the next one. Torch writes
   records uncompressed, so this bounds what any record can expand to by the bytes it
   occupies: a deflate-compressed record that inflates past its own space is refused before
   anything is decompressed.
4. The globals of ``data.pkl`` are listed with torch's own scanner
   (``torch._weights_only_unpickler.get_globals_in_pkl``) and checked against an allow-list
   that is narrower than torch's default one (which admits ``bytearray(N)`` and
   ``torch.Tensor(N)``, both allocations a few bytes of pickle can make gigabytes). Classes of
   YOLOv5 model objects become inert stand-ins that only store their attributes, registered
   under their Ultralytics names with ``torch.serialization.safe_globals``.
5. ``data.pkl`` is unpickled by torch's weights-only unpickler (a pure-Python interpreter of a
   safe opcode subset), with a ``persistent_load`` that checks each storage's declared size
   against the record that holds it before anything is allocated.
6. The result is walked once: every tensor must be a plain, strided, CPU tensor that does not
   claim more elements than its storage holds (a zero stride can make a few bytes "hold"
   terabytes, which the first copy would allocate), and is replaced by a clean tensor over the
   same storage, so no attribute, hook or subclass from the file survives. Attributes set on
   an ``OrderedDict`` (which could shadow its methods) other than ``_metadata`` are refused.
"""

from __future__ import annotations

import io
import math
import os
import re
import sys
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import serialization as torch_serialization
from torch._weights_only_unpickler import Unpickler as WeightsOnlyUnpickler
from torch._weights_only_unpickler import get_globals_in_pkl

from .errors import FinetuneError

MAX_WEIGHTS_BYTES_ENV = "FINETUNE_MAX_WEIGHTS_BYTES"
DEFAULT_MAX_WEIGHTS_BYTES = 4 * 1024**3  # yolov5x.pt is ~170 MiB; a full fp32 checkpoint with optimizer ~0.7 GiB
MAX_PICKLE_BYTES = 64 * 1024**2  # data.pkl of a yolov5x checkpoint is well under 1 MiB
MAX_STAND_IN_CLASSES = 10_000

# The one-liner the refusal of a legacy file prints (also in docs/trainer-contract.md).
LEGACY_CONVERSION = ("python -c \"import sys, torch; torch.save(torch.load(sys.argv[1], weights_only=False), "
                     "sys.argv[2])\" OLD.pt NEW.pt")

# --------------------------------------------------------------------------- stand-ins


class Inert:
    """Stand-in for a pickled object of a class we do not import: stores state, runs nothing."""

    origin = "object"

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
            # Dunder names could shadow Python's own hooks on this object; drop them.
            self.__dict__.update({k: v for k, v in dict.items(state)
                                  if isinstance(k, str) and not k.startswith("__")})
        else:
            self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<inert {self.origin}>"


class InertModule(Inert):
    """Stand-in for an ``nn.Module`` subclass (torch.nn layers, YOLOv5 model classes)."""


class InertNamespace(Inert):
    """Stand-in for ``argparse.Namespace`` (YOLOv5's ``opt``); its attributes are the data."""


def _inert_path(*parts: Any) -> str:
    """pathlib paths unpickle as plain strings."""
    return str(PurePosixPath(*(str(p) for p in parts))) if parts else ""


class _NumpyArray:
    """Stand-in for ``numpy.ndarray``: rebuilt from its raw bytes only if they match its shape.

    numpy's own ``_reconstruct`` allocates whatever shape the pickle names, and object arrays
    hold arbitrary pickled objects, so neither is used.
    """

    def __setstate__(self, state: Any) -> None:
        import numpy as np

        if not (isinstance(state, tuple) and len(state) == 5):
            raise FinetuneError("a numpy array in it has an unexpected pickled state")
        _, shape, dtype, fortran, raw = state
        if not (isinstance(dtype, np.dtype) and not dtype.hasobject and isinstance(raw, bytes)
                and isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)
                and math.prod(shape) * dtype.itemsize == len(raw)):
            raise FinetuneError("a numpy array in it declares a shape or dtype its data does not match")
        self.array = np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()


def _numpy_reconstruct(cls: Any, shape: Any, dtype: Any) -> _NumpyArray:
    if cls is not _NumpyArray:
        raise FinetuneError("it rebuilds a numpy subclass")
    return _NumpyArray()


def _numpy_globals() -> dict[str, Any]:
    """numpy values YOLOv5 checkpoints hold (``best_fitness``): scalars and small arrays."""
    import numpy as np

    out: dict[str, Any] = {"numpy.dtype": np.dtype, "numpy.ndarray": _NumpyArray}
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[f"{core}.scalar"] = _numpy_scalar
        out[f"{core}._reconstruct"] = _numpy_reconstruct
    # BUILD on a dtype is checked against the dtype's own class (numpy.dtypes.Float64DType...).
    for name in dir(np.dtypes):
        if name.endswith("DType"):
            out[f"numpy.dtypes.{name}"] = getattr(np.dtypes, name)
    return out


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """``numpy.core.multiarray.scalar`` for plain (non-object) dtypes: a number from its bytes."""
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes) \
            or len(data) != dtype.itemsize:
        raise FinetuneError("a numpy scalar in it is not a plain number")
    return np.frombuffer(data, dtype=dtype)[0]


# Module prefixes whose classes become inert stand-ins: torch's layers and the two layouts
# Ultralytics checkpoints come in (the repository's ``models.*``, the PyPI package's
# ``yolov5.models.*``), plus the newer ``ultralytics`` package (refused later as another
# architecture, with a message about the model, not about code).
STAND_IN_PREFIXES = ("torch.nn.modules.", "models.", "yolov5.models.", "ultralytics.")
_PATH_CLASSES = ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")


def _torch_globals() -> set[str]:
    """The part of torch's default allow-list that plain tensors and state dicts need."""
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = {"torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
               "collections.OrderedDict", "torch.Size", "torch.device", "_codecs.encode", "builtins.set",
               "builtins.complex"}
    for name, value in _get_allowed_globals().items():
        if isinstance(value, torch.dtype):
            allowed.add(name)
        elif re.fullmatch(r"torch\.(cuda\.)?[A-Za-z0-9]+Storage", name) and ".Q" not in name \
                and not name.startswith(("torch.Q", "torch.cuda.Q")):
            allowed.add(name)
    return allowed


def _classify_globals(names: set[str], allow_stand_ins: bool, what: str) -> list[tuple[Any, str]]:
    """The ``safe_globals`` entries for ``names``; refuse any name outside the allow-list."""
    torch_allowed = _torch_globals()
    extra = {"argparse.Namespace": InertNamespace, **_numpy_globals()}
    extra.update({f"{m}.{c}": _inert_path for m in ("pathlib", "pathlib._local") for c in _PATH_CLASSES})
    registered: list[tuple[Any, str]] = []
    refused: list[str] = []
    stand_ins = 0
    for full in sorted(names):
        if full in torch_allowed:
            continue
        if allow_stand_ins and full in extra:
            registered.append((extra[full], full))
        elif allow_stand_ins and full.startswith(STAND_IN_PREFIXES):
            stand_ins += 1
            module, _, name = full.rpartition(".")
            registered.append((type(name, (InertModule,), {"origin": full, "__module__": module}), full))
        else:
            refused.append(full)
    if any(full == "numpy.dtype" for _, full in registered):
        # BUILD on a dtype checks the dtype's own class, which the pickle never names.
        registered += [(obj, full) for full, obj in extra.items() if full.startswith("numpy.dtypes.")]
    if refused:
        refused = [_python3_name(full) for full in refused]
        shown = ", ".join(refused[:3]) + (f" and {len(refused) - 3} more" if len(refused) > 3 else "")
        kinds = "tensors and plain containers" + (", YOLOv5 model classes" if allow_stand_ins else "")
        raise FinetuneError(
            f"{what} was refused: it references {shown}, which could run code or allocate unbounded "
            f"memory when loaded (only {kinds} are allowed); use a file from a trusted source, or "
            "re-save it as a plain state dict with torch.save(model.state_dict())")
    if stand_ins > MAX_STAND_IN_CLASSES:
        raise FinetuneError(f"{what} was refused: it names {stand_ins} model classes (at most "
                            f"{MAX_STAND_IN_CLASSES}); a YOLOv5 checkpoint names a few dozen")
    return registered


# --------------------------------------------------------------------------- the archive


def max_weights_bytes() -> int:
    raw = os.environ.get(MAX_WEIGHTS_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_WEIGHTS_BYTES
    if not raw.isdigit() or int(raw) < 1:
        raise FinetuneError(f"{MAX_WEIGHTS_BYTES_ENV}={raw!r}: expected a positive number of bytes")
    return int(raw)


def _looks_legacy(f: io.BufferedReader) -> bool:
    """A hint for the message only (the refusal does not depend on it): a pre-1.6 torch.save
    file is a pickle (protocol 2, magic number first) or a tar archive."""
    f.seek(0)
    head = f.read(512)
    return head.startswith(b"\x80\x02\x8a\x0a") or head[257:262] == b"ustar"


def _open_archive(f: io.BufferedReader, what: str) -> torch._C.PyTorchFileReader:
    try:
        return torch._C.PyTorchFileReader(f)
    except Exception as exc:
        if _looks_legacy(f):
            raise FinetuneError(
                f"{what} is in the legacy (pre-zip, torch < 1.6) format, which cannot be read without "
                f"running code from it; if it comes from a source you trust, convert it once with a current "
                f"torch (and, for a YOLOv5 file, inside a YOLOv5 checkout): {LEGACY_CONVERSION}") from None
        raise FinetuneError(
            f"{what} is not a readable PyTorch checkpoint ({_first_line(exc)}); pass a .pt file saved by "
            "this trainer or by YOLOv5 (re-download it if it was truncated)") from None


def _check_records(reader: torch._C.PyTorchFileReader, file_size: int, what: str) -> dict[str, int]:
    """Record name -> size, once every record is known to occupy its own bytes of the file."""
    # has_record first: an archive whose other names are not valid UTF-8 (which
    # get_all_records cannot return) is still recognised as TorchScript.
    if reader.has_record("constants.pkl"):
        raise FinetuneError(f"{what} is a TorchScript export, not a training checkpoint (loading it runs "
                            "code); pass the .pt checkpoint (e.g. best.pt) instead")
    records = list(reader.get_all_records())
    if any(r.startswith("code/") for r in records):
        raise FinetuneError(f"{what} is a TorchScript export, not a training checkpoint (loading it runs "
                            "code); pass the .pt checkpoint (e.g. best.pt) instead")
    if "data.pkl" not in records:
        raise FinetuneError(f"{what} is a zip archive without data.pkl, not a torch.save checkpoint")
    spans = sorted((reader.get_record_offset(name), reader.get_record_size(name), name) for name in records)
    for i, (offset, size, name) in enumerate(spans):
        end = spans[i + 1][0] if i + 1 < len(spans) else file_size
        if offset < 0 or offset + size > end:
            raise FinetuneError(
                f"{what} was refused: its record {name!r} expands to {size} bytes, more than it occupies in "
                "the file (a compressed or overlapping record; torch.save writes neither)")
    sizes = {name: size for _, size, name in spans}
    if sizes["data.pkl"] > MAX_PICKLE_BYTES:
        raise FinetuneError(f"{what} was refused: its data.pkl is {sizes['data.pkl']} bytes "
                            f"(at most {MAX_PICKLE_BYTES})")
    return sizes


def _storage_loader(reader: torch._C.PyTorchFileReader, sizes: dict[str, int], what: str):
    """``persistent_load`` for the unpickler: a storage only once its size matches its record."""
    loaded: dict[str, torch.storage.TypedStorage] = {}
    swap = reader.has_record("byteorder") and reader.get_record("byteorder") == b"big" \
        and sys.byteorder == "little"

    def persistent_load(saved_id: Any) -> torch.storage.TypedStorage:
        if not (isinstance(saved_id, tuple) and len(saved_id) == 5):
            raise FinetuneError(f"{what} was refused: a tensor reference in it is malformed")
        _, storage_type, key, _location, numel = saved_id
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, "dtype", None)
        if not isinstance(dtype, torch.dtype) or type(key) is not str or type(numel) is not int or numel < 0:
            raise FinetuneError(f"{what} was refused: a tensor reference in it is malformed")
        name = f"data/{key}"
        nbytes = numel * torch._utils._element_size(dtype)
        if name not in sizes or sizes[name] != nbytes:
            have = f"a record of {sizes[name]} bytes" if name in sizes else "no such record"
            raise FinetuneError(f"{what} was refused: tensor storage {key!r} declares {nbytes} bytes but the "
                                f"file has {have}")
        if key in loaded:
            if loaded[key].dtype != dtype:
                raise FinetuneError(f"{what} was refused: tensor storage {key!r} is used with two dtypes")
            return loaded[key]
        storage = reader.get_storage_from_record(name, nbytes, torch.UntypedStorage)._typed_storage()._untyped_storage
        if swap:
            storage.byteswap(dtype)
        loaded[key] = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
        return loaded[key]

    return persistent_load


# --------------------------------------------------------------------------- the result


def _clean_tensor(t: torch.Tensor, what: str) -> torch.Tensor:
    """A fresh plain tensor over ``t``'s storage, read through the class's own methods so
    attributes the file set on the object (which could shadow them) are never consulted."""
    base = torch._C.TensorBase
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or base.layout.__get__(t) != torch.strided \
            or base.device.__get__(t).type != "cpu":
        raise FinetuneError(f"{what} was refused: it holds a tensor that is not a plain dense CPU tensor")
    if object.__getattribute__(t, "__dict__"):
        raise FinetuneError(f"{what} was refused: a tensor in it carries attributes "
                            f"({', '.join(map(str, list(object.__getattribute__(t, '__dict__'))[:3]))}) "
                            "that would shadow tensor methods")
    size, stride = base.size(t), base.stride(t)
    storage = base.untyped_storage(t)
    dtype = base.dtype.__get__(t)
    numel = math.prod(size)
    if any(s < 0 for s in stride) or numel * torch._utils._element_size(dtype) > storage.nbytes():
        raise FinetuneError(f"{what} was refused: a tensor in it claims {numel} elements of a storage of "
                            f"{storage.nbytes()} bytes (strides {tuple(stride)})")
    return torch.empty(0, dtype=dtype).set_(storage, base.storage_offset(t), size, stride)


def _clean(value: Any, what: str, memo: dict[int, Any]) -> Any:
    """``value`` with every tensor replaced by a clean one; shared objects stay shared."""
    key = id(value)
    if key in memo:
        return memo[key]
    if isinstance(value, torch.Tensor):
        out: Any = _clean_tensor(value, what)
    elif type(value) in (dict, OrderedDict):
        out = type(value)()
        memo[key] = out
        attrs = {} if type(value) is dict else object.__getattribute__(value, "__dict__")
        if set(attrs) - {"_metadata"}:
            raise FinetuneError(f"{what} was refused: a dict in it carries attributes "
                                f"({', '.join(map(str, list(attrs)[:3]))}) that would shadow its methods")
        if "_metadata" in attrs:
            out._metadata = _clean(attrs["_metadata"], what, memo)
        for k, v in dict.items(value):
            out[_clean(k, what, memo)] = _clean(v, what, memo)
    elif type(value) is list:
        out = []
        memo[key] = out
        out.extend(_clean(v, what, memo) for v in value)
    elif type(value) in (tuple, set):
        out = type(value)(_clean(v, what, memo) for v in value)
    elif isinstance(value, Inert):
        memo[key] = value
        state = object.__getattribute__(value, "__dict__")
        for k in list(state):
            state[k] = _clean(state[k], what, memo)
        out = value
    elif isinstance(value, _NumpyArray):
        out = value.array
    else:
        out = value
    memo[key] = out
    return out


# --------------------------------------------------------------------------- entry point


def read_torch_file(path: str | os.PathLike, *, what: str | None = None, allow_stand_ins: bool = True) -> Any:
    """The object a ``torch.save`` file holds, read without running code from it.

    ``what`` starts every refusal ("weights file runs/x.pt" by default); ``allow_stand_ins``
    admits YOLOv5/torch.nn model objects as inert stand-ins (off for our own checkpoints, which
    hold only tensors and plain data). Every problem is a one-line ``FinetuneError``.
    """
    path = Path(path)
    what = what or f"weights file {path}"
    if not path.is_file():
        raise FinetuneError(f"{what} not found; check the path")
    # One open file for the size check and the reading (a path could be swapped in between);
    # a file object also reads names that are not valid UTF-8, which a str path cannot carry.
    with open(path, "rb") as f:
        return _read_open_file(f, what, allow_stand_ins)


def _read_open_file(f: io.BufferedReader, what: str, allow_stand_ins: bool) -> Any:
    file_size = os.fstat(f.fileno()).st_size
    limit = max_weights_bytes()
    if file_size > limit:
        raise FinetuneError(f"{what} was refused: it is {file_size} bytes, more than {MAX_WEIGHTS_BYTES_ENV}="
                            f"{limit}; raise that limit if the file is genuine")
    try:
        reader = _open_archive(f, what)
        sizes = _check_records(reader, file_size, what)
        pickled = reader.get_record("data.pkl")
        try:
            names = get_globals_in_pkl(io.BytesIO(pickled))
        except Exception as exc:
            raise FinetuneError(f"{what} was refused: its data.pkl uses pickle features a checkpoint does not "
                                f"need ({_first_line(exc)})") from None
        safe = _classify_globals(names, allow_stand_ins, what)
        unpickler = WeightsOnlyUnpickler(io.BytesIO(pickled), encoding="utf-8")
        unpickler.persistent_load = _storage_loader(reader, sizes, what)
        with torch_serialization.safe_globals(safe):
            obj = unpickler.load()
        return _clean(obj, what, {})
    except FinetuneError:
        raise
    except RecursionError:
        raise FinetuneError(f"{what} was refused: it nests objects deeper than any checkpoint does") from None
    except Exception as exc:  # anything torch's reader or unpickler rejects
        if "resize storage that is not resizable" in str(exc):
            # _rebuild_tensor_v2 -> set_() with an offset/size/stride beyond the storage: storages
            # read from records are not resizable, so torch refuses instead of allocating.
            raise FinetuneError(f"{what} was refused: a tensor in it reaches outside its storage (bad offset, "
                                "size or stride)") from None
        raise FinetuneError(f"{what} is not a readable PyTorch checkpoint ({_first_line(exc)}); pass a .pt "
                            "file saved by this trainer or by YOLOv5 (re-download it if it was truncated)") from None


def _python3_name(full: str) -> str:
    """A global as Python 3 spells it, for messages: protocol-2 pickles spell some modules the
    Python 2 way (``subprocess.call`` is written ``commands.call``)."""
    import _compat_pickle

    module, _, name = full.rpartition(".")
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text.split(". ")[0][:160] or type(exc).__name__
