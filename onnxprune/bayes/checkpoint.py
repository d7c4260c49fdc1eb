"""``fit``'s checkpoints: written atomically after every epoch, read back with ``weights_only=True``.

A checkpoint holds tensors and plain data only (the model's and the optimizer's state dicts, the
epoch, the history as lists and dicts of numbers, the RNG states), so it loads through PyTorch's
restricted unpickler: a file holding any other object is refused before anything in it runs.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onnxprune.errors import InputError

__all__ = ["save_training_state", "load_training_state"]

_KEYS = ("model", "optimizer", "epoch", "history", "rng")


def save_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                        history: list[dict[str, Any]], device: torch.device) -> None:
    """Write the state after ``epoch`` epochs to ``path`` (through a temporary file: never half written)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "history": history,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _refused_global(error: Exception) -> str | None:
    """The object (``module.name``) PyTorch's restricted unpickler refused to build, if that was the error."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return found.group(1) if found else None


def _read(path: Path, device: torch.device) -> dict[str, Any]:
    """The checkpoint's contents, loaded with ``weights_only=True``; an InputError names a file that is not one."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError) as e:
        refused = _refused_global(e)
        if refused is not None:  # nothing in the file was run
            raise InputError(f"{path}: refused to load this training checkpoint: it holds a {refused} object, not only "
                             f"tensors and plain data, and loading it could run code; delete it to train from the start") from None
        raise InputError(f"{path}: not a readable training checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or any(key not in state for key in _KEYS):
        raise InputError(f"{path}: not a training checkpoint written by fit (needs {', '.join(_KEYS)})")
    return state


def load_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        device: torch.device) -> tuple[int, list[dict[str, Any]]]:
    """Restore the model, optimizer and RNG states from ``path``; returns (epochs done, the history's rows)."""
    state = _read(path, device)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"].cpu())  # map_location moved the saved state to ``device``
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
    return int(state["epoch"]), list(state["history"])
