"""Block-wise verification: a pruned model checked against its input one block at a time.

Both models are cut at their common cuts (:mod:`onnxprune.cuts`: tensors every path from the inputs to the
outputs crosses, with the same name, element type and shape in both), and consecutive segments are grouped
into blocks whose weights fit a budget. Block after block, the input model's block and the pruned model's
block run on ONNX Runtime (CPU) on the same activations: the input model's, from random inputs, carried from
one block to the next. Compared, with :mod:`onnxprune.verify`'s relative tolerance per dtype: the tensors
each block hands on (its end cut, and the cuts inside it), the graph outputs it computes, and each residual
branch (``stream + branch`` at a cut: the branch relative to its own largest magnitude, which is what a
deleted live unit changes; in float16 the stream's rounding would hide a small branch's error).

Only one block's weights are in memory at a time: a block is given to ONNX Runtime as serialised bytes whose
initializers still point at the model's external data file, with the session option that names the folder
to read it from (nothing is written anywhere; ONNX Runtime maps the file as it does for the whole model).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxprune.cuts import Block, GraphIndex, block_model, block_nodes, plan_blocks, residual_branches
from onnxprune.errors import InputError, VerificationError, first_line
from onnxprune.progress import PhaseCallback, counter, phase
from onnxprune.runtime import lean_session_options, make_session, max_loadable_ir, ort_load_problem
from onnxprune.verify import RELATIVE_TOLERANCE, VerifyResult, relative_error

log = logging.getLogger(__name__)

DEFAULT_BLOCK_BYTES = 512 * 2**20  # weights one block may read (larger segments are blocks of their own)
MIN_BLOCK_BYTES = 32 * 2**20  # the smallest budget block_budget gives
EXTERNAL_FOLDER_OPTION = "session.model_external_initializers_file_folder_path"

ProgressCallback = Callable[[int, int], None]


@dataclass
class _Side:
    """One of the two models: its structure, where its external data is, the IR version ONNX Runtime loads."""

    index: GraphIndex
    folder: str | None
    ir_version: int

    @classmethod
    def open(cls, source: onnx.ModelProto | str | os.PathLike[str]) -> _Side:
        if isinstance(source, onnx.ModelProto):
            model, folder = source, None
        else:
            model = onnx.load(os.fspath(source), load_external_data=False)
            folder = str(Path(source).resolve().parent)
        ir = model.ir_version
        if ort_load_problem(model) is not None:
            ir = max_loadable_ir(model) or ir
        return cls(GraphIndex.of(model), folder, ir)

    def run(self, model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """``model`` (a block of this side) on each feed; outputs by name."""
        options = lean_session_options()
        if self.folder is not None:
            options.add_session_config_entry(EXTERNAL_FOLDER_OPTION, self.folder)
        session = make_session(model.SerializeToString(), options=options)
        names = [o.name for o in session.get_outputs()]
        wanted = {i.name for i in session.get_inputs()}
        return [dict(zip(names, session.run(names, {k: v for k, v in feed.items() if k in wanted}))) for feed in feeds]


def random_feeds(index: GraphIndex, trials: int, symbolic_dim: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Random inputs for the graph inputs (as :func:`onnxprune.runtime.random_feed` makes them for a session)."""
    from onnxprune.runtime import random_feed

    specs = []
    declared = {i.name: i for i in index.model.graph.input}
    for name in index.graph_inputs:
        tt = declared[name].type.tensor_type
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"input '{name}' has a type onnxprune cannot fabricate") from None
        shape = tuple(d.dim_value if d.HasField("dim_value") else symbolic_dim for d in tt.shape.dim)
        specs.append((name, shape, dtype))
    rng = np.random.default_rng(seed)
    return [random_feed(specs, rng) for _ in range(trials)]


@dataclass
class _Outputs:
    """What one block computes, in each model: names to ask each for, and which of them to compare."""

    ref: list[str]
    cand: list[str]
    compared: list[str]


def _block_outputs(ref: _Side, cand: _Side, block: Block, ref_pos: list[int], cand_pos: list[int]) -> _Outputs:
    """The end cut and the cuts inside the block, its residual branches, and graph outputs it computes."""
    cuts = set(block.ref[1].names).union(*block.inner)
    made_r = {o for i in ref_pos for o in ref.index.nodes[i].output}
    made_c = {o for i in cand_pos for o in cand.index.nodes[i].output}
    branches = residual_branches(ref.index, cand.index, block, set(ref_pos))
    last = block.ref[1].position == len(ref.index.nodes)
    outs_r = sorted((cuts & made_r) | set(branches) | _graph_outputs(ref.index, made_r, last))
    outs_c = sorted(((cuts | set(branches)) & made_c) | _graph_outputs(cand.index, made_c, last))
    graph_outputs = set(ref.index.outputs)
    return _Outputs(outs_r, outs_c, [n for n in outs_r if n in outs_c and n not in graph_outputs])


