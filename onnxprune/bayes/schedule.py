"""The schedules ``fit`` follows: the learning rate's, the KL weight's warm-up, and whether gates can keep up.

``lr_factor`` and ``step_lr_factor`` give the learning rate's multiplier; ``kl_warmup_factor`` the
KL weight's; ``reach_warning`` asks every gate whether the planned training is long enough for it
to reject any channel (:meth:`~onnxprune.bayes.gate.ChannelGate.reach_shortfall`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from onnxprune.bayes.gate import TrainingPlan

if TYPE_CHECKING:
    from onnxprune.bayes.wrapper import BayesianModel

__all__ = ["LR_SCHEDULES", "lr_factor", "step_lr_factor", "kl_warmup_factor", "reach_warning"]

LR_SCHEDULES = ("constant", "cosine", "step-linear")


def lr_factor(schedule: str, progress: float, decay_start: float = 0.5) -> float:
    """The learning rate's multiplier at ``progress`` (0 at the start of training, 1 at its end).
    "step-linear" is constant until ``decay_start`` (a fraction of training), then linear to 0."""
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step-linear":
        return min(1.0, (1.0 - progress) / (1.0 - decay_start))
    return 1.0


def step_lr_factor(
    schedule: str, epoch: int, step: int, steps_per_epoch: int, epochs: int,
    span: tuple[int, int] | None = None, decay_start: float = 0.5,
) -> float:
    """The learning rate's multiplier at ``step`` of ``epoch`` in ``fit``: the schedule runs once over all
    epochs, or once within ``span`` (the epochs ``[start, end)`` of the current RBP stage)."""
    if schedule == "constant":
        return 1.0
    if span is None:
        progress = (epoch * steps_per_epoch + step) / (epochs * steps_per_epoch)
    else:
        progress = ((epoch - span[0]) * steps_per_epoch + step) / ((span[1] - span[0]) * steps_per_epoch)
    return lr_factor(schedule, progress, decay_start)


def kl_warmup_factor(steps_done: int, warmup_epochs: float, steps_per_epoch: int) -> float:
    """The KL weight's multiplier after ``steps_done`` steps: linear from 0 to 1 over ``warmup_epochs``
    (1 throughout when there is no warm-up)."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, steps_done / (warmup_epochs * steps_per_epoch))


def reach_warning(
    model: BayesianModel, *, epochs: int, steps_per_epoch: int, gate_lr: float, lr_schedule: str = "constant",
    decay_start: float = 0.5, restart_per_stage: bool = True,
) -> str | None:
    """A sentence when some gate trains for too few steps to reject any channel, else None.

    For RBP: a channel is rejected when its log alpha passes the threshold (3) from where it starts (-8); Adam
    moves log alpha by about the gate learning rate per step at most (:func:`~onnxprune.bayes.rbp.log_alpha_reach`),
    so a stage shorter than that distance keeps every channel, whatever the data say: the noise has no time to
    grow. Layer by layer, a stage is ``epochs / stages`` epochs (one at least), which on a deep net is short.
    """

    def factor(epoch: int, step: int) -> float:
        span = model.stage_span(epoch, epochs) if restart_per_stage else None
        return step_lr_factor(lr_schedule, epoch, step, steps_per_epoch, epochs, span, decay_start)

    plan = TrainingPlan(epochs, steps_per_epoch, gate_lr, factor)
    short = [s for s in (g.reach_shortfall(plan) for g in model.gates.values()) if s is not None]
    if not short:
        return None
    worst = max(short, key=lambda s: s.needed_gate_lr)
    return (f"{worst.label}: {len(short)} of {len(model.gates)} gates train for too few steps to reject any channel. "
            f"The shortest stage is {worst.steps} steps at gate lr {gate_lr:g} ({lr_schedule} schedule): Adam moves "
            f"log alpha by about {worst.reach:.2g} in it, but a channel starts at log alpha {worst.start:g} and is "
            f"rejected above {worst.threshold:g}. Use a gate learning rate of at least {worst.needed_gate_lr:.2g}, "
            f"more epochs or more steps per epoch, or a higher init_log_alpha.")
