"""Where deploy's inputs come from: a dataset by name, an .npz the user gives, or random inputs.

A source gives calibration samples (int8 only) and held-out samples for the agreement check, as
arrays keyed by the model's input names, never overlapping. A dataset calibrates on its training
split and is checked on its test split; an .npz is shuffled once (seed 0), one fifth is held out
for the check and the rest calibrates. Without data the check runs on random inputs, uniform in
[0, 1), and says so.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxprune.errors import InputError

NPZ_INPUT_KEYS = ("x", "inputs")
NPZ_LABEL_KEYS = ("y", "labels")
HELD_OUT_FRACTION = 0.2
SHUFFLE_SEED = 0
RANDOM_CHECK_SAMPLES = 512
ELEM_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
               onnx.TensorProto.FLOAT16: np.float16}


@dataclass(frozen=True)
class ModelInput:
    """One graph input: its name, dimensions (an int where fixed, None where not) and numpy dtype."""

    name: str
    dims: tuple[int | None, ...]
    dtype: np.dtype

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model is fixed at, or None when the first dimension is free."""
        return self.dims[0] if self.dims else None

    def shape_text(self) -> str:
        return "(" + ", ".join("?" if d is None else str(d) for d in self.dims) + ")"


def model_inputs(model: onnx.ModelProto) -> list[ModelInput]:
    """The inputs a caller feeds (graph inputs that are not initializers)."""
    initializers = {t.name for t in model.graph.initializer}
    found = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim)
        found.append(ModelInput(value.name, dims, np.dtype(ELEM_DTYPES.get(tensor.elem_type, np.float32))))
    return found


@dataclass
class Samples:
    """Calibration and held-out inputs (input name -> array, samples on the first axis), and what they are."""

    kind: str  # "dataset", "npz" or "random"
    source: str
    held_out: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    calibration: dict[str, np.ndarray] = field(default_factory=dict)
    fixed_batch: int | None = None  # the batch size the model's input is fixed at, if it is

    @property
    def held_out_count(self) -> int:
        return len(next(iter(self.held_out.values())))

    @property
    def calibration_count(self) -> int:
        return len(next(iter(self.calibration.values()))) if self.calibration else 0

    def describe(self) -> dict:
        """The report's account of the data."""
        note = {"random": "no data given: the check ran on random inputs, uniform in [0, 1), without labels",
                "dataset": "calibration: the training split; check: the test split",
                "npz": f"shuffled once (seed {SHUFFLE_SEED}); {HELD_OUT_FRACTION:.0%} held out for the check, "
                       "the rest calibrates"}[self.kind]
        return {"kind": self.kind, "source": self.source, "calibration_samples": self.calibration_count,
                "check_samples": self.held_out_count, "labels": self.labels is not None, "note": note}


def load_samples(spec: str | os.PathLike[str] | None, model: onnx.ModelProto, *, data_dir: str | os.PathLike[str] | None,
                 calibration_samples: int, check_samples: int | None) -> Samples:
    """The samples ``spec`` names (a dataset name, an .npz path, or None for random inputs), fitted to ``model``."""
    inputs = model_inputs(model)
    if spec is None:
        return _random_samples(inputs, check_samples or RANDOM_CHECK_SAMPLES)
    if len(inputs) != 1:
        raise InputError(f"deploy reads data for models with one input; this model has {len(inputs)} "
                         f"({', '.join(i.name for i in inputs)})")
    if str(spec).lower().endswith(".npz") or Path(spec).is_file():
        x_cal, x_out, y_out = _npz_split(Path(spec))
        kind = "npz"
    else:
        x_cal, x_out, y_out = _dataset_split(str(spec), data_dir, calibrate=calibration_samples > 0)
        kind = "dataset"
    only = inputs[0]
    x_cal, x_out = (_fitted(x, only, str(spec)) for x in (x_cal, x_out))
    x_cal = x_cal[:calibration_samples]
    if check_samples is not None:
        x_out = x_out[:check_samples]
        y_out = None if y_out is None else y_out[:check_samples]
    return Samples(kind, str(spec), {only.name: x_out}, y_out, {only.name: x_cal}, only.fixed_batch)


def _random_samples(inputs: list[ModelInput], count: int) -> Samples:
    """``count`` uniform [0, 1) samples per input (a fixed batch size rounds ``count`` down to a multiple of it)."""
    rng = np.random.default_rng(SHUFFLE_SEED)
    held_out = {}
    for value in inputs:
        shape = tuple(1 if d is None else d for d in value.dims[1:])
        held_out[value.name] = rng.random((count, *shape)).astype(value.dtype)
    return Samples("random", "random", held_out, fixed_batch=inputs[0].fixed_batch if inputs else None)


def _dataset_split(name: str, data_dir, *, calibrate: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(calibration images, held-out images, held-out labels) of a named dataset: train split (shuffled once,
    read only to ``calibrate``), test split."""
    from onnxprune.data import DATASETS, load_dataset

    if name.strip().lower().replace("_", "-") not in DATASETS:
        raise InputError(f"unknown calibration data {name!r}: neither an .npz file nor a dataset "
                         f"({', '.join(DATASETS)})")
    x_test, y_test = load_dataset(name, data_dir, "test")
    if not calibrate:
        return x_test[:0], x_test, y_test
    x_train, _ = load_dataset(name, data_dir, "train")
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(x_train))
    return x_train[order], x_test, y_test


def _npz_split(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(calibration inputs, held-out inputs, held-out labels or None) of an .npz, shuffled once."""
    x, y = read_npz(path)
    if len(x) < 2:
        raise InputError(f"{path}: {len(x)} sample(s); deploy needs at least 2 (some calibrate, some are held out)")
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(x))
    held = max(1, int(round(len(x) * HELD_OUT_FRACTION)))
    out, cal = order[:held], order[held:]
    return x[cal], x[out], None if y is None else y[out]


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The inputs (key ``x`` or ``inputs``) and labels (``y`` or ``labels``, optional) of an .npz file."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path} is not a readable .npz file: {e}") from None
    x = next((arrays[k] for k in NPZ_INPUT_KEYS if k in arrays), None)
    if x is None:
        raise InputError(f"{path} holds {', '.join(arrays) or 'nothing'}: expected inputs under 'x' or 'inputs'")
    y = next((arrays[k] for k in NPZ_LABEL_KEYS if k in arrays), None)
    if y is not None and (y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "iu"):
        raise InputError(f"{path}: labels must be one integer per sample ({len(x)}); got shape {y.shape}, {y.dtype}")
    return x, y


def _fitted(x: np.ndarray, model_input: ModelInput, source: str) -> np.ndarray:
    """``x`` as the model's input dtype; InputError when a sample's shape does not fit the input."""
    sample = tuple(x.shape[1:])
    wanted = model_input.dims[1:]
    if x.ndim == 0 or len(sample) != len(wanted) or any(d is not None and d != s for d, s in zip(wanted, sample)):
        raise InputError(f"{source}: samples of shape {sample} do not fit the model's input '{model_input.name}' "
                         f"of shape {model_input.shape_text()}")
    if x.dtype.kind not in "fiub":
        raise InputError(f"{source}: inputs of type {x.dtype} cannot feed the model's input '{model_input.name}'")
    return np.ascontiguousarray(x, dtype=model_input.dtype)
