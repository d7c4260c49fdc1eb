"""Turbo-VBI channel gate (Xia, Tsang, Lau, IEEE Trans. Signal Processing 71:670-685, 2023; arXiv 2302.10483).

The paper's three-layer hierarchical prior, realised per channel group:

* support ``s`` (binary, one per *kernel unit*: the slice ``W_l[r, j, ...]`` of producer
  ``l``'s weight for an output row ``r`` of channel ``c`` and an input channel ``j``), with a
  Markov-random-field prior: a hub ``t_c`` per channel (``P(t_c = 1) = p_channel``) that
  forbids active kernels in an inactive channel (potential ``psi(0, 1) = eps``), and a
  Markov chain over ``j`` within each producer row (``P(s_j = s_{j-1}) = p_stay``);
* precision ``rho`` per unit, ``p(rho | s) = Gamma(a, b)^s Gamma(a_bar, b_bar)^(1 - s)``;
* weights ``w ~ N(0, 1/rho)`` iid within the unit.

Turbo-VBI alternates module A (Bayesian inference of ``rho`` and ``s`` per unit given
the support prior message, with the weights as SGD point estimates) and module B
(exact sum-product on the support MRF, by cutset conditioning on each hub),
exchanging extrinsic messages. Module A's evidence is by default *collapsed* (rho
integrated out, exact given the weights); the paper's mean-field ``q(s) q(rho)``
updates are available (``evidence="mean_field"``). The prior precision ``E[rho]``
goes back into SGD through :meth:`TurboVBIGate.kl` (``0.5 sum E[rho] ||w||^2``). A
channel is kept while ``P(t_c = 1 | evidence) > 0.5``.

The gate has no multiplicative noise: ``sample(n)`` is the current 0/1 decision
(or all ones with ``mask_in_training=False``); the prior acts on the producers'
weights. A producer followed by a BatchNorm (given to :meth:`TurboVBIGate.attach`, or found
in a wrapped model by :func:`bind_batchnorms`) is judged and regularised through its
*folded* weights ``gamma_r w_r / sqrt(var_r + eps)``: BatchNorm makes the raw weights' scale
irrelevant to the output, so a prior on them would shrink them, unopposed, until BatchNorm's
eps kills the channel. Derivations, constants, experiments and our deviations from the paper:
``docs/methods.md`` (Turbo-VBI).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from onnxprune.bayes.gate import ChannelGate, Producer

__all__ = [
    "TurboVBIGate",
    "gamma_update",
    "log_evidence",
    "collapsed_log_evidence",
    "collapsed_precision",
    "support_update",
    "chain_messages",
    "log_prior_partition",
    "support_messages",
    "SupportMessages",
    "find_batchnorms",
    "bind_batchnorms",
]

F64 = torch.float64
_LAM_MAX = 1e6  # |log evidence| cap: probabilities are 0/1 to float64 long before


# ---------------------------------------------------------------------------
# Module A: q(rho) and q(s) of every unit given the prior message (closed forms)
# ---------------------------------------------------------------------------


def gamma_update(pi: Tensor, sq_norm: Tensor, n: int, a: float, b: float, a_bar: float, b_bar: float) -> tuple[Tensor, Tensor]:
    """q(rho) = Gamma(a_tilde, b_tilde) of every unit (mean field, paper's module A).

    ``a_tilde = pi a + (1 - pi) a_bar + n/2``, ``b_tilde = pi b + (1 - pi) b_bar + ||w||^2 / 2``
    with ``pi = q(s = 1)`` and ``n`` weights per unit.
    """
    a_t = pi * a + (1.0 - pi) * a_bar + 0.5 * n
    b_t = pi * b + (1.0 - pi) * b_bar + 0.5 * sq_norm
    return a_t, b_t


def log_evidence(a_t: Tensor, b_t: Tensor, a: float, b: float, a_bar: float, b_bar: float) -> Tensor:
    """Module A -> B message: ``log l = E[log Gamma(rho; a, b)] - E[log Gamma(rho; a_bar, b_bar)]`` under
    ``q(rho) = Gamma(a_t, b_t)``, with ``E[rho] = a_t / b_t`` and ``E[log rho] = digamma(a_t) - log b_t``.

    ``= (a log b - lgamma a) - (a_bar log b_bar - lgamma a_bar) + (a - a_bar) E[log rho] - (b - b_bar) E[rho]``.
    """
    e_rho = a_t / b_t
    const = (a * math.log(b) - math.lgamma(a)) - (a_bar * math.log(b_bar) - math.lgamma(a_bar))
    lam = const - (b - b_bar) * e_rho
    if a != a_bar:
        lam = lam + (a - a_bar) * (torch.special.digamma(a_t) - torch.log(b_t))
    return lam.clamp(-_LAM_MAX, _LAM_MAX)


def _student_log_constant(a: float, b: float, n: int) -> float:
    """``a log b - lgamma a + lgamma(a + n/2)``: the constant of log p(w) for n weights of precision Gamma(a, b)."""
    return a * math.log(b) - math.lgamma(a) + math.lgamma(a + 0.5 * n)


def collapsed_log_evidence(sq_norm: Tensor, n: int, a: float, b: float, a_bar: float, b_bar: float) -> Tensor:
    """``log p(w | s = 1) - log p(w | s = 0)`` with rho integrated out (Student-t marginals):
    ``[a log b - lgamma a + lgamma(a + n/2) - (a + n/2) log(b + ||w||^2/2)] - [same with a_bar, b_bar]``."""
    h = 0.5 * sq_norm
    const = _student_log_constant(a, b, n) - _student_log_constant(a_bar, b_bar, n)
    lam = const - (a + 0.5 * n) * torch.log(b + h) + (a_bar + 0.5 * n) * torch.log(b_bar + h)
    return lam.clamp(-_LAM_MAX, _LAM_MAX)


def collapsed_precision(pi: Tensor, sq_norm: Tensor, n: int, a: float, b: float, a_bar: float, b_bar: float) -> Tensor:
    """E[rho] under q(s) q(rho | s), q(rho | s) = Gamma(a_s + n/2, b_s + ||w||^2/2)."""
    h = 0.5 * sq_norm
    return pi * (a + 0.5 * n) / (b + h) + (1.0 - pi) * (a_bar + 0.5 * n) / (b_bar + h)


def support_update(prior_logit: Tensor, lam: Tensor) -> Tensor:
    """Module A's ``q(s = 1)``: normalise(prior message x evidence) = sigmoid(prior log-odds + log l)."""
    return torch.sigmoid(prior_logit + lam)


# ---------------------------------------------------------------------------
# Module B: sum-product on the support MRF (hub + chains), exact by cutset conditioning
# ---------------------------------------------------------------------------


def _log_probs(p: float) -> tuple[float, float]:
    """(log(1 - p), log p) with log 0 = -inf."""
    return (math.log1p(-p) if p < 1.0 else -math.inf), (math.log(p) if p > 0.0 else -math.inf)


def chain_messages(lam: Tensor, *, p_stay: float, p_start: float, eps: float) -> tuple[Tensor, Tensor]:
    """Forward-backward on ``R`` independent chains of length ``J``, for both hub states at once.

    ``lam`` [R, J] (float64) is the log evidence ratio of every unit (state 1 vs state 0).
    Chain prior: ``P(s_0 = 1) = p_start``, ``P(s_j = s_{j-1}) = p_stay``; unary potential
    ``psi(t, s) * l^s`` with ``psi(0, 1) = eps`` and 1 otherwise.

    Returns ``log_f`` [2, R] (``log sum_s chain(s) prod_j psi(t, s_j) l_j^{s_j}`` for t = 0, 1)
    and ``cav`` [2, R, J, 2]: ``log P(s_j = s | t, all evidence) - lam_j s``, i.e. the
    chain's posterior of unit j given t with unit j's own evidence divided out.

    Exact, in log space. The chain is cut into ``K`` blocks of ``B ~ sqrt(J)`` units: block
    transfer matrices (a loop over B, vectorised over blocks), a pass over the blocks (a loop
    over K), then the messages inside every block (loops over B): O(R J) work in O(sqrt J)
    vectorised steps. Padding units at the end of a chain have no potential; they
    marginalise out exactly (the transition rows sum to one).
    """
    if lam.dim() != 2:
        raise ValueError(f"lam must be [R, J], got shape {tuple(lam.shape)}")
    chain = _BlockedChain.of(lam.to(F64), p_stay, p_start, eps)
    m0, m1 = chain.block_transfer()
    log_f, into, out_of = chain.boundary_messages(m0, m1)
    return log_f, chain.cavities(log_f, into, out_of)


@dataclass
class _BlockedChain:
    """The chains of :func:`chain_messages`, cut into ``K`` blocks of ``B`` units (``Jp = K * B`` with padding)."""

    R: int
    J: int
    B: int
    K: int
    lsw: float  # log P(switch)
    lst: float  # log P(stay)
    log_eps: float
    u1: Tensor  # unary of state 1 per hub state (state 0's is 0 for both t): [2, R, K, B]
    first: Tensor  # transition into the first unit of each block, from the previous unit (state a): [K, 2(a), 2(s)]

    @classmethod
    def of(cls, lam: Tensor, p_stay: float, p_start: float, eps: float) -> _BlockedChain:
        R, J = lam.shape
        dev = lam.device
        B = max(1, math.isqrt(J - 1) + 1) if J > 1 else 1
        K = -(-J // B)
        lsw, lst = _log_probs(p_stay)
        l0, l1 = _log_probs(p_start)
        log_eps = math.log(eps)
        u1 = torch.zeros((2, R, K * B), dtype=F64, device=dev)
        u1[0, :, :J] = lam + log_eps
        u1[1, :, :J] = lam
        first = torch.tensor([[lst, lsw], [lsw, lst]], dtype=F64, device=dev).expand(K, 2, 2).clone()
        first[0] = torch.tensor([[l0, l1], [l0, l1]], dtype=F64, device=dev)  # chain start: P(s_0), whatever a
        return cls(R, J, B, K, lsw, lst, log_eps, u1.view(2, R, K, B), first)

    def block_transfer(self) -> tuple[Tensor, Tensor]:
        """Phase 1: every block's transfer matrix M_k[a, s] (a: the state before the block, s: its last
        unit's), as (M[a, 0], M[a, 1]), each [2, R, K, 2(a)]."""
        lst, lsw, u1 = self.lst, self.lsw, self.u1
        m0 = self.first[:, :, 0].expand(2, self.R, self.K, 2).clone()
        m1 = self.first[:, :, 1] + u1[..., 0].unsqueeze(-1)
        for i in range(1, self.B):
            n0 = torch.logaddexp(m0 + lst, m1 + lsw)
            n1 = torch.logaddexp(m0 + lsw, m1 + lst) + u1[..., i].unsqueeze(-1)
            m0, m1 = n0, n1
        return m0, m1

    def boundary_messages(self, m0: Tensor, m1: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Phase 2: ``log_f`` [2, R], the forward messages into every block and the backward ones into
        every block's last unit (each a pair over the state, [2, R, K])."""
        dev = m0.device
        # forward: v_k(a) = log-message into block k (state of the unit before it); v_0 = (0, -inf): a dummy start
        v0 = torch.zeros((2, self.R), dtype=F64, device=dev)
        v1 = torch.tensor(-math.inf, dtype=F64, device=dev).expand(2, self.R)
        ins0, ins1 = [], []
        for k in range(self.K):
            ins0.append(v0)
            ins1.append(v1)
            v0, v1 = (
                torch.logaddexp(v0 + m0[:, :, k, 0], v1 + m0[:, :, k, 1]),
                torch.logaddexp(v0 + m1[:, :, k, 0], v1 + m1[:, :, k, 1]),
            )
        log_f = torch.logaddexp(v0, v1)
        # backward: w_k(s) = log-message into the last unit of block k from everything after it
        w0 = torch.zeros((2, self.R), dtype=F64, device=dev)
        w1 = torch.zeros((2, self.R), dtype=F64, device=dev)
        outs0, outs1 = [w0] * self.K, [w1] * self.K
        for k in range(self.K - 1, 0, -1):
            w0, w1 = (
                torch.logaddexp(m0[:, :, k, 0] + w0, m1[:, :, k, 0] + w1),
                torch.logaddexp(m0[:, :, k, 1] + w0, m1[:, :, k, 1] + w1),
            )
            outs0[k - 1], outs1[k - 1] = w0, w1
        into = (torch.stack(ins0, -1), torch.stack(ins1, -1))
        return log_f, into, (torch.stack(outs0, -1), torch.stack(outs1, -1))

    def cavities(self, log_f: Tensor, into: tuple[Tensor, Tensor], out_of: tuple[Tensor, Tensor]) -> Tensor:
        """Phase 3: the messages inside the blocks (vectorised over blocks), combined into ``cav`` [2, R, J, 2]."""
        lst, lsw, u1, first = self.lst, self.lsw, self.u1, self.first
        pre0, pre1 = [], []  # forward message into unit i, before its unary
        a0, a1 = into
        for i in range(self.B):
            if i == 0:
                p0 = torch.logaddexp(a0 + first[:, 0, 0], a1 + first[:, 1, 0])
                p1 = torch.logaddexp(a0 + first[:, 0, 1], a1 + first[:, 1, 1])
            else:
                p0 = torch.logaddexp(a0 + lst, a1 + lsw)
                p1 = torch.logaddexp(a0 + lsw, a1 + lst)
            pre0.append(p0)
            pre1.append(p1)
            a0, a1 = p0, p1 + u1[..., i]
        post0, post1 = [None] * self.B, [None] * self.B  # backward message into unit i from the units after it
        b0, b1 = out_of
        post0[self.B - 1], post1[self.B - 1] = b0, b1
        for i in range(self.B - 1, 0, -1):
            c1 = u1[..., i] + b1
            b0, b1 = torch.logaddexp(lst + b0, lsw + c1), torch.logaddexp(lsw + b0, lst + c1)
            post0[i - 1], post1[i - 1] = b0, b1
        R, J, Jp = self.R, self.J, self.K * self.B
        lf = log_f.view(2, R, 1, 1)
        psi1 = torch.tensor([self.log_eps, 0.0], dtype=F64, device=log_f.device).view(2, 1, 1, 1)
        cav0 = (torch.stack(pre0, -1) + torch.stack(post0, -1) - lf).reshape(2, R, Jp)[:, :, :J]
        cav1 = (torch.stack(pre1, -1) + torch.stack(post1, -1) + psi1 - lf).reshape(2, R, Jp)[:, :, :J]
        return torch.stack((cav0, cav1), -1)


@functools.lru_cache(maxsize=4096)
def log_prior_partition(J: int, p_stay: float, p_start: float, eps: float) -> float:
    """``log sum_s chain(s) prod_j psi(0, s_j)``: the normaliser of a length-J chain's
    conditional prior given an inactive hub (the active hub's is 1: psi(1, .) = 1)."""
    if J < 1:
        return 0.0
    log_f, _ = chain_messages(torch.zeros((1, J), dtype=F64), p_stay=p_stay, p_start=p_start, eps=eps)
    return float(log_f[0, 0])


@dataclass
class SupportMessages:
    """Module B's output.

    ``channel_logit`` [C]: log P(t_c = 1 | evidence) - log P(t_c = 0 | evidence) (the prior
    logit for channels without units); ``covered`` [C]: channels with at least one unit;
    ``prior_logit``: per producer [R, J], the extrinsic B -> A message as a log-odds
    (B's marginal of s divided by A's evidence); the full marginal's log-odds is
    ``prior_logit + lam``.
    """

    channel_logit: Tensor
    covered: Tensor
    prior_logit: list[Tensor]


def support_messages(
    lams: list[Tensor],
    positions: list[Tensor],
    num_channels: int,
    *,
    p_channel: float,
    p_stay: float,
    p_start: float,
    eps: float,
) -> SupportMessages:
    """Exact marginals of the support MRF given every unit's evidence (module B).

    The field: for each channel c a hub t_c with prior ``P(t_c = 1) = p_channel``; given
    t_c, the chains of c (one per producer row mapped to c, ``positions[l][r] = c``) are
    independent, each with the conditional prior ``chain(s) prod_j psi(t_c, s_j) / Z0_t``
    (normalised, so that p_channel is the hub's actual prior marginal). Cutset
    conditioning on t_c: ``P(t_c | E) ∝ prior(t_c) prod_chains F_t / Z0_t`` and
    ``P(s | E) = sum_t P(t | E) P(s | t, E)``, with F_t and P(s | t, E) from
    :func:`chain_messages`.
    """
    dev = lams[0].device if lams else torch.device("cpu")
    lq, lp = _log_probs(p_channel)
    logit = torch.full((num_channels,), lp - lq, dtype=F64, device=dev)
    covered = torch.zeros(num_channels, dtype=torch.bool, device=dev)
    results = []
    for lam, pos in zip(lams, positions):
        R, J = lam.shape
        if R == 0 or J == 0:
            results.append(None)
            continue
        log_f, cav = chain_messages(lam, p_stay=p_stay, p_start=p_start, eps=eps)
        z0 = log_prior_partition(J, p_stay, p_start, eps)
        logit.index_add_(0, pos, log_f[1] - (log_f[0] - z0))
        covered[pos] = True
        results.append(cav)
    log_w1 = torch.nn.functional.logsigmoid(logit)  # log P(t = 1 | E)
    log_w0 = torch.nn.functional.logsigmoid(-logit)
    prior_logits = []
    for lam, pos, cav in zip(lams, positions, results):
        if cav is None:
            prior_logits.append(torch.zeros_like(lam, dtype=F64))
            continue
        lw = torch.stack((log_w0[pos], log_w1[pos])).view(2, -1, 1)  # [2, R, 1]
        ext0 = torch.logsumexp(cav[..., 0] + lw, dim=0)
        ext1 = torch.logsumexp(cav[..., 1] + lw, dim=0)
        prior_logits.append(ext1 - ext0)
    return SupportMessages(logit, covered, prior_logits)


# ---------------------------------------------------------------------------
# Producers followed by BatchNorm: the prior acts on the folded (effective) weights
# ---------------------------------------------------------------------------


def _check_norm(norm: nn.Module, weight: Tensor) -> None:
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        raise ValueError(f"a producer's norm must be a BatchNorm module, got {type(norm).__name__}")
    if norm.num_features != weight.shape[0]:
        raise ValueError(f"BatchNorm of {norm.num_features} features after a producer of {weight.shape[0]} rows")
    if norm.running_var is None:
        raise ValueError("the producer's BatchNorm keeps no running statistics (track_running_stats=False)")


@torch.no_grad()
def _fold_scale(norm: nn.Module, rows: Tensor) -> Tensor:
    """``gamma_r / sqrt(running_var_r + eps)`` of the given rows (float64, no grad): the factor that
    folds the BatchNorm after a producer into the producer's rows (gamma = 1 without affine)."""
    rows = rows.to(norm.running_var.device)
    scale = torch.rsqrt(norm.running_var.detach().index_select(0, rows).to(F64) + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.detach().index_select(0, rows).to(F64)
    return torch.nan_to_num(scale, nan=0.0, posinf=1e150, neginf=-1e150)


def _folded_rows(w: Tensor, norm: nn.Module, rows: Tensor) -> Tensor:
    """The effective weights ``gamma_r w_r / sigma_r`` of rows ``w`` [R, J, n] (taken from the
    producer at ``rows``), differentiable in ``w`` and ``gamma``.

    ``sigma_r = sqrt(running_var_r + eps)`` is written ``||w_r|| * (sigma_r / ||w_r||)`` with the
    second factor held constant: the channel's pre-BatchNorm standard deviation is a norm of
    ``w_r`` (``sqrt(w_r' Sigma_x w_r)``, Sigma_x the covariance of the layer's input patches),
    so only the input distribution and the row's direction are frozen between steps, as E[rho]
    is. The value is exactly the folded weight; the gradient on ``w_r`` is orthogonal to ``w_r``.
    """
    dtype = w.dtype
    r = rows.to(w.device)
    var = norm.running_var.detach().index_select(0, r.to(norm.running_var.device)).to(device=w.device, dtype=dtype)
    norms = w.reshape(w.shape[0], -1).norm(dim=1)
    ratio = norms.detach().clamp_min(1e-30) / norms.clamp_min(1e-30)  # 1 in value; d/dw: -w / ||w||^2
    scale = ratio * torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.index_select(0, r.to(norm.weight.device)).to(device=w.device, dtype=dtype)
    return w * scale.reshape(-1, 1, 1)


def find_batchnorms(wrapped) -> dict[int, nn.Module]:
    """``id(producer weight) -> BatchNorm`` for every Conv/Linear of a wrapped model (a
    :class:`~onnxprune.bayes.wrapper.BayesianModel`) whose output feeds only a BatchNorm of as
    many features: the layers whose output scale that BatchNorm removes in training."""
    gm = wrapped.model
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        layer = gm.get_submodule(node.target)
        weight = getattr(layer, "weight", None)
        if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) or weight is None:
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or len(users[0].all_input_nodes) != 1:
            continue
        norm = gm.get_submodule(users[0].target)
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.num_features == weight.shape[0] and norm.running_var is not None:
            found[id(weight)] = norm
    return found


def bind_batchnorms(wrapped) -> int:
    """Give every Turbo-VBI gate of ``wrapped`` the BatchNorm after each of its producers
    (:func:`find_batchnorms`), so that its prior acts on the folded weights; the gates are
    re-attached (their state restarts from the current weights). Returns the producers bound."""
    norms = find_batchnorms(wrapped)
    return sum(gate.bind_found_norms(norms) for gate in wrapped.gates.values() if isinstance(gate, TurboVBIGate))


# ---------------------------------------------------------------------------
# The gate
# ---------------------------------------------------------------------------


_STATE = ("pi", "prior_logit", "sq_norm", "erho")  # per unit, float64
_STRUCT = ("rows", "positions", "hyper")  # per producer
_SCALES = ("attach", "he", "empirical")


def _check_precisions(*, a: float, a_bar: float, b: float | None, b_bar: float | None, active_precision: float | str,
                      inactive_precision: float, min_precision_ratio: float) -> None:
    """Refuse precision-prior options out of range (see :class:`TurboVBIGate`)."""
    for name, v in (("a", a), ("a_bar", a_bar), ("inactive_precision", inactive_precision),
                    ("min_precision_ratio", min_precision_ratio)):
        if not v > 0:
            raise ValueError(f"{name} must be > 0, got {v}")
    for name, v in (("b", b), ("b_bar", b_bar)):
        if v is not None and not v > 0:
            raise ValueError(f"{name} must be > 0, got {v}")
    if isinstance(active_precision, str):
        if active_precision not in _SCALES:
            raise ValueError(f"active_precision must be a number or one of {_SCALES}, got {active_precision!r}")
    elif not float(active_precision) > 0:
        raise ValueError(f"active_precision must be > 0, got {active_precision}")


def _check_support_prior(*, p_channel: float, p_stay: float, p_start: float, eps: float) -> None:
    """Refuse support-MRF options out of range (see :class:`TurboVBIGate`)."""
    if not 0.0 < p_channel <= 1.0:
        raise ValueError(f"p_channel must lie in (0, 1], got {p_channel}")
    if not 0.0 < p_stay < 1.0:
        raise ValueError(f"p_stay must lie in (0, 1), got {p_stay}")
    if not 0.0 < p_start < 1.0:
        raise ValueError(f"p_start must lie in (0, 1), got {p_start}")
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"eps must lie in (0, 1], got {eps}")


class TurboVBIGate(ChannelGate):
    """Per-channel Turbo-VBI gate: a support posterior over the kernels of every channel.

    Construct with ``num_channels``; the wrapper then calls :meth:`attach` with the
    producers' weights and :meth:`after_wrap` (binds the BatchNorms, :func:`bind_batchnorms`),
    ``fit`` :meth:`after_step` after every optimizer step (the A <-> B updates run every
    ``update_every`` steps) and :meth:`begin_epoch` (no schedule: it records the epoch).
    Without producers the gate keeps every channel and its :meth:`kl` is zero.

    Hyper-parameters (derivations and the experiments behind the defaults:
    ``docs/methods.md`` (Turbo-VBI)):

    * ``a``, ``a_bar``: Gamma shapes of the active / inactive precision prior (1 and 1,
      as in the authors' code; ``a_bar=None`` means ``a``);
    * ``active_precision``: the active prior's mean precision ``m1 = a / b`` per producer:
      ``"empirical"`` (default: 1 / the mean square of the producer's gated rows at
      :meth:`attach`, then one EM step per update), ``"attach"`` (measured at attach,
      then fixed), ``"he"`` (``fan_in / 2``) or a number; all-zero rows fall back to He.
      ``inactive_precision`` (1e6): the inactive mean ``m0 = a_bar / b_bar``, raised to
      ``min_precision_ratio`` (100) times ``m1`` where needed; ``b`` / ``b_bar`` set the
      rates directly instead (and disable the EM step);
    * ``p_channel`` 0.5, ``p_stay`` 0.9, ``p_start`` 0.5, ``eps`` 1e-3: the support MRF;
    * ``evidence``: ``"collapsed"`` (default: module A's evidence with rho integrated out,
      exact given the weights) or ``"mean_field"`` (the paper's q(s) q(rho) updates);
    * ``update_every`` (50) optimizer steps between updates; ``turbo_iterations`` (5) A <-> B
      rounds per update in mean-field mode (``attach_iterations``, 20, at attach), stopping
      once q(s) moves by less than ``tol`` (1e-6); collapsed mode needs one round;
    * ``mask_in_training`` (True): :meth:`sample` returns the current 0/1 decision, so that
      training sees the network evaluation and export will see; False: all ones;
    * ``prior_weight`` (1.0): multiplies the regulariser returned by :meth:`kl`;
    * ``fold_norms`` (True): :meth:`after_wrap` gives this gate the BatchNorm after each
      producer (prior on the folded weights); False keeps the prior on the raw weights.
    """

    def __init__(
        self,
        num_channels: int,
        *,
        a: float = 1.0,
        a_bar: float | None = None,
        b: float | None = None,
        b_bar: float | None = None,
        active_precision: float | str | None = "empirical",
        inactive_precision: float = 1e6,
        min_precision_ratio: float = 100.0,
        p_channel: float = 0.5,
        p_stay: float = 0.9,
        p_start: float = 0.5,
        eps: float = 1e-3,
        evidence: str = "collapsed",
        update_every: int = 50,
        turbo_iterations: int = 5,
        attach_iterations: int = 20,
        tol: float = 1e-6,
        mask_in_training: bool = True,
        prior_weight: float = 1.0,
        fold_norms: bool = True,
    ) -> None:
        super().__init__()
        if int(num_channels) != num_channels or num_channels < 1:
            raise ValueError(f"num_channels must be a positive integer, got {num_channels!r}")
        a_bar = a if a_bar is None else a_bar
        active_precision = "empirical" if active_precision is None else active_precision
        _check_precisions(a=a, a_bar=a_bar, b=b, b_bar=b_bar, active_precision=active_precision,
                          inactive_precision=inactive_precision, min_precision_ratio=min_precision_ratio)
        _check_support_prior(p_channel=p_channel, p_stay=p_stay, p_start=p_start, eps=eps)
        if evidence not in ("collapsed", "mean_field"):
            raise ValueError(f"evidence must be 'collapsed' or 'mean_field', got {evidence!r}")
        if int(update_every) < 1 or int(turbo_iterations) < 1 or int(attach_iterations) < 1:
            raise ValueError("update_every, turbo_iterations and attach_iterations must be >= 1")
        if not prior_weight >= 0:
            raise ValueError(f"prior_weight must be >= 0, got {prior_weight}")
        self.num_channels = int(num_channels)
        self.a, self.a_bar = float(a), float(a_bar)
        self.b = None if b is None else float(b)
        self.b_bar = None if b_bar is None else float(b_bar)
        self.active_precision = active_precision if isinstance(active_precision, str) else float(active_precision)
        self.inactive_precision = float(inactive_precision)
        self.min_precision_ratio = float(min_precision_ratio)
        self.p_channel, self.p_stay, self.p_start, self.eps = float(p_channel), float(p_stay), float(p_start), float(eps)
        self.evidence = evidence
        self.update_every = int(update_every)
        self.turbo_iterations = int(turbo_iterations)
        self.attach_iterations = int(attach_iterations)
        self.tol = float(tol)
        self.mask_in_training = bool(mask_in_training)
        self.prior_weight = float(prior_weight)
        self.fold_norms = bool(fold_norms)
        self.register_buffer("active_prob", torch.ones(self.num_channels, dtype=F64))
        self.register_buffer("channel_logit", torch.full((self.num_channels,), math.inf, dtype=F64))
        self.register_buffer("covered", torch.zeros(self.num_channels, dtype=torch.bool))
        self._weights: list[Tensor] = []  # the producers' live Parameters (a plain list: not registered here)
        self._norms: list[nn.Module | None] = []  # the BatchNorm after each producer, or None (not registered here)
        self._axes: list[int] = []  # each producer's axis of output channels (1: a weight stored [in, out])
        self._num_producers = 0
        self._steps = 0
        self._epoch = 0
        self._restored = False  # per-producer state loaded before attach(): kept by attach()
        self._erho_cache: dict[int, Tensor] = {}
        self.last_iterations = 0  # A <-> B rounds run by the last update (diagnostics)

    # -- structure -----------------------------------------------------------

    @property
    def attached(self) -> bool:
        """True once :meth:`attach` bound at least one producer."""
        return self._num_producers > 0 and len(self._weights) == self._num_producers

    def _buf(self, name: str, l: int) -> Tensor:
        return getattr(self, f"{name}_{l}")

    @staticmethod
    def _units(weight: Tensor) -> tuple[int, int]:
        """(J, n): input channels per output row and weights per kernel unit."""
        if weight.dim() <= 1:
            return 1, 1
        n = 1
        for d in weight.shape[2:]:
            n *= int(d)
        return int(weight.shape[1]), n

    def _rates(self, m1: float) -> tuple[float, float]:
        """(b, b_bar) for an active mean precision m1."""
        m0 = max(self.inactive_precision, self.min_precision_ratio * m1)
        b = self.b if self.b is not None else self.a / m1
        b_bar = self.b_bar if self.b_bar is not None else self.a_bar / m0
        return b, b_bar

    def _hyper(self, weight: Tensor, rows: Tensor, norm: nn.Module | None = None) -> tuple[float, float, float, float]:
        """(a, b, a_bar, b_bar) of a producer, from ``active_precision`` (measured on the
        effective weights: BatchNorm-folded where the producer has a norm)."""
        J, n = self._units(weight)
        he = max(J * n, 1) / 2.0  # He: Var[w] = 2 / fan_in
        if isinstance(self.active_precision, float):
            m1 = self.active_precision
        elif self.active_precision == "he" or rows.numel() == 0:
            m1 = he
        else:  # "attach", "empirical": 1 / the typical weight variance now
            with torch.no_grad():
                w = weight.detach().index_select(0, rows).to(F64)
                if norm is not None:
                    w = w * _fold_scale(norm, rows).to(w.device).reshape([-1] + [1] * (w.dim() - 1))
                ms = float(w.square().mean())
            # all (near) zero: no scale to measure, fall back to He
            m1 = 1.0 / ms if math.isfinite(ms) and ms > 1e-6 / he else he
        b, b_bar = self._rates(m1)
        return self.a, b, self.a_bar, b_bar

    def _drop_structure(self) -> None:
        l = 0
        while any(hasattr(self, f"{name}_{l}") for name in _STATE + _STRUCT):
            for name in _STATE + _STRUCT:
                if hasattr(self, f"{name}_{l}"):
                    delattr(self, f"{name}_{l}")
            l += 1
        self._num_producers = 0
        self._weights = []
        self._norms = []
        self._axes = []
        self._erho_cache = {}

    def _weight(self, l: int) -> Tensor:
        """Producer l's live weight with its output channels first (a view of a weight stored [in, out])."""
        weight, axis = self._weights[l], self._axes[l] if l < len(self._axes) else 0
        return weight.movedim(axis, 0) if axis else weight

    def _producer(self, item: tuple) -> Producer:
        """One producer of :meth:`attach` as a :class:`~onnxprune.bayes.gate.Producer`, checked."""
        if len(item) not in (3, 4, 5):
            raise ValueError(f"a producer is (weight, rows, positions[, norm[, channel_axis]]), got {len(item)} items")
        weight, rows, positions, norm, axis = Producer(*item)
        if axis not in (0, 1) or axis >= weight.dim():
            raise ValueError(f"a producer's channel_axis must be 0 or 1 (an axis of its weight), got {axis}")
        channels_first = weight.movedim(axis, 0)
        if norm is not None:
            _check_norm(norm, channels_first)
        rows = torch.as_tensor(rows).to(device=weight.device, dtype=torch.long).reshape(-1)
        positions = torch.as_tensor(positions).to(device=weight.device, dtype=torch.long).reshape(-1)
        if rows.shape != positions.shape:
            raise ValueError(f"rows and positions differ in length: {rows.numel()} vs {positions.numel()}")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= channels_first.shape[0]):
            raise ValueError(f"rows out of range for a weight with {channels_first.shape[0]} output channels")
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= self.num_channels):
            raise ValueError(f"positions out of range for a gate of {self.num_channels} channels")
        return Producer(weight, rows, positions, norm, int(axis))

    def _register_producer(self, l: int, weight: Tensor, rows: Tensor, positions: Tensor, norm: nn.Module | None,
                           old: dict[str, Tensor]) -> None:
        """Producer ``l``'s buffers: its rows and positions, its hyper-parameters and per-unit state
        (taken from ``old`` where a restored state holds them, else fresh)."""
        J, _ = self._units(weight)
        dev = weight.device
        self.register_buffer(f"rows_{l}", rows.clone())
        self.register_buffer(f"positions_{l}", positions.clone())
        hyper = old.get(f"hyper_{l}")
        if hyper is None:
            hyper = torch.tensor(self._hyper(weight, rows, norm), dtype=F64, device=dev)
        self.register_buffer(f"hyper_{l}", hyper.to(dev))
        for name in _STATE:
            value = old.get(f"{name}_{l}")
            if value is None:
                value = torch.zeros((rows.numel(), J), dtype=F64, device=dev)
            self.register_buffer(f"{name}_{l}", value.to(dev))

    def attach(self, producers) -> TurboVBIGate:
        """Bind the producers: ``[(weight Parameter, rows LongTensor, positions LongTensor[, norm[, channel_axis]]), ...]``
        (or :class:`~onnxprune.bayes.gate.Producer`).

        ``channel_axis`` (optional, 0): the weight's axis of output channels; 1 for a weight stored [in, out]
        (transformers' Conv1D), whose rows below are then its columns.

        ``norm`` (optional): the BatchNorm that normalises the producer's output (its only
        user); the prior then acts on the folded weights ``gamma_r w_r / sqrt(running_var_r + eps)``
        (see :meth:`kl` and ``docs/methods.md``).

        ``rows``: the producer's output rows (first weight axis) that belong to this gate;
        ``positions``: for each, its channel index in this gate. Allocates the per-unit
        state (float64 buffers ``pi_l`` = q(s = 1), ``prior_logit_l`` = the B -> A message,
        ``sq_norm_l`` = ||w||^2 and ``erho_l`` = E[rho] at the last update, each
        [len(rows), J_l]; per producer ``rows_l``, ``positions_l`` and ``hyper_l`` = (a, b,
        a_bar, b_bar)) and runs the first update with the current weights, unless a state
        of the same shapes was loaded before (then that state is kept). Returns self.
        """
        checked = [self._producer(item) for item in list(producers)]
        specs = [(p.weight.movedim(p.channel_axis, 0), p.rows, p.positions) for p in checked]  # channels first
        norms = [p.norm for p in checked]
        restored = self._restored and self._num_producers == len(specs) and all(
            tuple(self._buf("pi", l).shape) == (rows.numel(), self._units(weight)[0]) for l, (weight, rows, _) in enumerate(specs)
        )
        old = {f"{name}_{l}": self._buf(name, l) for l in range(len(specs)) for name in _STATE + ("hyper",)} if restored else {}
        self._drop_structure()
        self._restored = False
        for l, (weight, rows, positions) in enumerate(specs):
            self._register_producer(l, weight, rows, positions, norms[l], old)
        self._weights = [p.weight for p in checked]
        self._norms = norms
        self._axes = [p.channel_axis for p in checked]
        self._num_producers = len(specs)
        if restored:
            return self
        if not specs:
            self.active_prob.fill_(1.0)
            self.channel_logit.fill_(math.inf)
            self.covered.fill_(False)
            return self
        self._initialise()
        self.update(iterations=self.attach_iterations)
        return self

    def bind_norms(self, norms) -> int:
        """Re-attach the same producers with ``norms`` (one BatchNorm or None per producer, in
        attach order): their prior then acts on the folded weights. Returns the norms bound."""
        norms = list(norms)
        if len(norms) != self._num_producers or not self.attached:
            raise ValueError(f"bind_norms needs one entry per attached producer ({self._num_producers}), got {len(norms)}")
        producers = [Producer(self._weights[l], self._buf("rows", l), self._buf("positions", l), norms[l], self._axes[l])
                     for l in range(self._num_producers)]
        self._restored = False
        self.attach(producers)
        return sum(n is not None for n in norms)

    def bind_found_norms(self, norms: dict[int, nn.Module]) -> int:
        """:meth:`bind_norms` with the BatchNorm ``norms`` maps each producer's weight (by id) to, if any
        (:func:`find_batchnorms`); nothing when unattached or ``fold_norms`` is off. Returns the norms bound."""
        if not (self.attached and self.fold_norms):
            return 0
        return self.bind_norms([norms.get(id(w)) for w in self._weights])

    def after_wrap(self, wrapped: nn.Module) -> None:
        """Bind the BatchNorm after each producer in the wrapped model (see :func:`bind_batchnorms`), so that the
        prior acts on the folded weights before any checkpoint is loaded or any step is taken."""
        self.bind_found_norms(find_batchnorms(wrapped))

    def folded(self) -> list[bool]:
        """Per producer: whether its prior acts on BatchNorm-folded weights."""
        return [n is not None for n in self._norms] + [False] * (self._num_producers - len(self._norms))

    @torch.no_grad()
    def _initialise(self) -> None:
        """q(s) at the support prior's marginal (module B without evidence)."""
        msg = self._module_b([torch.zeros_like(self._buf("pi", l)) for l in range(self._num_producers)])
        for l in range(self._num_producers):
            self._buf("prior_logit", l).copy_(msg.prior_logit[l])
            self._buf("pi", l).copy_(torch.sigmoid(msg.prior_logit[l]))

    # -- the Turbo-VBI updates --------------------------------------------------

    def _hyper_values(self, l: int) -> tuple[float, float, float, float]:
        a, b, a_bar, b_bar = (float(x) for x in self._buf("hyper", l).tolist())
        return a, b, a_bar, b_bar

    def _sq_norms(self, l: int) -> tuple[Tensor, int]:
        """||w||^2 of every unit of producer l (float64, no grad; finite) and n, weights per unit."""
        weight = self._weight(l).detach()
        rows = self._buf("rows", l)
        J, n = self._units(weight)
        w = weight.index_select(0, rows.to(weight.device)).to(F64).reshape(rows.numel(), J, n)
        norm = self._norms[l] if l < len(self._norms) else None
        if norm is not None:  # the BatchNorm-folded weights gamma w / sqrt(running_var + eps)
            w = w * _fold_scale(norm, rows).to(w.device).reshape(-1, 1, 1)
        sq = torch.nan_to_num(w.square().sum(-1), nan=0.0, posinf=1e300).clamp(max=1e300)
        return sq.to(self._buf("pi", l).device), n

    def _evidence(self, l: int, pi: Tensor, sq: Tensor, n: int) -> Tensor:
        a, b, a_bar, b_bar = self._hyper_values(l)
        if self.evidence == "collapsed":
            return collapsed_log_evidence(sq, n, a, b, a_bar, b_bar)
        a_t, b_t = gamma_update(pi, sq, n, a, b, a_bar, b_bar)
        return log_evidence(a_t, b_t, a, b, a_bar, b_bar)

    def _precision(self, l: int, pi: Tensor, sq: Tensor, n: int) -> Tensor:
        a, b, a_bar, b_bar = self._hyper_values(l)
        if self.evidence == "collapsed":
            return collapsed_precision(pi, sq, n, a, b, a_bar, b_bar)
        a_t, b_t = gamma_update(pi, sq, n, a, b, a_bar, b_bar)
        return a_t / b_t

    def _em_scale(self, l: int, sq: Tensor, n: int) -> None:
        """``active_precision="empirical"``: one EM step for the active rate b (shape a fixed):
        ``m1 = a / b = sum pi E[rho | s=1, w] / sum pi`` with ``E[rho | s=1, w] = (a + n/2) / (b + ||w||^2/2)``;
        skipped while the active mass ``sum pi`` is below max(1, 1 % of the units), and kept
        within [1e-6, 1e6] times He's ``fan_in / 2``."""
        a, b, a_bar, _ = self._hyper_values(l)
        pi = self._buf("pi", l)
        mass = float(pi.sum())
        if not mass >= max(1.0, 0.01 * pi.numel()):
            return  # (almost) no active unit to measure the active scale on: keep it
        m1 = float((pi * (a + 0.5 * n) / (b + 0.5 * sq)).sum()) / mass
        J = pi.shape[1]
        he = max(J * n, 1) / 2.0
        if math.isfinite(m1) and m1 > 0:
            b, b_bar = self._rates(min(max(m1, 1e-6 * he), 1e6 * he))
            self._buf("hyper", l).copy_(torch.tensor([a, b, a_bar, b_bar], dtype=F64))

    def _module_b(self, lams: list[Tensor]) -> SupportMessages:
        return support_messages(
            lams,
            [self._buf("positions", l) for l in range(self._num_producers)],
            self.num_channels,
            p_channel=self.p_channel,
            p_stay=self.p_stay,
            p_start=self.p_start,
            eps=self.eps,
        )

    @torch.no_grad()
    def update(self, iterations: int | None = None) -> int:
        """Run A <-> B rounds with the producers' current weights; returns the rounds run.

        One round: module A computes every unit's evidence (collapsed: from ||w||^2 alone;
        mean field: through q(rho), which depends on q(s)) and sends it to module B, which
        returns the extrinsic prior message and the hub posteriors; module A sets
        ``q(s) = sigmoid(prior message + evidence)``. Mean field repeats until q(s) moves by
        less than ``tol`` (at most ``iterations``, default ``turbo_iterations``); collapsed
        evidence does not depend on q(s), so its first round is already the fixed point.
        Finally ``E[rho]``, the regulariser's weight, is refreshed from the final q(s).
        """
        if not self.attached:
            return 0
        iterations = self.turbo_iterations if iterations is None else int(iterations)
        if self.evidence == "collapsed":
            iterations = 1
        L = self._num_producers
        norms = [self._sq_norms(l) for l in range(L)]
        if self.active_precision == "empirical" and self.b is None:
            for l in range(L):
                self._em_scale(l, *norms[l])
        msg = None
        done = 0
        for _ in range(iterations):
            lams = [self._evidence(l, self._buf("pi", l), *norms[l]) for l in range(L)]
            msg = self._module_b(lams)
            delta = 0.0
            for l in range(L):
                pi = support_update(msg.prior_logit[l], lams[l])
                if pi.numel():
                    delta = max(delta, float((pi - self._buf("pi", l)).abs().max()))
                self._buf("pi", l).copy_(pi)
                self._buf("prior_logit", l).copy_(msg.prior_logit[l])
            done += 1
            if delta < self.tol:
                break
        for l in range(L):
            sq, n = norms[l]
            self._buf("sq_norm", l).copy_(sq)
            self._buf("erho", l).copy_(self._precision(l, self._buf("pi", l), sq, n))
        if msg is not None:
            self.channel_logit.copy_(msg.channel_logit)
            self.covered.copy_(msg.covered)
            self.active_prob.copy_(torch.where(msg.covered, torch.sigmoid(msg.channel_logit), torch.ones_like(msg.channel_logit)))
        self._erho_cache = {}
        self.last_iterations = done
        return done

    def q_rho(self, l: int):
        """Producer l's q(rho) at the last update. Mean field: ``(a_tilde, b_tilde)``; collapsed:
        ``((a + n/2, b + ||w||^2/2), (a_bar + n/2, b_bar + ||w||^2/2))``, i.e. q(rho | s=1), q(rho | s=0)."""
        if l >= len(self._weights):
            raise RuntimeError("q_rho needs the producer's weight shape: attach() first")
        a, b, a_bar, b_bar = self._hyper_values(l)
        _, n = self._units(self._weight(l))
        sq, pi = self._buf("sq_norm", l), self._buf("pi", l)
        if self.evidence == "collapsed":
            return (torch.full_like(sq, a + 0.5 * n), b + 0.5 * sq), (torch.full_like(sq, a_bar + 0.5 * n), b_bar + 0.5 * sq)
        return gamma_update(pi, sq, n, a, b, a_bar, b_bar)

    def after_step(self) -> None:
        """Count optimizer steps; every ``update_every``-th runs :meth:`update` (no grad)."""
        self._steps += 1
        if self._steps % self.update_every == 0:
            self.update()

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        """No schedule: the updates run every ``update_every`` steps whatever the epoch."""
        self._epoch = int(epoch)

    # -- the regulariser ---------------------------------------------------------

    def expected_precision(self, l: int) -> Tensor:
        """E[rho] of producer l's units at the last update, [len(rows), J] (float64)."""
        return self._buf("erho", l)

    def kl(self) -> Tensor:
        """The prior's feedback into SGD: ``0.5 * sum_units E[rho] ||w||^2`` over the producers'
        live weights, E[rho] a constant (gradient ``E[rho] * w``). Zero before :meth:`attach`.
        The negative ELBO's terms without gradient (KL of q(rho) and q(s), the normalisers)
        are left out.

        A producer attached with its BatchNorm contributes through its effective weights
        ``gamma_r w_r / sqrt(running_var_r + eps)`` instead, with the running variance's
        dependence on the row's norm ``||w_r||`` kept (``sigma_r ~ ||w_r||``, as the batch
        statistics that normalise the row in training): the gradient on ``w_r`` is then
        orthogonal to ``w_r`` (BatchNorm makes the row's scale irrelevant to the output, and
        now to the prior too) and the channel's scale is carried by ``gamma_r``. See
        :func:`_folded_rows`."""
        total = None
        for l in range(self._num_producers if self.attached else 0):
            weight, rows = self._weight(l), self._buf("rows", l)
            if rows.numel() == 0:
                continue
            dtype = torch.promote_types(weight.dtype, torch.float32)
            # written as 0.5 * sum (sqrt(E[rho]) w)^2: finite for huge weights, whose E[rho] is tiny
            root = self._erho_cache.get(l)
            if root is None or root.device != weight.device or root.dtype != dtype:
                root = self.expected_precision(l).sqrt().to(device=weight.device, dtype=dtype).unsqueeze(-1)
                self._erho_cache[l] = root
            J, n = self._units(weight)
            w = weight.index_select(0, rows.to(weight.device)).to(dtype).reshape(rows.numel(), J, n)
            norm = self._norms[l] if l < len(self._norms) else None
            if norm is not None:
                w = _folded_rows(w, norm, rows.to(weight.device))
            term = (0.5 * self.prior_weight) * (root * w).square().sum()
            total = term if total is None else total + term.to(total.device)
        if total is None:
            return torch.zeros((), dtype=torch.float32, device=self.active_prob.device)
        return total

    # -- outputs -------------------------------------------------------------------

    def active_probability(self) -> Tensor:
        """P(t_c = 1 | evidence) per channel, [C] float64 (1 for channels without units)."""
        return self.active_prob.clone()

    def mask(self) -> Tensor:
        """Channels kept: P(t_c = 1) > 0.5 (bool, [C])."""
        return self.active_prob > 0.5

    def deterministic(self) -> Tensor:
        """Evaluation gate: 1.0 for kept channels, exactly 0.0 for rejected ones ([C], float32)."""
        return self.mask().to(torch.float32)

    def expected(self) -> Tensor:
        """Same as :meth:`deterministic` (the gate has no multiplicative noise)."""
        return self.deterministic()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """[n, C]: the current 0/1 decision (``mask_in_training``, default) or all ones. No
        multiplicative noise either way: the prior acts on the weights, through :meth:`kl`."""
        if self.mask_in_training:
            base = self.deterministic()
        else:
            base = torch.ones(self.num_channels, dtype=torch.float32, device=self.active_prob.device)
        return base.unsqueeze(0).expand(int(n), self.num_channels).clone()

    def kept(self) -> tuple[int, int]:
        """(channels kept, channels gated)."""
        return int(self.mask().sum()), self.num_channels

    def forward(self, x: Tensor, channel_axis: int = 1) -> Tensor:
        """``x`` times the gate on ``channel_axis`` (training: :meth:`sample`; evaluation: the decision)."""
        g = self.sample(1)[0] if self.training else self.deterministic()
        shape = [1] * x.dim()
        shape[channel_axis % x.dim()] = self.num_channels
        return x * g.reshape(shape).to(x.dtype)

    # -- persistence ---------------------------------------------------------------

    def get_extra_state(self):
        return {"steps": self._steps, "epoch": self._epoch}

    def set_extra_state(self, state) -> None:
        if isinstance(state, dict):
            self._steps = int(state.get("steps", 0))
            self._epoch = int(state.get("epoch", 0))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A state saved after attach() may be loaded into a gate not attached yet (or attached
        # with other shapes): the per-producer buffers are (re)created from the state dict, and
        # a later attach() with matching shapes keeps them.
        count = 0
        while f"{prefix}rows_{count}" in state_dict:
            count += 1
        same = count == self._num_producers and all(
            tuple(self._buf(name, l).shape) == tuple(state_dict[f"{prefix}{name}_{l}"].shape)
            for l in range(count)
            for name in _STATE + _STRUCT
            if f"{prefix}{name}_{l}" in state_dict
        )
        if not same:
            self._drop_structure()
            for l in range(count):
                for name in _STATE + _STRUCT:
                    ref = state_dict.get(f"{prefix}{name}_{l}")
                    if ref is not None:
                        self.register_buffer(f"{name}_{l}", torch.empty(ref.shape, dtype=ref.dtype, device=self.active_prob.device))
            self._num_producers = count
            self._restored = count > 0
        self._erho_cache = {}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (
            f"num_channels={self.num_channels}, producers={self._num_producers}, evidence={self.evidence}, "
            f"a={self.a}, a_bar={self.a_bar}, active_precision={self.active_precision}, "
            f"inactive_precision={self.inactive_precision:g}, p_channel={self.p_channel}, p_stay={self.p_stay}, "
            f"eps={self.eps}, update_every={self.update_every}, folded={sum(self.folded())}/{self._num_producers}"
        )