def _graph_outputs(index: GraphIndex, made: set[str], last: bool) -> set[str]:
    """Graph outputs the block computes (the last block: also those computed from constants alone)."""
    return {o for o in index.outputs if (o in made and o not in index.constant) or (last and o in index.constant)}


def _positions(side: _Side, cuts) -> list[int]:
    return block_nodes(side.index, *cuts)


@dataclass
class _Comparison:
    """The running result: errors per compared tensor, the block of each, graph outputs not yet paired."""

    result: VerifyResult
    pending_ref: dict[str, list[np.ndarray]]
    pending_cand: dict[str, list[np.ndarray]]

    def add(self, name: str, ref: list[np.ndarray], got: list[np.ndarray], label: str, floor: float) -> None:
        """Record a tensor's error; its tolerance is its dtype's, or ``floor`` (the block's reads') if larger."""
        err = max(relative_error(r, g) for r, g in zip(ref, got))
        self.result.max_relative_error[name] = max(err, self.result.max_relative_error.get(name, 0.0))
        self.result.tolerance[name] = max(RELATIVE_TOLERANCE.get(ref[0].dtype, 0.0), floor)
        self.result.block_of[name] = label

    def graph_outputs(self, ref_out: list[dict], cand_out: list[dict], names: set[str], label: str,
                      floor: float) -> None:
        """Pair each graph output when both models have computed it (possibly in different blocks)."""
        for side, outs in ((self.pending_ref, ref_out), (self.pending_cand, cand_out)):
            for name in names & set(outs[0]):
                side[name] = [o[name] for o in outs]
        for name in sorted(set(self.pending_ref) & set(self.pending_cand)):
            self.add(name, self.pending_ref.pop(name), self.pending_cand.pop(name), label, floor)


def precision_floor(block: onnx.ModelProto) -> float:
    """The tolerance of the least precise float type a block reads (the tensors fed to it, its weights): a
    float32 tensor computed from float16 activations or weights carries float16's rounding."""
    floor = 0.0
    types = [i.type.tensor_type.elem_type for i in block.graph.input] + [t.data_type for t in block.graph.initializer]
    for elem in set(types):
        try:
            floor = max(floor, RELATIVE_TOLERANCE.get(np.dtype(helper.tensor_dtype_to_np_dtype(elem)), 0.0))
        except (KeyError, TypeError, ValueError):
            continue
    return floor


def _run_block(ref: _Side, cand: _Side, block: Block, total: int, acts: list[dict], feeds: list[dict],
               comparison: _Comparison) -> list[dict]:
    """Run one block of each model on the reference's activations; record the errors; the next activations."""
    ref_pos, cand_pos = _positions(ref, block.ref), _positions(cand, block.cand)
    outs = _block_outputs(ref, cand, block, ref_pos, cand_pos)
    fed = [{**feed, **act} for feed, act in zip(feeds, acts)]
    dtypes = {k: v.dtype for k, v in fed[0].items()}
    ref_model = block_model(ref.index, ref_pos, dtypes, outs.ref, ref.ir_version)
    floor = precision_floor(ref_model)
    try:
        ref_out = ref.run(ref_model, fed)
    except Exception as e:  # onnxruntime cannot load or run the input model's block
        raise InputError(f"onnxruntime cannot run the input model (block {block.label}): {first_line(e)[:300]}") from None
    del ref_model
    try:
        cand_out = cand.run(block_model(cand.index, cand_pos, dtypes, outs.cand, cand.ir_version), fed)
    except Exception as e:  # onnxruntime refuses the result's block on the input model's activations
        raise VerificationError(f"verification failed: block {block.number}/{total} ({block.label}) of the result "
                                f"cannot run on the input model's activations ({first_line(e)[:300]}); nothing was "
                                "written") from None
    label = f"{block.number}/{total} ({block.label})"
    for name in outs.compared:
        comparison.add(name, [o[name] for o in ref_out], [o[name] for o in cand_out], label, floor)
    comparison.graph_outputs(ref_out, cand_out, set(ref.index.outputs) | set(cand.index.outputs), label, floor)
    end = block.ref[1].names
    return [{n: (out[n] if n in out else act[n]) for n in end} for out, act in zip(ref_out, acts)]


