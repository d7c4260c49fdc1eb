"""Per-channel constant values: how ops transform "this channel is the constant c".

Values are float64 arrays with one entry per channel; NaN means unknown (the
channel varies with the input). They are computed in float64 and compared
exactly against 0, so "zero" means zero in every float format.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from onnxprune.floatbits import reads_any

_erf = np.frompyfunc(math.erf, 1, 1)


def erf(v: np.ndarray) -> np.ndarray:
    """Elementwise erf where known (NaN stays NaN)."""
    out = np.full_like(v, np.nan)
    known = np.isfinite(v)
    out[known] = _erf(v[known]).astype(np.float64)
    return out


def _sigmoid(v: np.ndarray) -> np.ndarray:
    """Logistic function without overflow warnings."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-v))


def _softplus(v: np.ndarray) -> np.ndarray:
    """log(1 + exp(v)) without overflow warnings."""
    with np.errstate(over="ignore"):
        return np.logaddexp(0.0, v)


def _gelu(approximate: str) -> Callable[[np.ndarray], np.ndarray]:
    """GELU, exact (erf) or its tanh approximation."""
    if approximate == "tanh":
        return lambda v: 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))
    return lambda v: 0.5 * v * (1.0 + erf(v / math.sqrt(2.0)))


def unary_function(op: str, attrs: dict) -> Callable[[np.ndarray], np.ndarray] | None:
    """numpy version of an elementwise unary op (None if the op is not elementwise-unary)."""
    alpha = attrs.get("alpha")
    if op in ("Identity", "Dropout"):
        return lambda v: v
    if op == "Relu":
        return lambda v: np.where(np.isnan(v), np.nan, np.maximum(v, 0.0))
    if op == "LeakyRelu":
        a = 0.01 if alpha is None else float(alpha)
        return lambda v: np.where(v >= 0, v, a * v)
    if op == "Elu":
        a = 1.0 if alpha is None else float(alpha)
        return lambda v: np.where(v > 0, v, a * np.expm1(np.minimum(v, 0.0)))
    if op == "Celu":
        a = 1.0 if alpha is None else float(alpha)
        return lambda v: np.maximum(0.0, v) + np.minimum(0.0, a * np.expm1(v / a))
    if op == "Selu":
        a = 1.67326319217681884765625 if alpha is None else float(alpha)
        g = float(attrs.get("gamma", 1.05070102214813232421875))
        return lambda v: g * np.where(v > 0, v, a * np.expm1(np.minimum(v, 0.0)))
    if op == "Sigmoid":
        return _sigmoid
    if op == "HardSigmoid":
        a = 0.2 if alpha is None else float(alpha)
        b = float(attrs.get("beta", 0.5))
        return lambda v: np.clip(a * v + b, 0.0, 1.0)
    if op == "HardSwish":
        return lambda v: v * np.clip(v / 6.0 + 0.5, 0.0, 1.0)
    if op == "Tanh":
        return np.tanh
    if op == "Erf":
        return erf
    if op == "Gelu":
        return _gelu(str(attrs.get("approximate", "none")))
    if op == "Softplus":
        return _softplus
    if op == "Softsign":
        return lambda v: v / (1.0 + np.abs(v))
    if op == "Mish":
        return lambda v: v * np.tanh(_softplus(v))
    if op == "Neg":
        return np.negative
    if op == "Abs":
        return np.abs
    if op == "Exp":
        return np.exp
    if op in ("Floor", "Ceil"):
        return np.floor if op == "Floor" else np.ceil
    if op == "ThresholdedRelu":
        a = 1.0 if alpha is None else float(alpha)
        return lambda v: np.where(v > a, v, np.where(np.isnan(v), np.nan, 0.0))
    if op == "Shrink":
        bias, lambd = float(attrs.get("bias", 0.0)), float(attrs.get("lambd", 0.5))
        return lambda v: np.where(v < -lambd, v + bias, np.where(v > lambd, v - bias, np.where(np.isnan(v), np.nan, 0.0)))
    if op in ("IsNaN", "IsInf"):  # a known channel value is finite: the flag is 0 there
        return lambda v: np.where(np.isfinite(v), 0.0, np.nan)
    if op == "Not":
        return lambda v: np.where(np.isnan(v), np.nan, (v == 0).astype(np.float64))
    return None


UNARY_OPS = (
    "Identity", "Dropout", "Relu", "LeakyRelu", "Elu", "Celu", "Selu", "Sigmoid", "HardSigmoid",
    "HardSwish", "Tanh", "Erf", "Gelu", "Softplus", "Softsign", "Mish", "Neg", "Abs", "Exp",
    "Floor", "Ceil", "ThresholdedRelu", "Shrink", "IsNaN", "IsInf", "Not",
)  # fmt: skip


def channel_constant(arr: np.ndarray, local_axis: int | None, channels: int) -> np.ndarray:
    """Per-channel value of a constant operand broadcast against ``channels`` channels.

    ``local_axis`` is the operand's own axis aligned with the channel axis (None
    if the operand has fewer dimensions, i.e. broadcasts over channels). An
    entry is NaN where the operand is not uniform over the other axes.
    """
    a = np.asarray(arr, dtype=np.float64)
    if local_axis is None or a.ndim == 0 or a.shape[local_axis] == 1:
        flat = a.reshape(-1)
        uniform = flat.size > 0 and np.all(flat == flat[0])
        return np.full(channels, flat[0] if uniform else np.nan)
    per = np.moveaxis(a, local_axis, 0).reshape(a.shape[local_axis], -1)
    first = per[:, 0]
    uniform = np.all(per == first[:, None], axis=1)
    return np.where(uniform, first, np.nan)


def combine_same(values: list[np.ndarray]) -> np.ndarray:
    """Channels known in every operand with the same value keep it; others are unknown."""
    out = values[0].copy()
    for v in values[1:]:
        out = np.where(out == v, out, np.nan)
    return out


def multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Product where a known zero wins over an unknown factor (activations are finite)."""
    return np.where((a == 0) | (b == 0), 0.0, a * b)


def divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, known only where b is a known non-zero."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = a / b
    return np.where(np.isfinite(b) & (b != 0), q, np.nan)


def linear_values(
    inputs: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | float,
    *,
    allow_constant: bool,
) -> np.ndarray:
    """Values of y[o] = sum_j sum_k weight[o, j, k] * x[j] + bias[o].

    ``weight`` is viewed as (out, in, window). An output is known when every
    input it reads with a non-zero weight is known; with ``allow_constant``
    False (padded convolutions: a constant channel is not constant at the
    borders) those inputs must be zero.
    """
    out_ch, in_ch = weight.shape[0], weight.shape[1]
    w = weight.reshape(out_ch, in_ch, -1)
    known = np.isfinite(inputs)
    blocked = ~known if allow_constant else ~known | (inputs != 0)
    touched = reads_any(w, blocked)
    result = np.broadcast_to(np.asarray(bias, dtype=np.float64), (out_ch,)).copy()
    consts = np.flatnonzero(known & (inputs != 0))
    if consts.size:
        sums = w[:, consts, :].astype(np.float64).sum(axis=2)
        result += sums @ inputs[consts]
    result[touched] = np.nan
    return result
