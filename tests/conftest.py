"""Shared test fixtures and helpers (real models, real ONNX Runtime sessions)."""

from __future__ import annotations

import os
from pathlib import Path

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


@pytest.fixture(autouse=True, scope="session")
def _latency_cache(tmp_path_factory):
    """Latency measurements go to a temporary cache, never the user's."""
    old = os.environ.get("ONNXPRUNE_CACHE_DIR")
    os.environ["ONNXPRUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("latency-cache"))
    yield
    if old is None:
        os.environ.pop("ONNXPRUNE_CACHE_DIR", None)
    else:
        os.environ["ONNXPRUNE_CACHE_DIR"] = old


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test: on a shared, busy CPU, threads wait on each other (tiny nets run
    several times slower with two)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