def compare_blockwise(
    reference: onnx.ModelProto | str | os.PathLike[str],
    candidate: onnx.ModelProto | str | os.PathLike[str],
    *,
    budget: int = DEFAULT_BLOCK_BYTES,
    trials: int = 2,
    symbolic_dim: int = 2,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> VerifyResult:
    """Run both models block by block on the same activations; the largest relative error per compared tensor.

    ``reference`` and ``candidate`` are paths (their external data is read where it is, never copied) or
    in-memory models. ``progress(done, total)`` is called as blocks are checked."""
    ref, cand = _Side.open(reference), _Side.open(candidate)
    blocks = plan_blocks(ref.index, cand.index, budget)
    feeds = random_feeds(ref.index, trials, symbolic_dim, seed)
    result = VerifyResult(trials=trials, method="blocks", blocks=len(blocks))
    comparison = _Comparison(result, {}, {})
    acts: list[dict] = [{} for _ in feeds]
    for block in blocks:
        acts = _run_block(ref, cand, block, len(blocks), acts, feeds, comparison)
        result.per_block.append({"block": block.number, "cuts": block.label, "weight_bytes": block.weight_bytes})
        log.debug("block %d/%d (%s) checked", block.number, len(blocks), block.label)
        if progress is not None:
            progress(block.number, len(blocks))
    missing = sorted(set(comparison.pending_ref) | set(comparison.pending_cand))
    if missing:
        raise VerificationError(f"outputs differ: {missing} computed by only one of the input model and the result")
    return result


# -- which check: the whole model, or block by block ----------------------------------------------------------

METHODS = ("auto", "whole", "blocks")
AUTO_BLOCKS_BYTES = 2**28  # auto checks models with this many bytes of weights or more block by block
WHOLE_CHECK_FACTOR = 2.5  # the whole-model check's peak memory, in multiples of the model, with a margin (measured 1.2-1.9)


def verify_method(verify: bool | str | None) -> str | None:
    """``verify`` as a method name: True is "auto", False or None no check; "auto", "whole" or "blocks"."""
    from onnxprune.errors import OnnxPruneError

    if verify is True:
        return "auto"
    if verify is False or verify is None:
        return None
    if verify not in METHODS:
        raise OnnxPruneError(f"unknown verification method '{verify}'; known: {', '.join(METHODS)}")
    return verify


def available_memory() -> int | None:
    """Bytes of memory the system could give this process now (Linux: MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def choose_method(method: str, weight_bytes: int) -> tuple[str, str]:
    """("whole" or "blocks", why): "auto" checks block by block when the weights reach
    :data:`AUTO_BLOCKS_BYTES` or the whole-model check would not fit in the memory available."""
    if method != "auto":
        return method, f"asked for ({method})"
    size = f"{weight_bytes / 1e6:.0f} MB of weights"
    if weight_bytes >= AUTO_BLOCKS_BYTES:
        return "blocks", f"auto: {size}, {AUTO_BLOCKS_BYTES / 2**20:.0f} MiB or more"
    free = available_memory()
    if free is not None and WHOLE_CHECK_FACTOR * weight_bytes > free:
        return "blocks", (f"auto: the whole-model check needs about {WHOLE_CHECK_FACTOR} x {size}, more than the "
                          f"{free / 1e6:.0f} MB available")
    return "whole", f"auto: {size}, under {AUTO_BLOCKS_BYTES / 2**20:.0f} MiB"


def block_budget(weight_bytes: int) -> int:
    """The block budget for a model of ``weight_bytes``: an eighth of its weights, within [32 MiB, 512 MiB], so
    the check's peak memory stays a small fraction above the prune's at every size."""
    return min(DEFAULT_BLOCK_BYTES, max(MIN_BLOCK_BYTES, weight_bytes // 8))


def verify_model(
    reference: onnx.ModelProto | str | os.PathLike[str],
    candidate: onnx.ModelProto | str | os.PathLike[str],
    method: str,
    *,
    weight_bytes: int,
    budget: int | None = None,
    on_phase: PhaseCallback | None = None,
) -> VerifyResult:
    """Check ``candidate`` against ``reference`` on ONNX Runtime by ``method`` ("auto", "whole", "blocks"; see
    :func:`choose_method`; blocks of ``budget`` bytes of weights, by default :func:`block_budget`);
    VerificationError on a mismatch. The result says which method was used and why.
    ``on_phase``: the phase "verify, block by block" (blocks checked) or "verify, whole model"."""
    from onnxprune.verify import compare_models, raise_if_failed

    chosen, reason = choose_method(method, weight_bytes)
    log.debug("verification: %s (%s)", chosen, reason)
    if chosen == "blocks":
        size = budget if budget is not None else block_budget(weight_bytes)
        result = compare_blockwise(reference, candidate, budget=size, progress=counter(on_phase, "verify, block by block"))
    else:
        with phase(on_phase, "verify, whole model"):
            result = compare_models(reference, candidate)
    result.reason = reason
    return raise_if_failed(result)
