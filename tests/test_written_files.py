"""Files onnxprune writes get the permissions the umask gives any new file (not mkstemp's private 0600)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest

from onnxprune.atomic_write import atomic_write_text, current_umask, new_file_mode, save_model
from onnxprune.cli import main
from tests.test_fuzz_inputs import small_cnn


@pytest.fixture(params=[0o022, 0o002, 0o077], ids=lambda m: f"umask{m:03o}")
def umask(request) -> Iterator[int]:
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_umask_is_read_without_changing_it(umask):
    assert current_umask() == umask
    assert current_umask() == umask
    assert new_file_mode() == 0o666 & ~umask


def test_pruned_model_and_report_follow_the_umask(tmp_path, umask, capsys):
    src = tmp_path / "in.onnx"
    onnx.save(small_cnn(), src)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    assert main(["prune", str(src), "-o", str(out), "--target", "none", "--report", str(report), "-q"]) == 0
    assert mode(out) == 0o666 & ~umask
    assert mode(report) == 0o666 & ~umask


def test_external_data_written_beside_the_model_follows_the_umask(tmp_path, umask):
    out = tmp_path / "out.onnx"
    save_model(small_cnn(width=32), out, external_data=True)  # weights over save_model's 1 KiB threshold
    assert (tmp_path / "out.onnx.data").exists()
    assert mode(out) == mode(tmp_path / "out.onnx.data") == 0o666 & ~umask


def test_pruning_a_model_with_external_data_writes_both_files_with_the_umask(tmp_path, umask, capsys):
    src = tmp_path / "in.onnx"
    onnx.save_model(small_cnn(width=32), src, save_as_external_data=True, all_tensors_to_one_file=True, location="in.w", size_threshold=0)
    out = tmp_path / "out.onnx"
    assert main(["prune", str(src), "-o", str(out), "--target", "none", "-q"]) == 0
    assert mode(out) == mode(tmp_path / "out.onnx.data") == 0o666 & ~umask


def test_atomic_text_write_follows_the_umask_and_leaves_no_temporary_file(tmp_path, umask):
    path = tmp_path / "notes.txt"
    atomic_write_text(path, "hello\n")
    assert path.read_text() == "hello\n" and mode(path) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
