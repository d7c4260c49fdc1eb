"""The graph passes onnxprune can run, by name (``onnxprune passes`` lists them)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from onnxprune.errors import PassError
from onnxprune.pass_infra import GraphPass
from passes.flush_subnormals import FlushSubnormalsPass
from passes.fold_batchnorm import FoldBatchNormPass
from passes.fold_bias_add import FoldBiasAddPass
from passes.fold_constants import FoldConstantsPass
from passes.fold_input_scale import FoldChannelScalePass, FoldInputScalePass
from passes.gather_rows import GatherRowsPass
from passes.int8_movement import Int8MovementPass
from passes.pool_phases import PoolPhasesPass
from passes.prune_channels import PruneChannelsPass
from passes.remove_identity import RemoveIdentityPass
from passes.structure import CleanupPass, InferShapesPass, ToposortPass

logging.getLogger("passes").addHandler(logging.NullHandler())

PASSES: dict[str, type[GraphPass]] = {
    p.name: p
    for p in (
        ToposortPass,
        InferShapesPass,
        CleanupPass,
        FoldConstantsPass,
        RemoveIdentityPass,
        FoldBatchNormPass,
        FoldBiasAddPass,
        FoldInputScalePass,
        FoldChannelScalePass,
        FlushSubnormalsPass,
        PruneChannelsPass,
        GatherRowsPass,
        PoolPhasesPass,
        Int8MovementPass,
    )
}

# The pass that establishes each manager-tracked or checkable property.
PROVIDERS: dict[str, Callable[[], GraphPass]] = {
    "toposorted": ToposortPass,
    "shapes": InferShapesPass,
    "constants-folded": FoldConstantsPass,
    "clean": CleanupPass,
}


def preparation() -> list[GraphPass]:
    """The passes run before channel analysis: constants folded, subnormal weights zeroed,
    input scales folded into weights (so zero scales read as dead features), shapes inferred."""
    return [FoldConstantsPass(), FlushSubnormalsPass(), InferShapesPass(), FoldInputScalePass(), InferShapesPass()]


def finishing() -> list[GraphPass]:
    """The passes run after the pruning rewrite: per-channel scales left in the graph folded into weights."""
    return [FoldChannelScalePass()]


def make_passes(names: list[str]) -> list[GraphPass]:
    """Instantiate passes by name; an unknown name is a PassError listing the known ones."""
    out = []
    for name in names:
        if name not in PASSES:
            raise PassError(f"unknown pass '{name}'; known passes: {', '.join(PASSES)}")
        out.append(PASSES[name]())
    return out


__all__ = ["PASSES", "PROVIDERS", "finishing", "make_passes", "preparation"]
