"""Helpers for trainer tests that run the real `finetune` command and torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finetune_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "finetune.cli", *args]


def launch_cmd(nproc: int, *args: str) -> list[str]:
    """`python -m finetune.launch` is torchrun with the workers' exit codes passed through."""
    return [sys.executable, "-m", "finetune.launch", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "finetune.cli", *args]


def run_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}
    return env


def run(cmd: list[str], timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=run_env(**extra_env), cwd=REPO)
