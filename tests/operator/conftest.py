"""Fixtures for the operator tests."""

from __future__ import annotations

import pytest

SAMPLE_KEYS = ("freeze-backbone-1gpu", "2x4gpu", "cpu-smoke")


@pytest.fixture(params=SAMPLE_KEYS)
def sample_key(request) -> str:
    """Each sample of crds/samples, by short name."""
    return request.param
