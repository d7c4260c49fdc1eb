"""The command's heap settings: set in a process of its own on glibc, not where the user tuned malloc."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _set_in_a_fresh_process(**env: str) -> str:
    code = "from onnxprune.heap import reuse_freed_memory; print(reuse_freed_memory())"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**environ, "PYTHONPATH": str(REPO), **env},
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):
        return False


@pytest.mark.skipif(not _glibc(), reason="glibc only")
def test_the_thresholds_are_set_on_glibc():
    assert _set_in_a_fresh_process() == "True"


def test_a_user_setting_in_the_environment_is_left_alone():
    assert _set_in_a_fresh_process(MALLOC_TOP_PAD_="131072") == "False"
    assert _set_in_a_fresh_process(GLIBC_TUNABLES="glibc.malloc.trim_threshold=1") == "False"
