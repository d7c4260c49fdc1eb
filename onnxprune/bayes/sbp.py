"""Structured Bayesian Pruning gate (Neklyudov, Molchanov, Ashukha, Vetrov, NIPS 2017).

``y = x * theta`` with one multiplicative ``theta`` per channel (conv) or neuron (linear).
Prior: log-uniform on ``theta``, i.e. ``log theta ~ U[a, b]``; posterior:
``log theta ~ Normal(mu, sigma^2)`` truncated to ``[a, b]``. Training samples ``theta`` by
the inverse CDF (reparametrised, one sample per example and channel); evaluation uses the
deterministic ``E[theta] * 1[SNR > tau]``. The numerics live in
:mod:`onnxprune.bayes.truncnorm`; this module holds the parameters and the layer logic.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor, nn

from onnxprune.bayes import truncnorm
from onnxprune.bayes.gate import ChannelGate

__all__ = ["SBPGate", "compiled_kernels", "sample_together", "kl_together"]

_KERNELS: dict[str, Callable] = {}


def compiled_kernels() -> dict[str, Callable]:
    """The gates' float64 numerics (KL, sampling, SNR) compiled with ``torch.compile``, built once
    per process. Each is a few fused kernels instead of hundreds of small ops, which is what
    a GPU step spends its time on; the functions are the eager ones, so the values agree to rounding."""
    if not _KERNELS:
        opts = {"dynamic": True, "fullgraph": True}
        _KERNELS["kl"] = torch.compile(truncnorm._kl64, **opts)
        _KERNELS["sample"] = torch.compile(truncnorm.sample_channels_branch_free, **opts)
        _KERNELS["snr"] = torch.compile(truncnorm._snr64, **opts)
    return _KERNELS


def _clip64(mu: Tensor, log_sigma: Tensor) -> tuple[Tensor, Tensor]:
    mu = mu.clamp(SBPGate.MU_MIN, SBPGate.MU_MAX).to(torch.float64)
    log_sigma = log_sigma.clamp(SBPGate.LOG_SIGMA_MIN, SBPGate.LOG_SIGMA_MAX).to(torch.float64)
    return mu, torch.exp(log_sigma)


def _sample64(mu: Tensor, log_sigma: Tensor, a: float, b: float, n: int, compiled: bool,
              generator: torch.Generator | None = None) -> Tensor:
    mu64, sigma = _clip64(mu, log_sigma)
    u = torch.rand((n, mu.shape[0]), generator=generator, dtype=torch.float64, device=mu.device)
    solver = compiled_kernels()["sample"] if compiled else None
    return torch.exp(truncnorm.sample_log_channels(mu64, sigma, a, b, u, solver=solver))


def _together(gates: list[SBPGate]) -> tuple[Tensor, Tensor, float, float, bool]:
    first = gates[0]
    if any((g.a, g.b, g.compiled) != (first.a, first.b, first.compiled) for g in gates):
        raise ValueError("gates drawn together must share the truncation interval [a, b] and the compile setting")
    return torch.cat([g.mu for g in gates]), torch.cat([g.log_sigma for g in gates]), first.a, first.b, first.compiled


def sample_together(gates: list[SBPGate], n: int) -> list[Tensor]:
    """``gate.sample(n)`` for every gate at once: the float64 numerics run once on all their
    channels (concatenated) instead of once per gate, so a step launches (or a compiled graph
    holds) one copy of them. Same distribution as separate draws; other random numbers."""
    mu, log_sigma, a, b, compiled = _together(gates)
    theta = _sample64(mu, log_sigma, a, b, int(n), compiled).to(gates[0].mu.dtype)
    return list(theta.split([g.num_channels for g in gates], dim=-1))


def kl_together(gates: list[SBPGate], weights: list[float] | None = None) -> Tensor:
    """The sum of the gates' KL terms, computed on all their channels at once (each gate's
    terms multiplied by its entry of ``weights``, when given)."""
    mu, log_sigma, a, b, compiled = _together(gates)
    mu64, sigma = _clip64(mu, log_sigma)
    kl = compiled_kernels()["kl"] if compiled else truncnorm._kl64
    terms = kl(mu64, sigma, a, b)
    if weights is not None and any(w != 1.0 for w in weights):
        scale = torch.cat([torch.full((g.num_channels,), float(w), dtype=terms.dtype, device=terms.device)
                           for g, w in zip(gates, weights)])
        terms = terms * scale
    return terms.sum().to(gates[0].mu.dtype)


class SBPGate(ChannelGate):
    """Multiplicative per-channel gate with a truncated log-normal posterior.

    Parameters ``mu`` (init 0) and ``log_sigma`` (init -5), both clipped to
    ``[MU_MIN, MU_MAX] = [-20, 5]`` and ``[LOG_SIGMA_MIN, LOG_SIGMA_MAX] = [-20, 5]``
    inside every computation (and in place by :meth:`clip_`, to call after optimiser
    steps as in the authors' code).
    """

    #: Use :func:`compiled_kernels` (set by ``fit(compile_gates=...)`` through :meth:`compile_numerics`;
    #: on by default on CUDA).
    compiled: bool = False
    MU_MIN = -20.0
    MU_MAX = 5.0
    LOG_SIGMA_MIN = -20.0
    LOG_SIGMA_MAX = 5.0

    def __init__(self, num_channels: int, a: float = -20.0, b: float = 0.0) -> None:
        super().__init__()
        if int(num_channels) != num_channels or num_channels < 1:
            raise ValueError(f"num_channels must be a positive integer, got {num_channels!r}")
        if not a < b:
            raise ValueError(f"need a < b for the truncation interval, got a={a}, b={b}")
        self.num_channels = int(num_channels)
        self.a = float(a)
        self.b = float(b)
        self.mu = nn.Parameter(torch.zeros(self.num_channels))
        self.log_sigma = nn.Parameter(torch.full((self.num_channels,), -5.0))

    # -- parameters ---------------------------------------------------------

    def _clipped64(self) -> tuple[Tensor, Tensor]:
        """(mu, sigma) clipped and in float64 (differentiable through the clamp)."""
        return _clip64(self.mu, self.log_sigma)

    @torch.no_grad()
    def clip_(self) -> SBPGate:
        """Clamp ``mu`` and ``log_sigma`` into ``[-20, 5]`` in place; returns self."""
        self.mu.clamp_(self.MU_MIN, self.MU_MAX)
        self.log_sigma.clamp_(self.LOG_SIGMA_MIN, self.LOG_SIGMA_MAX)
        return self

    def compile_numerics(self, enabled: bool) -> None:
        """Use the compiled float64 kernels (:func:`compiled_kernels`) or the eager ones."""
        self.compiled = bool(enabled)

    # -- several gates in one computation -------------------------------------

    def joint_key(self) -> Hashable:
        """SBP gates with the same truncation interval and compile setting are drawn and KL'd together."""
        return (self.a, self.b, self.compiled)

    @classmethod
    def sample_jointly(cls, gates: Sequence[SBPGate], n: int) -> list[Tensor]:
        """:func:`sample_together`."""
        return sample_together(list(gates), n)

    @classmethod
    def kl_jointly(cls, gates: Sequence[SBPGate], weights: Sequence[float]) -> Tensor:
        """:func:`kl_together`."""
        return kl_together(list(gates), list(weights))

    # -- closed forms -------------------------------------------------------

    def kl(self) -> Tensor:
        """KL(posterior || log-uniform prior), summed over channels (scalar)."""
        mu, sigma = self._clipped64()
        kl = compiled_kernels()["kl"] if self.compiled else truncnorm._kl64
        return kl(mu, sigma, self.a, self.b).sum().to(self.mu.dtype)

    def expected(self) -> Tensor:
        """E[theta] per channel, shape [C]."""
        mu, sigma = self._clipped64()
        return truncnorm.expected(mu, sigma, self.a, self.b).to(self.mu.dtype)

    def snr(self) -> Tensor:
        """Signal-to-noise ratio E[theta] / std[theta] per channel (finite, capped at 1e12)."""
        return self._snr64().to(self.mu.dtype)

    def _snr64(self) -> Tensor:
        mu, sigma = self._clipped64()
        snr = compiled_kernels()["snr"] if self.compiled else truncnorm._snr64
        return snr(mu, sigma, self.a, self.b)

    def mask(self, tau: float = 1.0) -> Tensor:
        """Channels kept at evaluation: ``snr > tau`` (bool, shape [C])."""
        with torch.no_grad():
            return self._snr64() > tau

    def deterministic(self, tau: float = 1.0) -> Tensor:
        """Evaluation-time gate ``E[theta] * 1[SNR > tau]`` (exact zeros for rejected channels)."""
        return self.expected() * self.mask(tau).to(self.mu.dtype)

    # -- sampling -----------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` independent draws of theta per channel, shape [n, C], differentiable
        w.r.t. ``mu`` and ``log_sigma`` (inverse-CDF reparametrisation)."""
        return _sample64(self.mu, self.log_sigma, self.a, self.b, int(n), self.compiled, generator).to(self.mu.dtype)

    # -- layer --------------------------------------------------------------

    def _view_shape(self, x: Tensor, channel_axis: int, batch: int) -> list[int]:
        axis = channel_axis if channel_axis >= 0 else channel_axis + x.dim()
        if not 0 <= axis < x.dim():
            raise ValueError(f"channel_axis {channel_axis} out of range for a {x.dim()}-d input")
        if x.shape[axis] != self.num_channels:
            raise ValueError(
                f"input has {x.shape[axis]} channels on axis {channel_axis}, gate has {self.num_channels}"
            )
        if batch != 1 and axis == 0:
            raise ValueError("channel_axis must not be the batch axis (0) in training mode")
        shape = [1] * x.dim()
        shape[0] = batch
        shape[axis] = self.num_channels
        return shape

    def forward(self, x: Tensor, channel_axis: int = 1) -> Tensor:
        """Training: ``x * theta`` with theta drawn per example ([B, C] broadcast into
        ``channel_axis``); evaluation: ``x * deterministic()``."""
        if self.training:
            batch = x.shape[0]
            shape = self._view_shape(x, channel_axis, batch)
            theta = self.sample(batch)
        else:
            shape = self._view_shape(x, channel_axis, 1)
            theta = self.deterministic()
        return x * theta.reshape(shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}, a={self.a}, b={self.b}"
