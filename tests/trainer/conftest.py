"""Shared fixtures for trainer tests: small synthetic datasets made on the fly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small deterministic shapes dataset (3 classes) shared by the trainer tests."""
    from finetune.data.synth import make_synthetic_dataset

    out = tmp_path_factory.mktemp("tiny-data")
    return make_synthetic_dataset(out, classes=["circle", "square", "triangle"], n_train=24, n_val=8, imgsz=128, seed=3)



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process tests run tiny convolutions: one thread avoids oversubscribing the 2-core
    machine (tests that start `finetune` processes set OMP_NUM_THREADS themselves)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
