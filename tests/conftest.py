"""Shared test fixtures and helpers (real models, real ONNX Runtime sessions)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ONNXPRUNE_DATA", ROOT.parent / "shared" / "data"))


def shared_file(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test with a clear reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found: {path} (set ONNXPRUNE_DATA or place ../shared/data beside the repo)")
    return path


@pytest.fixture
def shared():
    return shared_file
