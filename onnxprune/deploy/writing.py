"""deploy's output folder: checked before any work, staged beside it, moved into place only at the end.

The staging folder holds ``out/`` (what will be the output folder's files) and ``scratch/``. When the
output folder does not exist, ``out/`` is renamed to it in one step; otherwise each file replaces its
namesake there. A failure anywhere leaves the output folder as it was (not created, if it was not).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from onnxprune.atomic_write import current_umask, new_file_mode
from onnxprune.errors import InputError
from onnxprune.modelio import LoadedModel, same_file

logger = logging.getLogger(__name__)

#: Every file deploy may write; an earlier deploy's files that this one does not rewrite are pointed out.
DEPLOY_FILES = ("model.onnx", "model.onnx.data", "model.ort", "required_operators.config", "model.xml", "model.bin",
                "deploy.json")


@dataclass(frozen=True)
class Stage:
    """A staging folder beside the output folder: ``out`` becomes the output, ``scratch`` is thrown away."""

    out: Path
    scratch: Path


def check_out_dir(out_dir: Path, loaded: LoadedModel, report: Path | None = None) -> None:
    """InputError if ``out_dir`` cannot hold deploy's files without touching the input."""
    protected = ([loaded.path] if loaded.path else []) + list(loaded.external_data_files)
    for p in protected:
        if same_file(out_dir, p):
            raise InputError(f"{out_dir}: the output folder is the input model; choose another folder")
        for name in DEPLOY_FILES:
            if same_file(out_dir / name, p):
                raise InputError(f"{out_dir / name} would overwrite the input {p}; choose another folder")
        if report is not None and same_file(report, p):
            raise InputError(f"{report}: the report would overwrite the input {p}; choose another path")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder; give a folder for the output")
    for path in [out_dir] + ([report] if report is not None else []):
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise InputError(f"{path}: folder {parent} does not exist")


@contextlib.contextmanager
def staging(out_dir: Path) -> Iterator[Stage]:
    """A staging folder beside ``out_dir``, removed on the way out whatever happens."""
    parent = out_dir.parent if str(out_dir.parent) else Path(".")
    try:
        root = Path(tempfile.mkdtemp(prefix=".onnxprune-deploy-", dir=parent))
    except OSError as e:
        raise InputError(f"{out_dir}: cannot write in {parent}: {e.strerror or e}") from None
    try:
        stage = Stage(root / "out", root / "scratch")
        stage.out.mkdir()
        stage.scratch.mkdir()
        yield stage
    finally:
        shutil.rmtree(root, ignore_errors=True)


def publish(stage: Stage, out_dir: Path) -> list[Path]:
    """Move the staged files into ``out_dir`` (renaming the staged folder to it, if it does not exist yet)."""
    names = sorted(os.listdir(stage.out))
    for name in names:
        os.chmod(stage.out / name, new_file_mode())
    if not out_dir.exists():
        os.chmod(stage.out, 0o777 & ~current_umask())
        try:
            os.rename(stage.out, out_dir)
            return [out_dir / name for name in names]
        except OSError:  # created meanwhile: move file by file below
            pass
    stale = [name for name in DEPLOY_FILES if name not in names and (out_dir / name).exists()]
    if stale:
        logger.warning("%s still holds %s from an earlier deploy; deploy.json lists this one's files", out_dir,
                       ", ".join(stale))
    for name in names:
        os.replace(stage.out / name, out_dir / name)
    return [out_dir / name for name in names]
