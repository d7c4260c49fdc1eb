"""Check on ONNX Runtime that a rewritten model computes what the input model computes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxprune.errors import InputError, VerificationError, first_line
from onnxprune.runtime import ModelSource, input_specs, lean_session_options, make_session, random_feed

# Relative tolerance (of the output's largest magnitude) per output dtype. Deleting
# zero channels changes only the order of float additions; anything wrong is O(1).
RELATIVE_TOLERANCE = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 1e-4, np.dtype(np.float16): 1e-2}


@dataclass
class VerifyResult:
    """How far the candidate's outputs are from the reference's, per output (``method`` "whole"), or per
    tensor each block hands on (``method`` "blocks": :mod:`onnxprune.verify_blocks`)."""

    trials: int
    max_relative_error: dict[str, float] = field(default_factory=dict)
    tolerance: dict[str, float] = field(default_factory=dict)
    method: str = "whole"
    blocks: int = 1
    block_of: dict[str, str] = field(default_factory=dict)  # compared tensor -> "i/n (cut -> cut)" (blocks)
    per_block: list[dict] = field(default_factory=list)
    reason: str = ""  # why this method was used (auto)

    @property
    def ok(self) -> bool:
        return all(self.max_relative_error[k] <= self.tolerance[k] for k in self.max_relative_error)

    def worst(self) -> tuple[str, float]:
        """The compared tensor nearest its tolerance (or furthest over it), and its error."""
        def ratio(k: str) -> float:
            tol = self.tolerance[k]
            return self.max_relative_error[k] / tol if tol else (0.0 if self.max_relative_error[k] == 0 else float("inf"))

        name = max(self.max_relative_error, key=ratio)
        return name, self.max_relative_error[name]

    def to_dict(self) -> dict:
        """JSON-ready: the method, its result, and (block-wise) the worst block and every block's cuts."""
        out: dict = {"method": self.method, "ok": self.ok, "trials": self.trials,
                     "max_relative_error": self.max_relative_error, "tolerance": self.tolerance}
        if self.reason:
            out["reason"] = self.reason
        if self.max_relative_error:
            name, err = self.worst()
            out["worst"] = {"tensor": name, "relative_error": err, "tolerance": self.tolerance[name]}
        if self.method == "blocks":
            out["blocks"] = self.blocks
            if self.max_relative_error:
                out["worst"]["block"] = self.block_of.get(name)
            out["per_block"] = self.per_block
        return out


def run_on_random_inputs(
    model: ModelSource,
    feeds: list[dict[str, np.ndarray]] | None = None,
    *,
    symbolic_dim: int = 2,
    seed: int = 0,
    trials: int = 1,
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """(feeds, outputs by name) of ``model`` run on ``feeds``, or on ``trials`` random feeds made from its inputs."""
    session = make_session(model, options=lean_session_options())
    if feeds is None:
        rng = np.random.default_rng(seed)
        specs = input_specs(session, symbolic_dim)
        feeds = [random_feed(specs, rng) for _ in range(trials)]
    names = [o.name for o in session.get_outputs()]
    outputs = [dict(zip(names, session.run(names, feed))) for feed in feeds]
    del session  # freed here (no cycles hold it), before the caller builds the next one
    return feeds, outputs


def relative_error(ref: np.ndarray, got: np.ndarray) -> float:
    """max |ref - got| over max |ref| (finite values; infinities and NaNs must match; other dtypes: equal or inf)."""
    if ref.shape != got.shape:
        return float("inf")
    if ref.dtype.kind not in "fc":
        return 0.0 if np.array_equal(ref, got) else float("inf")
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    finite = np.isfinite(ref64)
    if not np.array_equal(finite, np.isfinite(got64)) or not np.array_equal(ref64[~finite], got64[~finite]):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = max(float(np.max(np.abs(ref64[finite]))), 1e-30)
    return float(np.max(np.abs(ref64[finite] - got64[finite]))) / scale


def compare_models(
    reference: ModelSource,
    candidate: ModelSource,
    *,
    trials: int = 2,
    symbolic_dim: int = 2,
    seed: int = 0,
    feeds: list[dict[str, np.ndarray]] | None = None,
) -> VerifyResult:
    """Run both models on the same random inputs; report the largest relative error per output.

    Inputs follow the reference's declared shapes and types, with symbolic
    dimensions set to ``symbolic_dim``. The sessions are created one after the
    other so that only one model's weights are held by the runtime at a time.
    """
    try:
        feeds, ref_out = run_on_random_inputs(reference, feeds, symbolic_dim=symbolic_dim, seed=seed, trials=trials)
    except InputError:
        raise
    except Exception as e:  # onnxruntime cannot load or run the input model itself
        raise InputError(f"onnxruntime cannot run the input model: {first_line(e)[:300]}") from None
    _, got_out = run_on_random_inputs(candidate, feeds, symbolic_dim=symbolic_dim, seed=seed, trials=trials)
    result = VerifyResult(trials=len(feeds))
    for ref, got in zip(ref_out, got_out):
        if set(ref) != set(got):
            raise VerificationError(f"outputs differ: input model has {sorted(ref)}, result has {sorted(got)}")
        for name, value in ref.items():
            err = relative_error(value, got[name])
            result.max_relative_error[name] = max(err, result.max_relative_error.get(name, 0.0))
            result.tolerance[name] = RELATIVE_TOLERANCE.get(value.dtype, 0.0)
    return result


def verify_same_function(reference: ModelSource, candidate: ModelSource, **kwargs) -> VerifyResult:
    """Like :func:`compare_models`, but raise VerificationError on a mismatch."""
    return raise_if_failed(compare_models(reference, candidate, **kwargs))


def raise_if_failed(result: VerifyResult) -> VerifyResult:
    """``result``, or VerificationError naming the worst output (block-wise: the tensor and its block)."""
    if result.ok:
        return result
    name, err = result.worst()
    where = f"output '{name}'"
    if result.method == "blocks":
        where = f"block {result.block_of.get(name, '?')}: tensor '{name}'"
    raise VerificationError(
        f"verification failed: {where} differs from the input model by {err:.3g} "
        f"(relative; tolerance {result.tolerance[name]:.0e}); nothing was written"
    )
