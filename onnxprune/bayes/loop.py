"""The gates' hooks in a training loop of one's own, run by the optimizer itself.

    wrapped = bayes.wrap(model, example_inputs, method="sbp")
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-3)
    bayes.step_hooks(wrapped, optimizer)          # before_step / after_step + clip_ around every step
    ...                                           # the loop as it was, loss + wrapped.kl() / N

:func:`step_hooks` registers a pre-step hook (:meth:`BayesianModel.before_step`, between backward
and the step) and a post-step hook (:meth:`BayesianModel.after_step`, then :meth:`BayesianModel.clip_`)
on the optimizer. Given ``epochs`` and ``steps_per_epoch`` it also calls
:meth:`BayesianModel.begin_epoch` at every epoch's start (methods with a schedule, recursive RBP,
need it; without it their gates all train together from the first step).
"""

from __future__ import annotations

import logging

import torch
from torch.utils.hooks import RemovableHandle

from onnxprune.bayes.wrapper import BayesianModel

__all__ = ["StepHooks", "step_hooks"]

logger = logging.getLogger(__name__)


class StepHooks:
    """The hooks :func:`step_hooks` put on an optimizer; ``remove()`` (or leaving a ``with`` block) takes them off."""

    def __init__(self, wrapped: BayesianModel, epochs: int | None = None, steps_per_epoch: int | None = None) -> None:
        if (epochs is None) != (steps_per_epoch is None):
            raise ValueError("step_hooks: give both epochs and steps_per_epoch, or neither")
        if steps_per_epoch is not None and (steps_per_epoch < 1 or epochs < 1):
            raise ValueError(f"step_hooks: epochs and steps_per_epoch must be >= 1, got {epochs} and {steps_per_epoch}")
        self.wrapped = wrapped
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        #: optimizer steps taken since the hooks were registered
        self.steps = 0
        self._handles: list[RemovableHandle] = []

    def attach(self, optimizer: torch.optim.Optimizer) -> StepHooks:
        """Register the hooks on ``optimizer`` (and begin epoch 0 when on a schedule); returns self."""
        self._handles += [optimizer.register_step_pre_hook(self._before), optimizer.register_step_post_hook(self._after)]
        if self.epochs is not None:
            self.wrapped.begin_epoch(0, self.epochs)
        return self

    def _before(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.wrapped.before_step()

    def _after(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.wrapped.after_step()
        self.wrapped.clip_()
        self.steps += 1
        if self.steps_per_epoch is not None and self.steps % self.steps_per_epoch == 0:
            epoch = self.steps // self.steps_per_epoch
            logger.info("epoch %d done: %.1f%% of gated channels kept", epoch, 100 * self.wrapped.kept_fraction())
            if epoch < self.epochs:  # the next epoch's forward passes see its schedule
                self.wrapped.begin_epoch(epoch, self.epochs)

    def remove(self) -> None:
        """Take the hooks off the optimizer."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> StepHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def step_hooks(wrapped: BayesianModel, optimizer: torch.optim.Optimizer, *, epochs: int | None = None,
               steps_per_epoch: int | None = None) -> StepHooks:
    """Make every ``optimizer.step()`` run ``wrapped``'s gate hooks: ``before_step()`` before it,
    ``after_step()`` and ``clip_()`` after it. With ``epochs`` and ``steps_per_epoch`` (optimizer steps
    per epoch), also ``begin_epoch(epoch, epochs)`` now and after each epoch's last step."""
    if not isinstance(wrapped, BayesianModel):
        raise TypeError(f"step_hooks needs the model bayes.wrap returned, got {type(wrapped).__name__}")
    return StepHooks(wrapped, epochs, steps_per_epoch).attach(optimizer)
