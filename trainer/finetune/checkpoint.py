"""Checkpoint files: written by rank 0 only, atomically.

A checkpoint is written to a temporary file in the same directory, flushed and fsynced,
then renamed over the target: `os.replace` is atomic on POSIX, so a kill at any moment
leaves either the previous complete file or the new complete file, never a torn one.
Our checkpoints hold only tensors, numbers, strings, lists and dicts, and resuming reads them
with `serialization.read_torch_file` (no model stand-ins allowed): it never runs code.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import FinetuneError
from .serialization import read_torch_file

CHECKPOINT_FORMAT = "finetune/v1"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o664)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(obj: dict[str, Any], path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_resume_checkpoint(path: Path) -> dict[str, Any]:
    """Load our own `last.pt` for --resume (tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"cannot resume: {path} does not exist; run without --resume "
                            f"(or with --resume=auto) to start a new run in {path.parent}")
    # Read like any stranger's file: the output volume may be shared, and a last.pt there could
    # have been replaced by someone else; delete it to start over.
    ckpt = read_torch_file(path, what=f"cannot resume: {path}", allow_stand_ins=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise FinetuneError(f"cannot resume from {path}: it is not a finetune training "
                            f"checkpoint; delete it or choose another --out")
    return ckpt


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_results_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite results.csv from the full history kept in the checkpoint, so a resumed run
    never duplicates or loses an epoch's row."""
    if not rows:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_bytes(path, buffer.getvalue().encode())
