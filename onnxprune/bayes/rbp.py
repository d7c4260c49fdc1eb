"""Recursive Bayesian Pruning gate (Zhou, Zhang, Wang, Tian, arXiv 1812.00353 / ICCV 2019).

``y = x * z`` with one multiplicative Gaussian dropout noise per channel (conv) or
neuron (linear)::

    z_c = theta_c * (1 + sqrt(alpha_c) * eps),   eps ~ N(0, 1),   theta_c = exp(log_theta_c) > 0

so ``E[z] = theta``, ``Var[z] = alpha theta^2`` and the signal-to-noise ratio is
``alpha^-1/2``. The prior is the log-uniform ``p(|z|) ∝ 1/|z|`` (improper, with
infinite mass at every neighbourhood of 0: a Dirac-like spike), whose KL from
``N(theta, alpha theta^2)`` depends on ``alpha`` only; we use the approximation of
Molchanov, Ashukha, Vetrov (ICML 2017). A channel is redundant (rejected) when its
noise dominates its signal, ``log alpha > log_alpha_threshold`` (default 3).

The Markov chain over layers of the paper is optimised greedily, layer by layer in
topological order (one *stage* per gate): in stage k gate k is ``active`` (samples
noise, pays the KL), gates before it are ``frozen`` (their posterior collapsed to a
point mass at ``theta * mask``, mask fixed at the end of their stage), gates after
it are ``dormant`` (multiply by 1, no prior yet). ``begin_epoch(epoch, epochs)``
moves the gate through these states from its ``stage_index`` / ``stage_count``
(set by the wrapper). With ``recursive=False`` the gate is always active (joint
training, the ablation). Derivation, constants and what is our own choice:
``docs/methods.md`` (Recursive Bayesian Pruning).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from onnxprune.bayes.gate import ChannelGate, ReachShortfall, TrainingPlan

__all__ = ["RBPGate", "kl_log_uniform", "log_alpha_reach", "K1", "K2", "K3"]

# Molchanov, Ashukha, Vetrov (2017), eq. (14): -KL ≈ k1 sigmoid(k2 + k3 log alpha) - 0.5 log1p(1/alpha) - k1.
K1 = 0.63576
K2 = 1.87320
K3 = 1.48695

_STATES = ("dormant", "active", "frozen")
_PARAMETRIZATIONS = ("alpha", "additive")
_DORMANT, _ACTIVE, _FROZEN = 0, 1, 2


def kl_log_uniform(log_alpha: Tensor) -> Tensor:
    """KL(N(theta, alpha theta^2) || log-uniform) per element (approximation, >= 0, -> 0 as alpha -> inf).

    ``0.5 log1p(1/alpha)`` is written ``0.5 softplus(-log alpha)`` (no overflow of 1/alpha).
    """
    return K1 - K1 * torch.sigmoid(K2 + K3 * log_alpha) + 0.5 * F.softplus(-log_alpha)


def log_alpha_reach(gate_lr: float, lr_factors: Iterable[float], parametrization: str = "additive") -> float:
    """About how far Adam can carry a gate's log alpha over the steps of one stage.

    Adam's update is the learning rate times a ratio of moment estimates that is about 1 under a steady
    gradient, whatever the gradient's scale (a larger KL weight does not make the noise grow faster). One step
    at ``gate_lr * factor`` then moves log alpha by at most about that much, or three times that much in the
    additive parametrization, where ``log alpha = log sigma^2 - 2 log theta`` and both parameters move.
    ``lr_factors`` are the schedule's multipliers at the stage's steps. An estimate, not a hard bound: with a
    gradient that keeps growing, Adam's steps exceed the rate somewhat (about 20 % more in the runs we watched).
    """
    if parametrization not in _PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {parametrization!r}; known: {', '.join(_PARAMETRIZATIONS)}")
    per_step = 3.0 if parametrization == "additive" else 1.0
    return per_step * float(gate_lr) * float(sum(lr_factors))


class RBPGate(ChannelGate):
    """Per-channel Gaussian dropout gate with a log-uniform prior, trained layer by layer.

    Parameters ``log_theta`` (init 0: theta = 1) and the noise: with ``parametrization="additive"``
    (the default; Molchanov et al. 2017, §4.3) ``log_sigma2``, the log variance
    ``sigma^2 = alpha theta^2``, so ``log alpha = log_sigma2 - 2 log_theta``: the KL then presses
    theta down too, and a channel whose output the network can do without reaches a large alpha
    by shrinking rather than by growing its noise. ``parametrization="alpha"`` learns ``log_alpha``
    itself (the KL does not touch theta; it prunes almost nothing, see docs/methods.md).
    Initially log alpha = ``init_log_alpha`` (default -8: almost no noise, the network starts
    as the pre-trained one). log alpha is clipped to ``[LOG_ALPHA_MIN, LOG_ALPHA_MAX] = [-10, 10]``
    inside every computation and in place by :meth:`clip_`. Persistent buffers ``state_code`` (0 dormant, 1 active,
    2 frozen) and ``frozen_mask`` make the schedule's state survive ``state_dict`` round trips
    (checkpoints, resume, export from a saved model).
    """

    LOG_ALPHA_MIN = -10.0
    LOG_ALPHA_MAX = 10.0

    def __init__(
        self,
        num_channels: int,
        log_alpha_threshold: float = 3.0,
        init_log_alpha: float = -8.0,
        recursive: bool = True,
        parametrization: str = "additive",
    ) -> None:
        super().__init__()
        if int(num_channels) != num_channels or num_channels < 1:
            raise ValueError(f"num_channels must be a positive integer, got {num_channels!r}")
        if not self.LOG_ALPHA_MIN <= init_log_alpha <= self.LOG_ALPHA_MAX:
            raise ValueError(f"init_log_alpha must lie in [{self.LOG_ALPHA_MIN}, {self.LOG_ALPHA_MAX}], got {init_log_alpha}")
        self.num_channels = int(num_channels)
        self.log_alpha_threshold = float(log_alpha_threshold)
        self.init_log_alpha = float(init_log_alpha)
        self.recursive = bool(recursive)
        if parametrization not in _PARAMETRIZATIONS:
            raise ValueError(f"unknown parametrization {parametrization!r}; known: {', '.join(_PARAMETRIZATIONS)}")
        self.parametrization = parametrization
        # Position among the model's gates (topological order of their first layer) and their number;
        # the wrapper overwrites these before training. Defaults: a lone gate, always active.
        self.stage_index = 0
        self.stage_count = 1
        # Read the state as data in training (sample, kl): set by fit while it runs a compiled step, so that the
        # step is traced once for all stages. Parameters a state does not train then get zero gradients, which
        # before_step drops (an own training loop leaves this off, or calls before_step between backward and step).
        self.state_as_data = False
        self.log_theta = nn.Parameter(torch.zeros(self.num_channels))
        if parametrization == "alpha":
            self.log_alpha = nn.Parameter(torch.full((self.num_channels,), self.init_log_alpha))
        else:  # sigma^2 = alpha theta^2; theta = 1 at init, so log sigma^2 = log alpha
            self.log_sigma2 = nn.Parameter(torch.full((self.num_channels,), self.init_log_alpha))
        self.register_buffer("state_code", torch.tensor(_ACTIVE, dtype=torch.long))
        self._code = _ACTIVE  # host-side copy of state_code: no device sync in the forward pass
        # uint8 rather than bool: every collective backend (DDP broadcasts buffers) handles it.
        self.register_buffer("frozen_mask", torch.ones(self.num_channels, dtype=torch.uint8))

    # -- parameters ---------------------------------------------------------

    def _log_alpha(self) -> Tensor:
        if self.parametrization == "alpha":
            return self.log_alpha.clamp(self.LOG_ALPHA_MIN, self.LOG_ALPHA_MAX)
        return (self.log_sigma2 - 2.0 * self.log_theta).clamp(self.LOG_ALPHA_MIN, self.LOG_ALPHA_MAX)

    def noise_parameter(self) -> nn.Parameter:
        """The parameter that holds the noise: ``log_alpha``, or ``log_sigma2`` (additive parametrization)."""
        return self.log_alpha if self.parametrization == "alpha" else self.log_sigma2

    def theta(self) -> Tensor:
        """Posterior mean of the multiplier, ``exp(log_theta)`` > 0, shape [C]."""
        return torch.exp(self.log_theta)

    def log_alpha_values(self) -> Tensor:
        """log alpha per channel, clamped to ``[-10, 10]`` and detached, shape [C] (either parametrization)."""
        return self._log_alpha().detach()

    @torch.no_grad()
    def clip_(self) -> RBPGate:
        """Clamp ``log_alpha`` into ``[-10, 10]`` in place (additive: ``log_sigma2`` into
        ``2 log_theta + [-10, 10]``); returns self."""
        if self.parametrization == "alpha":
            self.log_alpha.clamp_(self.LOG_ALPHA_MIN, self.LOG_ALPHA_MAX)
        else:
            lo, hi = 2.0 * self.log_theta + self.LOG_ALPHA_MIN, 2.0 * self.log_theta + self.LOG_ALPHA_MAX
            self.log_sigma2.copy_(torch.minimum(torch.maximum(self.log_sigma2, lo), hi))
        return self

    # -- schedule -----------------------------------------------------------

    @property
    def state(self) -> str:
        """One of "dormant" (multiplies by 1), "active" (noise and KL), "frozen" (theta * fixed mask)."""
        return _STATES[self._code]

    @torch.no_grad()
    def set_state(self, state: str) -> None:
        """Move to ``state``; entering "frozen" fixes the mask from the current ``log_alpha``."""
        if state not in _STATES:
            raise ValueError(f"unknown state {state!r}; known: {', '.join(_STATES)}")
        code = _STATES.index(state)
        if code == _FROZEN and self._code != _FROZEN:
            self.frozen_mask.copy_(self._log_alpha() <= self.log_alpha_threshold)  # bool -> uint8
        elif code != _FROZEN:
            self.frozen_mask.fill_(1)
        self.state_code.fill_(code)
        self._code = code

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._code = int(self.state_code)  # keep the host-side copy in step with the loaded buffer

    @staticmethod
    def schedule(stage_index: int, stage_count: int, epoch: int, epochs: int) -> str:
        """State of gate ``stage_index`` of ``stage_count`` in epoch ``epoch`` (0-based) of ``epochs``.

        ``stage_count <= epochs``: the current stage is ``min(S - 1, epoch * S // epochs)``;
        the gate is active in its stage, frozen after, dormant before. ``stage_count > epochs``
        (more gates than epochs; the rule above would skip some gates entirely): gate k is
        active in epoch ``k * epochs // S`` together with its neighbours that map to the same
        epoch, so every gate is trained for at least one epoch. Epochs past the end count as
        the last one.
        """
        S, E = int(stage_count), int(epochs)
        k = int(stage_index)
        if S < 1 or E < 1:
            raise ValueError(f"need stage_count >= 1 and epochs >= 1, got {S} and {E}")
        if not 0 <= k < S:
            raise ValueError(f"stage_index {k} out of range for stage_count {S}")
        e = min(max(int(epoch), 0), E - 1)
        if S <= E:
            stage = min(S - 1, e * S // E)
            return "active" if k == stage else ("frozen" if k < stage else "dormant")
        first = k * E // S
        return "active" if e == first else ("frozen" if e > first else "dormant")

    @staticmethod
    def stage_span(stage_count: int, epoch: int, epochs: int) -> tuple[int, int]:
        """The epochs ``[start, end)`` of the stage that epoch ``epoch`` of ``epochs`` belongs to (see
        :meth:`schedule`): the training loop restarts its learning-rate schedule there, so that every
        stage, the last included, is optimised with the whole schedule."""
        S, E = int(stage_count), int(epochs)
        if S < 1 or E < 1:
            raise ValueError(f"need stage_count >= 1 and epochs >= 1, got {S} and {E}")
        e = min(max(int(epoch), 0), E - 1)
        if S > E:
            return e, e + 1
        stage = e * S // E
        start = -(-stage * E // S)  # the first epoch e' with e' * S // E == stage
        end = E if stage == S - 1 else -(-(stage + 1) * E // S)
        return start, end

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        """Set the state for this epoch from ``stage_index`` / ``stage_count`` (see :meth:`schedule`)."""
        if not self.recursive:
            self.set_state("active")
            return
        self.set_state(self.schedule(self.stage_index, self.stage_count, epoch, epochs))

    def before_step(self) -> None:
        """Drop the gradients this state does not train, as if those parameters had not taken part in the step:
        frozen gates train ``log_theta`` only, dormant gates nothing. With ``state_as_data`` the training graph
        holds them in every state, so they get zero gradients, on which Adam would still move them by its momentum."""
        code = self._code
        if code != _ACTIVE:
            self.noise_parameter().grad = None
        if code == _DORMANT:
            self.log_theta.grad = None

    def stage_epochs(self, epoch: int, epochs: int) -> tuple[int, int] | None:
        """The epochs ``[start, end)`` of the current stage when trained layer by layer, else None."""
        if self.recursive and self.stage_count > 1:
            return self.stage_span(self.stage_count, epoch, epochs)
        return None

    def read_state_as_data(self, enabled: bool) -> None:
        """Set ``state_as_data`` (fit does while it runs a compiled step)."""
        self.state_as_data = bool(enabled)

    def leaves_parameters_unused(self) -> bool:
        """True: dormant and frozen stages leave some parameters without gradient."""
        return True

    def reach_shortfall(self, plan: TrainingPlan) -> ReachShortfall | None:
        """A shortfall when the gate's active epochs of ``plan`` are too few steps for log alpha to travel
        from ``init_log_alpha`` past ``log_alpha_threshold`` (:func:`log_alpha_reach`), else None."""
        if self.recursive:
            active = [e for e in range(plan.epochs) if self.schedule(self.stage_index, self.stage_count, e, plan.epochs) == "active"]
        else:
            active = list(range(plan.epochs))
        factors = [plan.lr_factor(e, s) for e in active for s in range(plan.steps_per_epoch)]
        reach = log_alpha_reach(plan.gate_lr, factors, self.parametrization)
        need = self.log_alpha_threshold - self.init_log_alpha
        if reach >= need:
            return None
        per_lr = log_alpha_reach(1.0, factors, self.parametrization)
        needed = need / per_lr if per_lr > 0 else math.inf
        return ReachShortfall(needed, len(active) * plan.steps_per_epoch, reach, self.init_log_alpha, self.log_alpha_threshold)

    # -- closed forms -------------------------------------------------------

    def kl(self) -> Tensor:
        """KL(q || log-uniform prior) summed over channels while active; 0 otherwise (scalar).

        Frozen and dormant gates are point masses whose KL from the log-uniform prior is a
        constant independent of their location (see the doc), hence dropped. With ``state_as_data``
        the state is read from the ``state_code`` buffer as data (see :meth:`sample`).
        """
        if self.state_as_data:
            kl = kl_log_uniform(self._log_alpha()).sum()
            return torch.where(self.state_code == _ACTIVE, kl, torch.zeros_like(kl))
        if self._code != _ACTIVE:
            return self.log_theta.new_zeros(())
        return kl_log_uniform(self._log_alpha()).sum()

    def expected(self) -> Tensor:
        """E[z] = theta per channel, shape [C]."""
        return self.theta()

    def snr(self) -> Tensor:
        """Signal-to-noise ratio E[z] / std[z] = alpha^-1/2 per channel, shape [C]."""
        return torch.exp(-0.5 * self._log_alpha())

    def dropout_rate(self) -> Tensor:
        """Equivalent Bernoulli dropout rate alpha / (1 + alpha) per channel."""
        return torch.sigmoid(self._log_alpha())

    def mask(self, log_alpha_threshold: float | None = None) -> Tensor:
        """Channels kept (bool, [C]): active: ``log alpha <= threshold``; frozen: the mask fixed
        when the gate froze; dormant: all (the layer has not been considered yet)."""
        code = self._code
        if code == _FROZEN:
            return self.frozen_mask.bool()
        if code == _DORMANT:
            return torch.ones(self.num_channels, dtype=torch.bool, device=self.log_theta.device)
        thr = self.log_alpha_threshold if log_alpha_threshold is None else float(log_alpha_threshold)
        with torch.no_grad():
            return self._log_alpha() <= thr

    def deterministic(self, log_alpha_threshold: float | None = None) -> Tensor:
        """Evaluation-time gate ``theta * mask`` (exact zeros for rejected channels; ones while dormant)."""
        if self._code == _DORMANT:
            return torch.ones(self.num_channels, dtype=self.log_theta.dtype, device=self.log_theta.device)
        return self.theta() * self.mask(log_alpha_threshold).to(self.log_theta.dtype)

    # -- sampling -----------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws per channel, shape [n, C]: active: ``theta (1 + sqrt(alpha) eps)``
        (reparametrised, differentiable w.r.t. ``log_theta`` and ``log_alpha``); frozen:
        ``theta * mask`` repeated (differentiable w.r.t. ``log_theta``); dormant: ones."""
        n = int(n)
        if self.state_as_data:
            # Branch-free on the state, read from the state_code buffer as data rather than from the host-side
            # copy: a compiled training step is then one graph for every stage of the schedule, not one per stage.
            # Noise is drawn in every state; before_step drops the (zero) gradients a state does not train.
            theta = self.theta()
            eps = torch.randn((n, self.num_channels), generator=generator, dtype=theta.dtype, device=theta.device)
            noisy = theta * (1.0 + torch.exp(0.5 * self._log_alpha()) * eps)
            fixed = (theta * self.frozen_mask.to(theta.dtype)).expand(n, -1)
            held = torch.where(self.state_code == _FROZEN, fixed, torch.ones_like(noisy))
            return torch.where(self.state_code == _ACTIVE, noisy, held)
        code = self._code
        if code == _DORMANT:
            return torch.ones((n, self.num_channels), dtype=self.log_theta.dtype, device=self.log_theta.device)
        if code == _FROZEN:
            return self.deterministic().unsqueeze(0).expand(n, -1)
        eps = torch.randn((n, self.num_channels), generator=generator, dtype=self.log_theta.dtype, device=self.log_theta.device)
        return self.theta() * (1.0 + torch.exp(0.5 * self._log_alpha()) * eps)

    # -- layer --------------------------------------------------------------

    def forward(self, x: Tensor, channel_axis: int = 1) -> Tensor:
        """Training: ``x * z`` with z drawn per example ([B, C] broadcast into ``channel_axis``);
        evaluation: ``x * deterministic()``."""
        axis = channel_axis if channel_axis >= 0 else channel_axis + x.dim()
        if not 0 <= axis < x.dim():
            raise ValueError(f"channel_axis {channel_axis} out of range for a {x.dim()}-d input")
        if x.shape[axis] != self.num_channels:
            raise ValueError(f"input has {x.shape[axis]} channels on axis {channel_axis}, gate has {self.num_channels}")
        shape = [1] * x.dim()
        shape[axis] = self.num_channels
        if self.training:
            if axis == 0:
                raise ValueError("channel_axis must not be the batch axis (0) in training mode")
            shape[0] = x.shape[0]
            z = self.sample(x.shape[0])
        else:
            z = self.deterministic()
        return x * z.reshape(shape).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_channels={self.num_channels}, log_alpha_threshold={self.log_alpha_threshold}, "
            f"recursive={self.recursive}, parametrization={self.parametrization}, "
            f"stage={self.stage_index}/{self.stage_count}, state={self.state}"
        )

