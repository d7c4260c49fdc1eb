"""Stable closed forms for the truncated log-normal gate of Structured Bayesian Pruning.

The gate value theta has ``log theta ~ Normal(mu, sigma^2)`` truncated to ``[a, b]``
(Neklyudov et al., NIPS 2017).  With ``alpha = (a - mu) / sigma``,
``beta = (b - mu) / sigma`` and ``Z = Phi(beta) - Phi(alpha)``:

* ``KL = log(b - a) - log sigma - log sqrt(2 pi e) - log Z - (alpha phi(alpha) - beta phi(beta)) / (2 Z)``
  (against the log-uniform prior on ``[a, b]``);
* ``E[theta^k] = exp(k mu + k^2 sigma^2 / 2) (Phi(beta - k sigma) - Phi(alpha - k sigma)) / Z``;
* ``SNR = E[theta] / sqrt(E[theta^2] - E[theta]^2)``.

Taken literally these overflow, underflow or cancel catastrophically in most of the
parameter range (``sigma`` from ``e^-20`` to ``e^5``, ``mu`` outside ``[a, b]``), so
everything here is computed in float64 and in "scaled" form:

* ``h(x) = log Phi(x) + x^2 / 2`` is O(log |x|) for every ``x <= 0``; for ``x < -30`` it
  comes from the asymptotic (Mills ratio) series, otherwise from ``erfcx``; its derivative
  ``g(x) = x + phi(x) / Phi(x)`` is evaluated the same way, without cancellation;
* ``log(Phi(hi) - Phi(lo)) = -m^2 / 2 + rest`` with an anchor ``m`` (``hi`` when both
  bounds are <= 0, ``-lo`` when both are >= 0 by reflection, 0 when they straddle 0) and a
  moderate ``rest``; ratios of moments then combine the ``m^2`` parts symbolically
  (e.g. ``mu + sigma^2 / 2 - (beta - sigma)^2 / 2 + beta^2 / 2 = b`` exactly);
* ``torch.where`` branches are fed harmless placeholder inputs where not selected, so
  that no NaN or inf reaches the backward pass.

All public functions accept tensors (broadcast together), compute in float64 and return
the promoted floating dtype of ``mu`` and ``sigma``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "log_normal_cdf_diff",
    "kl",
    "log_expected",
    "log_expected_sq",
    "expected",
    "expected_sq",
    "log_snr_var",
    "snr",
    "sample_log",
    "SNR_MAX",
]

_LOG_2PI = math.log(2.0 * math.pi)
_HALF_LOG_2PI = 0.5 * _LOG_2PI
_SQRT_HALF = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_LN2 = math.log(2.0)
# Below -_SERIES_T, h(x) and g(x) come from the asymptotic series (7 terms: truncation
# error < 135135 / t^14 < 3e-16 at t = 30); above it, erfcx, whose autograd derivative
# loses about t^2 * eps (< 2e-13 at t = 30).
_SERIES_T = 30.0
#: SNR is capped here when the relative variance of theta underflows (or is lost to rounding).
SNR_MAX = 1.0e12
_VAR_REL_FLOOR = 1.0 / SNR_MAX**2
_U_MIN = 2.0**-60
_U_MAX = 1.0 - 2.0**-53
_NEWTON_STEPS = 6

_F64 = torch.float64


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _out_dtype(*xs: Tensor) -> torch.dtype:
    dt = xs[0].dtype
    for x in xs[1:]:
        dt = torch.promote_types(dt, x.dtype)
    return dt if dt.is_floating_point else torch.get_default_dtype()


def _prep(mu: Tensor | float, sigma: Tensor | float) -> tuple[Tensor, Tensor, torch.dtype]:
    mu_t = torch.as_tensor(mu)
    sigma_t = torch.as_tensor(sigma, device=mu_t.device)
    out = _out_dtype(mu_t, sigma_t)
    mu64, sigma64 = torch.broadcast_tensors(mu_t.to(_F64), sigma_t.to(_F64))
    return mu64, sigma64, out


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0 (Maechler's two branches), NaN-free in backward."""
    x = x.clamp(max=-1e-300)
    near = x > -_LN2
    x_near = torch.where(near, x, -1.0)
    x_far = torch.where(near, -1.0, x)
    return torch.where(near, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def _series_s(t: Tensor) -> Tensor:
    """S(t) - 1 where t * Phi(-t) / phi(t) = S(t) = sum_n (-1)^n (2n-1)!! / t^(2n) (6 terms)."""
    r = 1.0 / (t * t)
    return r * (-1.0 + r * (3.0 + r * (-15.0 + r * (105.0 + r * (-945.0 + r * 10395.0)))))


def _h(x: Tensor) -> Tensor:
    """h(x) = log Phi(x) + x^2 / 2 (moderate for all x <= 0), float64."""
    series = x < -_SERIES_T
    pos = x > 0
    mid = ~(series | pos)
    t = -torch.where(series, x, -2.0 * _SERIES_T)
    h_series = -torch.log(t) - _HALF_LOG_2PI + torch.log1p(_series_s(t))
    x_mid = torch.where(mid, x, -1.0)
    h_mid = torch.log(0.5 * torch.special.erfcx(-x_mid * _SQRT_HALF))
    x_pos = torch.where(pos, x, 1.0)
    h_pos = torch.special.log_ndtr(x_pos) + 0.5 * x_pos * x_pos
    return torch.where(series, h_series, torch.where(pos, h_pos, h_mid))


def _g(x: Tensor) -> Tensor:
    """g(x) = x + phi(x) / Phi(x) = h'(x), accurate also when both terms are huge (x << 0)."""
    series = x < -_SERIES_T
    pos = x > 0
    mid = ~(series | pos)
    t = -torch.where(series, x, -2.0 * _SERIES_T)
    r = 1.0 / (t * t)
    num = 1.0 + r * (-3.0 + r * (15.0 + r * (-105.0 + r * (945.0 + r * -10395.0))))
    g_series = num / (t * (1.0 + _series_s(t)))
    x_mid = torch.where(mid, x, -1.0)
    g_mid = x_mid + _SQRT_2_OVER_PI / torch.special.erfcx(-x_mid * _SQRT_HALF)
    x_pos = torch.where(pos, x, 1.0)
    g_pos = x_pos + torch.exp(-0.5 * x_pos * x_pos - _HALF_LOG_2PI - torch.special.log_ndtr(x_pos))
    return torch.where(series, g_series, torch.where(pos, g_pos, g_mid))


def _inv_mills(x: Tensor, h_x: Tensor | None = None) -> Tensor:
    """lambda(x) = phi(x) / Phi(x) = exp(-log sqrt(2 pi) - h(x))."""
    if h_x is None:
        h_x = _h(x)
    return torch.exp(-_HALF_LOG_2PI - h_x)


def _dh(x: Tensor, delta: Tensor, h_x: Tensor) -> Tensor:
    """h(x + delta) - h(x) for x <= 0, delta <= 0, with relative accuracy for tiny delta."""
    series = x < -_SERIES_T
    t = -torch.where(series, x, -2.0 * _SERIES_T)
    d = torch.where(series, delta, 0.0)
    d_series = -torch.log1p(-d / t) + torch.log1p(_series_s(t - d)) - torch.log1p(_series_s(t))
    return torch.where(series, d_series, _h(x + delta) - h_x)


class _Parts:
    """log(Phi(hi) - Phi(lo)) = -m^2/2 + rest, with the case flags used to get there."""

    def __init__(self, lo: Tensor, hi: Tensor) -> None:
        self.below = hi <= 0
        self.above = lo >= 0
        self.tail = self.below | self.above
        straddle = ~self.tail
        # Both-above is reflected onto both-below: Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi).
        lo_c = torch.where(self.above, -hi, lo)
        hi_c = torch.where(self.above, -lo, hi)
        self.lo_t = torch.where(self.tail, lo_c, -2.0)
        self.hi_t = torch.where(self.tail, hi_c, -1.0)
        self.h_hi = _h(self.hi_t)
        h_lo = _h(self.lo_t)
        # log q = log(phi(lo)/phi(hi)); log rho = log(Phi(lo)/Phi(hi)) (canonical frame)
        self.log_q = -0.5 * (self.lo_t - self.hi_t) * (self.lo_t + self.hi_t)
        self.log_rho = h_lo - self.h_hi + self.log_q
        self.log1m_rho = _log1mexp(self.log_rho)
        rest_tail = self.h_hi + self.log1m_rho
        # Straddling 0: Z = (erf(hi/sqrt2) + erf(-lo/sqrt2)) / 2 is a sum of two non-negatives.
        self.lo_s = torch.where(straddle, lo, -1.0)
        self.hi_s = torch.where(straddle, hi, 1.0)
        self.log_z_s = torch.log(0.5 * (torch.erf(self.hi_s * _SQRT_HALF) - torch.erf(self.lo_s * _SQRT_HALF)))
        self.rest = torch.where(self.tail, rest_tail, self.log_z_s)
        self.m = torch.where(self.tail, self.hi_t, 0.0)

    def value(self) -> Tensor:
        return -0.5 * self.m * self.m + self.rest


# ---------------------------------------------------------------------------
# public closed forms
# ---------------------------------------------------------------------------


def log_normal_cdf_diff(lo: Tensor, hi: Tensor) -> Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi, stable in both tails and across 0.

    Cases: both <= 0 (log Phi(hi) + log1mexp of the log ratio, in scaled form), both >= 0
    (reflected onto the first), straddling 0 (a sum of two erf terms, no cancellation).
    """
    lo_t = torch.as_tensor(lo)
    hi_t = torch.as_tensor(hi, device=lo_t.device)
    out = _out_dtype(lo_t, hi_t)
    lo64, hi64 = torch.broadcast_tensors(lo_t.to(_F64), hi_t.to(_F64))
    return _Parts(lo64, hi64).value().to(out)


def _kl64(mu: Tensor, sigma: Tensor, a: float, b: float) -> Tensor:
    alpha = (a - mu) / sigma
    beta = (b - mu) / sigma
    p = _Parts(alpha, beta)
    # Tail (canonical lo < hi <= 0): -log Z - (lo phi(lo) - hi phi(hi)) / (2 Z)
    #   = -h(hi) - log(1 - rho) + hi g(hi) / 2 + lambda(hi) (hi rho - lo q) / (2 (1 - rho));
    # the hi^2/2 of -log Z cancels analytically against hi phi(hi) / (2 Z).
    lo, hi = p.lo_t, p.hi_t
    lam = _inv_mills(hi, p.h_hi)
    rho_ratio = torch.exp(p.log_rho - p.log1m_rho)  # rho / (1 - rho)
    q_ratio = torch.exp(p.log_q - p.log1m_rho)  # q / (1 - rho)
    tail = -p.h_hi - p.log1m_rho + 0.5 * hi * _g(hi) + 0.5 * lam * (hi * rho_ratio - lo * q_ratio)
    # Straddle: phi(x)/Z = exp(log phi(x) - log Z); x phi(x) -> 0 for |x| -> inf.
    lo_s, hi_s, log_z = p.lo_s, p.hi_s, p.log_z_s
    a_term = lo_s * torch.exp(-0.5 * lo_s * lo_s - _HALF_LOG_2PI - log_z)
    b_term = hi_s * torch.exp(-0.5 * hi_s * hi_s - _HALF_LOG_2PI - log_z)
    straddle = -log_z - 0.5 * (a_term - b_term)
    core = torch.where(p.tail, tail, straddle)
    return math.log(b - a) - torch.log(sigma) - 0.5 * (_LOG_2PI + 1.0) + core


def kl(mu: Tensor, sigma: Tensor, a: float = -20.0, b: float = 0.0) -> Tensor:
    """KL(q || p) per element: q = truncated Normal(mu, sigma^2) on [a, b] for log theta,
    p = log-uniform on [e^a, e^b] (uniform on [a, b] for log theta)."""
    mu64, sigma64, out = _prep(mu, sigma)
    return _kl64(mu64, sigma64, float(a), float(b)).to(out)


class _Moments:
    """Shared pieces of log E[theta^k], k = 0, 1, 2 (float64)."""

    def __init__(self, mu: Tensor, sigma: Tensor, a: float, b: float) -> None:
        self.alpha = (a - mu) / sigma
        self.beta = (b - mu) / sigma
        self.mu, self.sigma, self.a, self.b = mu, sigma, a, b
        self._parts: dict[int, _Parts] = {}

    def part(self, k: int) -> _Parts:
        """Pieces of L(alpha - k sigma, beta - k sigma), computed once."""
        if k not in self._parts:
            self._parts[k] = _Parts(self.alpha - k * self.sigma, self.beta - k * self.sigma)
        return self._parts[k]

    def log_moment(self, k: int) -> Tensor:
        """log E[theta^k] = k mu + k^2 sigma^2/2 + L(alpha - k sigma, beta - k sigma) - L(alpha, beta)."""
        p0, pk = self.part(0), self.part(k)
        mu, sigma = self.mu, self.sigma
        # Anchors at the same bound: k mu + k^2 s^2/2 - (m - k s)^2/2 + m^2/2 = k * bound, exactly.
        same_b = p0.below & pk.below
        same_a = p0.above & pk.above
        generic = k * mu + 0.5 * k * k * sigma * sigma + 0.5 * p0.m * p0.m - 0.5 * pk.m * pk.m
        c = torch.where(same_b, k * self.b, torch.where(same_a, k * self.a, generic))
        return c + pk.rest - p0.rest

    def log_var_rel(self) -> Tensor:
        """d = log E[theta^2] - 2 log E[theta] = log(1 + Var/E^2) >= 0, anchors combined symbolically."""
        p0, p1, p2 = self.part(0), self.part(1), self.part(2)
        sigma = self.sigma
        same = p0.below | p2.above  # all three anchored at b, or all three at a
        generic = sigma * sigma - 0.5 * p0.m * p0.m + p1.m * p1.m - 0.5 * p2.m * p2.m
        c = torch.where(same, 0.0, generic)
        return c + (p2.rest - 2.0 * p1.rest + p0.rest)


def log_expected(mu: Tensor, sigma: Tensor, a: float = -20.0, b: float = 0.0) -> Tensor:
    """log E[theta] (the two large exponents cancel symbolically before any rounding)."""
    mu64, sigma64, out = _prep(mu, sigma)
    return _Moments(mu64, sigma64, float(a), float(b)).log_moment(1).to(out)


def log_expected_sq(mu: Tensor, sigma: Tensor, a: float = -20.0, b: float = 0.0) -> Tensor:
    """log E[theta^2]."""
    mu64, sigma64, out = _prep(mu, sigma)
    return _Moments(mu64, sigma64, float(a), float(b)).log_moment(2).to(out)


def expected(mu: Tensor, sigma: Tensor, a: float = -20.0, b: float = 0.0) -> Tensor:
    """E[theta] = exp(mu + sigma^2/2) (Phi(sigma - alpha) - Phi(sigma - beta)) / Z, in (e^a, e^b)."""
    mu64, sigma64, out = _prep(mu, sigma)
    return torch.exp(_Moments(mu64, sigma64, float(a), float(b)).log_moment(1)).to(out)


def expected_sq(mu: Tensor, sigma: Tensor, a: float = -20.0, b: float = 0.0) -> Tensor:
    """E[theta^2] = exp(2 mu + 2 sigma^2) (Phi(2 sigma - alpha) - Phi(2 sigma - beta)) / Z."""
    mu64, sigma64, out = _prep(mu, sigma)
    return torch.exp(_Moments(mu64, sigma64, float(a), float(b)).log_moment(2)).to(out)


def log_snr_var(mu: Tensor, sigma: Tensor, a: float = -20.0, b: float = 0.0) -> Tensor:
    """log E[theta^2] - 2 log E[theta] = log(1 + 1/SNR^2) (>= 0 up to rounding)."""
    mu64, sigma64, out = _prep(mu, sigma)
    return _Moments(mu64, sigma64, float(a), float(b)).log_var_rel().to(out)


def snr(mu: Tensor, sigma: Tensor, a: float = -20.0, b: float = 0.0) -> Tensor:
    """SNR = E[theta] / std[theta] = 1 / sqrt(expm1(log E[theta^2] - 2 log E[theta])).

    Capped at SNR_MAX (1e12) when the relative variance underflows; the absolute rounding
    error of the log-ratio is ~1e-15, so values above ~1e6 are only "very large".
    """
    mu64, sigma64, out = _prep(mu, sigma)
    return _snr64(mu64, sigma64, float(a), float(b)).to(out)


def _snr64(mu: Tensor, sigma: Tensor, a: float, b: float) -> Tensor:
    d = _Moments(mu, sigma, a, b).log_var_rel()
    var_rel = torch.expm1(d.clamp(max=700.0)).clamp(min=_VAR_REL_FLOOR)
    return torch.rsqrt(var_rel)


# ---------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------


@torch.no_grad()
def _sample_tail(
    lo: Tensor, hi: Tensor, uc: Tensor, sigma: Tensor, anchor: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Both bounds in one tail, canonical frame lo < hi <= 0 (callers reflect the other tail).

    Returns (z, dz/dmu, dz/dsigma) in the canonical frame, z = anchor + sigma * (xi - hi)
    with anchor the canonical upper bound (so no large cancellation in z).
    """
    log_u, log_1mu = torch.log(uc), torch.log1p(-uc)
    h_hi = _h(hi)
    log_rho = _h(lo) - h_hi - 0.5 * (lo - hi) * (lo + hi)  # log Phi(lo)/Phi(hi)
    log1m_rho = _log1mexp(log_rho)
    ell = torch.logaddexp(log_rho, log_u + log1m_rho)  # log(Phi(xi)/Phi(hi)), in [log rho, 0]
    # Solve h(hi + d) - h(hi) + t d - d^2/2 = ell for d = xi - hi in [lo - hi, 0], t = -hi
    # (that is log Phi(xi) - log Phi(hi) = ell): concave increasing, slope lambda(xi).
    t = -hi
    log_p = h_hi - 0.5 * hi * hi + ell
    use_ndtri = log_p > -700.0
    xi0 = torch.special.ndtri(torch.exp(torch.where(use_ndtri, log_p, -1.0)))
    d_asym = 2.0 * ell / (t + torch.sqrt(t * t - 2.0 * ell))  # drops -log1p(-d/t): left of root
    d_lo = lo - hi
    zero = torch.zeros_like(hi)
    delta = torch.where(use_ndtri, xi0 - hi, d_asym)
    delta = torch.minimum(torch.maximum(delta, d_lo), zero)
    for _ in range(_NEWTON_STEPS):
        resid = _dh(hi, delta, h_hi) + t * delta - 0.5 * delta * delta - ell
        delta = delta - resid / _inv_mills(hi + delta)
        delta = torch.minimum(torch.maximum(delta, d_lo), zero)
    xi = hi + delta
    d_alpha = (hi - lo) + delta
    # exponents of u phi(hi)/phi(xi) and (1-u) phi(lo)/phi(xi); the first written via the
    # equation just solved so that it keeps relative accuracy when it is tiny
    e_hi = -torch.log1p(torch.exp(log_rho + log_1mu - log_u)) + _dh(hi, delta, h_hi)
    e_lo = log_1mu + 0.5 * d_alpha * (2.0 * lo + d_alpha)
    dz_dmu = -torch.expm1(e_hi) - torch.exp(e_lo)
    dz_dsigma = xi * dz_dmu + d_alpha * torch.exp(e_lo) + delta * torch.exp(e_hi)
    return anchor + sigma * delta, dz_dmu, dz_dsigma


@torch.no_grad()
def _sample_straddle(
    mu: Tensor, sigma: Tensor, alpha: Tensor, beta: Tensor, u: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """alpha < 0 < beta: p = Phi(alpha) + u Z or 1 - p = Phi(-beta) + (1 - u) Z, both sums."""
    log_z = torch.log(0.5 * (torch.erf(beta * _SQRT_HALF) - torch.erf(alpha * _SQRT_HALF)))
    log_p = torch.logaddexp(torch.special.log_ndtr(alpha), torch.log(u) + log_z)
    log_q = torch.logaddexp(torch.special.log_ndtr(-beta), torch.log1p(-u) + log_z)
    use_p = log_p <= -_LN2
    xi = torch.where(
        use_p,
        torch.special.ndtri(torch.exp(torch.where(use_p, log_p, -1.0))),
        -torch.special.ndtri(torch.exp(torch.where(use_p, -1.0, log_q))),
    )
    xi = torch.minimum(torch.maximum(xi, alpha), beta)
    d_alpha, d_beta = xi - alpha, xi - beta
    e_lo = torch.log1p(-u) + 0.5 * d_alpha * (2.0 * alpha + d_alpha)
    e_hi = torch.log(u) + 0.5 * d_beta * (2.0 * beta + d_beta)
    dz_dmu = -torch.expm1(e_hi) - torch.exp(e_lo)
    dz_dsigma = xi * dz_dmu + d_alpha * torch.exp(e_lo) + d_beta * torch.exp(e_hi)
    return mu + sigma * xi, dz_dmu, dz_dsigma


@torch.no_grad()
def _sample_log64(
    mu: Tensor, sigma: Tensor, a: float, b: float, u: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse-CDF sample z = log theta and its implicit derivatives dz/dmu, dz/dsigma.

    mu, sigma, u: float64 of one shape. Each case is computed on its own elements only.
    """
    u = u.clamp(_U_MIN, _U_MAX).reshape(-1)
    mu_f, sigma_f = mu.reshape(-1), sigma.reshape(-1)
    alpha = (a - mu_f) / sigma_f
    beta = (b - mu_f) / sigma_f
    above = alpha >= 0
    tail = above | (beta <= 0)
    z = torch.empty_like(mu_f)
    dz_dmu = torch.empty_like(mu_f)
    dz_dsigma = torch.empty_like(mu_f)

    idx = tail.nonzero().squeeze(1)
    if idx.numel():
        ab = above[idx]
        al, be, uu = alpha[idx], beta[idx], u[idx]
        # reflect both-above onto both-below: mu -> -mu, [a, b] -> [-b, -a], u -> 1 - u
        lo = torch.where(ab, -be, al)
        hi = torch.where(ab, -al, be)
        uc = torch.where(ab, 1.0 - uu, uu)
        anchor = torch.where(ab, torch.full_like(lo, -a), torch.full_like(lo, b))
        zc, gm, gs = _sample_tail(lo, hi, uc, sigma_f[idx], anchor)
        sgn = torch.where(ab, -1.0, 1.0)
        z[idx], dz_dmu[idx], dz_dsigma[idx] = sgn * zc, gm, sgn * gs

    idx = (~tail).nonzero().squeeze(1)
    if idx.numel():
        zs, gm, gs = _sample_straddle(mu_f[idx], sigma_f[idx], alpha[idx], beta[idx], u[idx])
        z[idx], dz_dmu[idx], dz_dsigma[idx] = zs, gm, gs

    shape = mu.shape
    return z.clamp(a, b).reshape(shape), dz_dmu.reshape(shape), dz_dsigma.reshape(shape)


def sample_log(mu: Tensor, sigma: Tensor, a: float, b: float, u: Tensor) -> Tensor:
    """log theta = mu + sigma * Phi^-1(Phi(alpha) + u Z) for u in (0, 1), clamped to [a, b].

    Computed in log/complement space (Newton on the scaled log-CDF when both bounds lie in
    one tail), so it is exact to ~1e-15 even for sigma = e^-20 or mu far outside [a, b].
    Differentiable w.r.t. mu and sigma (reparametrisation): the gradient is the implicit
    derivative dz/dmu = 1 - (1-u) phi(alpha)/phi(xi) - u phi(beta)/phi(xi) (and likewise
    for sigma), attached to the value with a straight-through surrogate (first order only).
    """
    mu_t = torch.as_tensor(mu)
    sigma_t = torch.as_tensor(sigma, device=mu_t.device)
    u_t = torch.as_tensor(u, device=mu_t.device)
    out = _out_dtype(mu_t, sigma_t)
    mu64, sigma64, u64 = torch.broadcast_tensors(mu_t.to(_F64), sigma_t.to(_F64), u_t.to(_F64))
    z, dz_dmu, dz_dsigma = _sample_log64(mu64.detach(), sigma64.detach(), float(a), float(b), u64.detach())
    if mu64.requires_grad or sigma64.requires_grad:
        z = z + dz_dmu * (mu64 - mu64.detach()) + dz_dsigma * (sigma64 - sigma64.detach())
    return z.to(out)


_DIRECT_BOUND = 8.0  # |nearer bound| up to which the direct inverse CDF keeps full float64 accuracy


@torch.no_grad()
def _direct_channels(alpha: Tensor, beta: Tensor, log_z: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse CDF xi and the implicit derivatives' exponent terms, for per-channel alpha, beta, log Z ([C])
    and per-sample u ([n, C]): p = Phi(alpha) + u Z, or its complement 1 - p = Phi(-beta) + (1 - u) Z."""
    log_p = torch.logaddexp(torch.special.log_ndtr(alpha), torch.log(u) + log_z)
    log_q = torch.logaddexp(torch.special.log_ndtr(-beta), torch.log1p(-u) + log_z)
    use_p = log_p <= -_LN2
    xi = torch.special.ndtri(torch.exp(torch.where(use_p, log_p, log_q)))
    xi = torch.where(use_p, xi, -xi)
    xi = torch.minimum(torch.maximum(xi, alpha), beta)
    d_alpha, d_beta = xi - alpha, xi - beta
    e_lo = torch.log1p(-u) + 0.5 * d_alpha * (2.0 * alpha + d_alpha)
    e_hi = torch.log(u) + 0.5 * d_beta * (2.0 * beta + d_beta)
    dz_dmu = -torch.expm1(e_hi) - torch.exp(e_lo)
    dz_dsigma = xi * dz_dmu + d_alpha * torch.exp(e_lo) + d_beta * torch.exp(e_hi)
    return xi, dz_dmu, dz_dsigma


def sample_log_channels(
    mu: Tensor, sigma: Tensor, a: float, b: float, u: Tensor, solver: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None
) -> Tensor:
    """:func:`sample_log` for per-channel ``mu``, ``sigma`` ([C]) and per-sample ``u`` ([n, C]).

    Per-channel terms are computed once; channels whose nearer bound is within
    ``_DIRECT_BOUND`` standard deviations (the usual case, including the
    initialisation mu = b) use the direct inverse CDF, the others the careful
    tail solver of :func:`sample_log`. Same value and gradients, much cheaper.
    ``solver``, if given, replaces that selection: a function like
    :func:`sample_channels_branch_free` (e.g. compiled with ``torch.compile``).
    """
    out = _out_dtype(torch.as_tensor(mu), torch.as_tensor(sigma))
    mu64, sigma64 = mu.to(_F64), sigma.to(_F64)
    u = u.to(_F64).clamp(_U_MIN, _U_MAX)
    if solver is not None:
        m, s = mu64.detach(), sigma64.detach()
        with torch.no_grad():
            z, dz_dmu, dz_dsigma = solver(m, s, u, float(a), float(b))
        if mu64.requires_grad or sigma64.requires_grad:
            z = z + dz_dmu * (mu64 - m) + dz_dsigma * (sigma64 - s)
        return z.to(out)
    with torch.no_grad():
        m, s = mu64.detach(), sigma64.detach()
        alpha, beta = (a - m) / s, (b - m) / s
        direct = (alpha < _DIRECT_BOUND) & (beta > -_DIRECT_BOUND)
        z = torch.empty_like(u)
        dz_dmu = torch.empty_like(u)
        dz_dsigma = torch.empty_like(u)
        cols = direct.nonzero().squeeze(1)
        if cols.numel():
            log_z = log_normal_cdf_diff(alpha[cols], beta[cols])
            xi, gm, gs = _direct_channels(alpha[cols], beta[cols], log_z, u[:, cols])
            z[:, cols] = m[cols] + s[cols] * xi
            dz_dmu[:, cols], dz_dsigma[:, cols] = gm, gs
        cols = (~direct).nonzero().squeeze(1)
        if cols.numel():
            n = u.shape[0]
            zt, gm, gs = _sample_log64(m[cols].expand(n, -1), s[cols].expand(n, -1), float(a), float(b), u[:, cols])
            z[:, cols], dz_dmu[:, cols], dz_dsigma[:, cols] = zt, gm, gs
        z = z.clamp(a, b)
    if mu64.requires_grad or sigma64.requires_grad:
        z = z + dz_dmu * (mu64 - m) + dz_dsigma * (sigma64 - s)
    return z.to(out)


def sample_channels_branch_free(m: Tensor, s: Tensor, u: Tensor, a: float, b: float) -> tuple[Tensor, Tensor, Tensor]:
    """(z, dz/dmu, dz/dsigma) for float64 ``m``, ``s`` ([C]) and ``u`` ([n, C], already clamped):
    the two solvers of :func:`sample_log_channels` on every column, each fed harmless
    placeholders where it does not apply, selected elementwise.

    Twice the arithmetic of the selecting version, but no data-dependent indexing or
    host synchronisation, so ``torch.compile`` fuses it into a few kernels (the SBP
    gates' sampling is otherwise hundreds of tiny GPU launches per step). Outside
    ``[a, b]`` by more than ``_DIRECT_BOUND`` standard deviations a column is in one tail;
    the straddling case is always direct.
    """
    alpha, beta = (a - m) / s, (b - m) / s
    direct = (alpha < _DIRECT_BOUND) & (beta > -_DIRECT_BOUND)
    alpha_d = torch.where(direct, alpha, -1.0)
    beta_d = torch.where(direct, beta, 1.0)
    xi, gm_d, gs_d = _direct_channels(alpha_d, beta_d, _Parts(alpha_d, beta_d).value(), u)
    z_d = m + s * xi
    # tail columns, reflected onto lo < hi <= 0 when both bounds lie above
    above = alpha >= 0
    lo = torch.where(direct, -2.0, torch.where(above, -beta, alpha)).expand_as(u)
    hi = torch.where(direct, -1.0, torch.where(above, -alpha, beta)).expand_as(u)
    uc = torch.where(above, 1.0 - u, u)
    anchor = torch.where(above, -a, b).to(m.dtype).expand_as(u)
    zc, gm_t, gs_t = _sample_tail(lo, hi, uc, s.expand_as(u), anchor)
    sgn = torch.where(above, -1.0, 1.0)
    z = torch.where(direct, z_d, sgn * zc).clamp(a, b)
    return z, torch.where(direct, gm_d, gm_t), torch.where(direct, gs_d, sgn * gs_t)
