"""The interface every channel gate implements: :class:`ChannelGate`.

A gate holds a posterior over the ``num_channels`` channels of one channel group.
``wrap`` builds one per group (from the class :mod:`onnxprune.bayes.methods` registers
under the method's name), :class:`~onnxprune.bayes.wrapper.GateBank` samples it and sums
its KL, ``fit`` calls its training hooks, and the export folds ``deterministic()`` into the
weights. A gate of one's own subclasses :class:`ChannelGate`, implements the four required
members and overrides only the hooks it needs: every hook has a no-op default.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["ChannelGate", "TrainingPlan", "ReachShortfall", "Producer"]


class Producer(NamedTuple):
    """A layer writing a gate's channels, as :meth:`ChannelGate.attach` may receive it: ``weight`` (the live
    parameter), its output channels ``rows`` in the gate, their ``positions`` in the gate, the BatchNorm after it
    (``norm``, or None) and the weight's axis of output channels (``channel_axis``: 0, or 1 for a weight stored
    [in, out], transformers' Conv1D). Plain ``(weight, rows, positions)`` tuples mean ``channel_axis=0``."""

    weight: Tensor
    rows: Any
    positions: Any
    norm: nn.Module | None = None
    channel_axis: int = 0


@dataclass(frozen=True)
class TrainingPlan:
    """What ``fit`` tells a gate about the training ahead (for :meth:`ChannelGate.reach_shortfall`)."""

    epochs: int
    steps_per_epoch: int
    gate_lr: float
    lr_factor: Callable[[int, int], float]  # the learning rate's multiplier at (epoch, step)


@dataclass(frozen=True)
class ReachShortfall:
    """A gate's training is too short to reject any channel: the numbers ``fit``'s warning quotes.

    ``needed_gate_lr``: the gate learning rate that would reach the threshold in ``steps``;
    ``reach``: how far the parameter deciding rejection can move at the planned rate;
    ``start`` and ``threshold``: where that parameter starts, and where a channel is rejected.
    """

    needed_gate_lr: float
    steps: int
    reach: float
    start: float
    threshold: float
    label: str = "RBP"


class ChannelGate(nn.Module):
    """Base class of the per-channel gates (SBP, RBP, Turbo-VBI, or one's own).

    Required (a subclass must implement them):

    * ``num_channels`` (int attribute): the channels the gate covers;
    * ``kl()``: the gate's complexity term (a scalar tensor; the ELBO adds it);
    * ``sample(n)``: ``n`` draws of the gate in training, shape ``[n, C]``;
    * ``deterministic()``: the evaluation-time gate, shape ``[C]``, exactly 0 on rejected channels.

    Optional statistics: ``expected()`` (E[gate], [C]) and ``snr()`` (signal-to-noise ratio, [C])
    return None where they mean nothing (the default); the export records them when present.

    Hooks (no-op defaults; ``fit`` and ``wrap`` call them on every gate):

    * ``set_stage(index, count)``: the gate's place among the model's gates (topological order);
    * ``attach(producers)``: the producers' weights, at wrap time;
    * ``after_wrap(wrapped)``: once the wrapped model is built;
    * ``begin_epoch(epoch, epochs)``, ``stage_epochs(epoch, epochs)``: a training schedule;
    * ``before_step()``, ``after_step()``, ``clip_()``: around each optimizer step;
    * ``compile_numerics(enabled)``, ``read_state_as_data(enabled)``: compiled training;
    * ``leaves_parameters_unused()``: some parameters get no gradient in some steps (DDP must know);
    * ``reach_shortfall(plan)``: warn when the planned training cannot reject any channel;
    * ``joint_key()`` with ``sample_jointly``/``kl_jointly``: gates computed in one batch.
    """

    num_channels: int
    #: the gate's place among the model's gates and their number (set by wrap via :meth:`set_stage`)
    stage_index: int = 0
    stage_count: int = 1

    # -- required ---------------------------------------------------------------

    def kl(self) -> Tensor:
        """The complexity term: KL(posterior || prior) summed over channels (scalar)."""
        raise NotImplementedError(f"{type(self).__name__} must implement kl()")

    def sample(self, n: int) -> Tensor:
        """``n`` draws of the gate for a training forward pass, shape [n, C]."""
        raise NotImplementedError(f"{type(self).__name__} must implement sample(n)")

    def deterministic(self) -> Tensor:
        """The evaluation-time gate, shape [C], exactly 0 for rejected channels."""
        raise NotImplementedError(f"{type(self).__name__} must implement deterministic()")

    # -- optional statistics ----------------------------------------------------

    def expected(self) -> Tensor | None:
        """E[gate] per channel ([C]), or None where the gate has no such statistic."""
        return None

    def snr(self) -> Tensor | None:
        """Signal-to-noise ratio per channel ([C]), or None where the gate has no noise."""
        return None

    # -- wrap-time hooks --------------------------------------------------------

    def set_stage(self, index: int, count: int) -> None:
        """Record the gate's place among the model's ``count`` gates (topological order)."""
        self.stage_index, self.stage_count = int(index), int(count)

    def attach(self, producers: Sequence[tuple]) -> ChannelGate:
        """The layers writing the gate's channels: ``[(weight, rows, positions), ...]``, where ``rows`` index the
        weight's first axis; a layer whose weight holds its output channels on its second axis (transformers'
        Conv1D) comes as a :class:`Producer` with ``channel_axis=1``. Returns self."""
        return self

    def after_wrap(self, wrapped: nn.Module) -> None:
        """Run once ``wrap`` has built the :class:`~onnxprune.bayes.wrapper.BayesianModel`."""

    # -- training hooks ---------------------------------------------------------

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        """Called before each epoch (0-based ``epoch`` of ``epochs``)."""

    def stage_epochs(self, epoch: int, epochs: int) -> tuple[int, int] | None:
        """The epochs ``[start, end)`` of the stage ``epoch`` belongs to when the gate trains stage by
        stage (the learning-rate schedule then restarts per stage), else None."""
        return None

    def before_step(self) -> None:
        """Between backward and the optimizer step."""

    def after_step(self) -> None:
        """After each optimizer step."""

    def clip_(self) -> ChannelGate:
        """Bring the parameters back into their range after a step; returns self."""
        return self

    def compile_numerics(self, enabled: bool) -> None:
        """Run the gate's numerics through ``torch.compile`` (where the gate supports it)."""

    def read_state_as_data(self, enabled: bool) -> None:
        """Read the schedule's state as tensor data (one compiled graph for every stage)."""

    def leaves_parameters_unused(self) -> bool:
        """True when some of the gate's parameters take no part in some training steps."""
        return False

    def reach_shortfall(self, plan: TrainingPlan) -> ReachShortfall | None:
        """A shortfall when ``plan`` is too short for this gate to reject any channel, else None."""
        return None

    # -- computing several gates at once ------------------------------------------

    def joint_key(self) -> Hashable | None:
        """Gates of one class with equal keys may go through :meth:`sample_jointly` and
        :meth:`kl_jointly` together; None (the default): computed one by one."""
        return None

    @classmethod
    def sample_jointly(cls, gates: Sequence[ChannelGate], n: int) -> list[Tensor]:
        """``gate.sample(n)`` for every gate of ``gates`` (same class and joint key)."""
        return [g.sample(n) for g in gates]

    @classmethod
    def kl_jointly(cls, gates: Sequence[ChannelGate], weights: Sequence[float]) -> Tensor:
        """The sum of ``weight * gate.kl()`` over ``gates`` (same class and joint key)."""
        return torch.stack([g.kl() * w if w != 1.0 else g.kl() for g, w in zip(gates, weights)]).sum()
