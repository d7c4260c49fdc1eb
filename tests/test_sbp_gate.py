"""Structured Bayesian Pruning gate: closed forms, stability, gradients, sampling, module.

Reference values come from scipy.integrate.quad over the density of log theta written in
an anchored, standardised variable (v = (log theta - anchor) / sigma, anchor = the mode:
mu, a or b), which stays well conditioned for sigma = e^-20 and mu far outside [a, b].
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from onnxprune.bayes import truncnorm as tn
from onnxprune.bayes.sbp import SBPGate

A, B = -20.0, 0.0
F64 = torch.float64

GRID_MU = [-20.0, -15.0, -8.0, -3.0, -1.0, 0.0, 1.0, 5.0]
GRID_LOG_SIGMA = [-20.0, -8.0, -3.0, -1.0, 0.0, 1.0, 3.0, 5.0]

# Tolerances against quad (all in float64).
KL_RTOL, KL_ATOL = 1e-10, 1e-13  # |kl - ref| <= KL_ATOL + KL_RTOL * |ref| (KL ~ 4e-6 at sigma = e^5)
MOMENT_RTOL = 1e-10  # E[theta], E[theta^2]
SNR_RTOL = 1e-6  # where the true SNR <= SNR_ACCURATE
SNR_ACCURATE = 1e4
# Above SNR_ACCURATE the relative variance (< 1e-8) is close to the ~1e-15 rounding of
# log E[theta^2] - 2 log E[theta]; there we only require snr >= min(ref / 2, SNR_FLOOR).
SNR_FLOOR = 1e6


# ---------------------------------------------------------------------------
# reference by numerical integration
# ---------------------------------------------------------------------------


def reference(mu: float, log_sigma: float, a: float = A, b: float = B) -> dict[str, float]:
    """KL, E[theta], E[theta^2], SNR by quad on the density of log theta (float64)."""
    s = math.exp(log_sigma)
    al, be = (a - mu) / s, (b - mu) / s
    if be <= 0:  # mode at b
        y0, anchor, lo, hi = be, b, (a - b) / s, 0.0
    elif al >= 0:  # mode at a
        y0, anchor, lo, hi = al, a, 0.0, (b - a) / s
    else:  # mode at mu
        y0, anchor, lo, hi = 0.0, mu, al, be
    # log theta = anchor + s * v, unnormalised density w(v) = exp(-(v (2 y0 + v)) / 2);
    # it has decayed by e^-60 or more outside 60 / max(1, |y0|) of the mode.
    scale = 1.0 / max(1.0, abs(y0))
    lo_i, hi_i = max(lo, -60.0 * scale), min(hi, 60.0 * scale)
    pieces = [(lo_i, 0.0), (0.0, hi_i)] if lo_i < 0.0 < hi_i else [(lo_i, hi_i)]

    def integ(f) -> float:
        return sum(integrate.quad(f, p, q, epsabs=0.0, epsrel=1e-13, limit=400)[0] for p, q in pieces)

    def logw(v: float) -> float:
        return -0.5 * v * (2.0 * y0 + v)

    def w(v: float) -> float:
        return math.exp(logw(v))

    norm = integ(w)
    m1 = integ(lambda v: math.expm1(s * v) * w(v)) / norm  # E[e^{s v}] - 1
    m2 = integ(lambda v: math.exp(2.0 * s * v) * w(v)) / norm
    var_rel = integ(lambda v: (math.expm1(s * v) - m1) ** 2 * w(v)) / norm  # Var[e^{s v}]
    entropy_v = math.log(norm) - integ(lambda v: w(v) * logw(v)) / norm
    return {
        "kl": math.log(b - a) - (log_sigma + entropy_v),
        "expected": math.exp(anchor) * (1.0 + m1),
        "expected_sq": math.exp(2.0 * anchor) * m2,
        "snr": (1.0 + m1) / math.sqrt(var_rel),
    }


def ours(mu: float, log_sigma: float, a: float = A, b: float = B) -> dict[str, float]:
    m = torch.tensor([mu], dtype=F64)
    s = torch.exp(torch.tensor([log_sigma], dtype=F64))
    return {
        "kl": tn.kl(m, s, a, b).item(),
        "expected": tn.expected(m, s, a, b).item(),
        "expected_sq": tn.expected_sq(m, s, a, b).item(),
        "snr": tn.snr(m, s, a, b).item(),
    }


GRID = [(m, ls) for m in GRID_MU for ls in GRID_LOG_SIGMA]


@pytest.mark.parametrize("mu,log_sigma", GRID)
def test_closed_forms_match_quadrature(mu, log_sigma):
    ref = reference(mu, log_sigma)
    got = ours(mu, log_sigma)
    assert abs(got["kl"] - ref["kl"]) <= KL_ATOL + KL_RTOL * abs(ref["kl"]), (got["kl"], ref["kl"])
    for key in ("expected", "expected_sq"):
        assert got[key] == pytest.approx(ref[key], rel=MOMENT_RTOL, abs=0.0), key
    assert 0.0 < got["expected"] <= math.exp(B)
    if ref["snr"] <= SNR_ACCURATE:
        assert got["snr"] == pytest.approx(ref["snr"], rel=SNR_RTOL, abs=0.0)
    else:  # 10 grid points: all of log_sigma = -20, and (1, -8), (5, -8)
        assert min(ref["snr"] / 2, SNR_FLOOR) <= got["snr"] <= tn.SNR_MAX


# Another interval, so that mu < a (both standardised bounds above 0, the reflected case)
# occurs inside the clipped range; same tolerances and the same SNR rule.
OTHER_INTERVAL = [(-15.0, 0.0), (-20.0, -3.0), (-12.0, -8.0), (-20.0, -20.0), (-10.0, -20.0), (-10.0, 1.0),
                  (-6.0, -1.0), (5.0, 3.0), (-20.0, 5.0), (-11.0, -0.5)]


@pytest.mark.parametrize("mu,log_sigma", OTHER_INTERVAL)
def test_closed_forms_match_quadrature_other_interval(mu, log_sigma):
    a, b = -10.0, -2.0
    ref = reference(mu, log_sigma, a, b)
    got = ours(mu, log_sigma, a, b)
    assert abs(got["kl"] - ref["kl"]) <= KL_ATOL + KL_RTOL * abs(ref["kl"]), (got["kl"], ref["kl"])
    for key in ("expected", "expected_sq"):
        assert got[key] == pytest.approx(ref[key], rel=MOMENT_RTOL, abs=0.0), key
    if ref["snr"] <= SNR_ACCURATE:
        assert got["snr"] == pytest.approx(ref["snr"], rel=SNR_RTOL, abs=0.0)
    else:
        assert min(ref["snr"] / 2, SNR_FLOOR) <= got["snr"] <= tn.SNR_MAX


def test_snr_accuracy_rule_covers_expected_points():
    """Documents which grid points get only the SNR lower bound (the rest: rtol 1e-6)."""
    bounded = {(m, ls) for m, ls in GRID if reference(m, ls)["snr"] > SNR_ACCURATE}
    assert bounded == {(m, -20.0) for m in GRID_MU} | {(1.0, -8.0), (5.0, -8.0)}


@pytest.mark.parametrize("mu", GRID_MU)
def test_point_mass_and_exponential_limits(mu):
    """sigma = e^-20: compare with the limiting distributions of log theta, independently of quad:
    a point mass Normal(mu, sigma^2) for a < mu < b, a half-normal at mu = a or mu = b, and
    b - Exponential(rate (mu - b) / sigma^2) for mu > b."""
    ls = -20.0
    s = math.exp(ls)
    got = ours(mu, ls)
    gauss_entropy = ls + 0.5 * math.log(2 * math.pi * math.e)
    if A < mu < B:
        kl, e1, e2, snr = math.log(B - A) - gauss_entropy, math.exp(mu), math.exp(2 * mu), 1 / s
    elif mu in (A, B):
        sign = -1.0 if mu == B else 1.0
        kl = math.log(B - A) - (gauss_entropy - math.log(2))
        e1 = math.exp(mu + sign * s * math.sqrt(2 / math.pi))
        e2 = math.exp(2 * mu + sign * 2 * s * math.sqrt(2 / math.pi))
        snr = 1 / (s * math.sqrt(1 - 2 / math.pi))
    else:
        rate = (mu - B) / s**2
        kl = math.log(B - A) - (1.0 - math.log(rate))
        e1, e2, snr = math.exp(B) * rate / (rate + 1), math.exp(2 * B) * rate / (rate + 2), rate
    assert got["kl"] == pytest.approx(kl, rel=1e-12)
    assert got["expected"] == pytest.approx(e1, rel=1e-12)
    assert got["expected_sq"] == pytest.approx(e2, rel=1e-12)
    assert min(snr / 2, SNR_FLOOR) <= got["snr"] <= tn.SNR_MAX


def test_log_normal_cdf_diff_cases():
    """Both below 0, both above 0 (reflection), straddling, and extreme tails up to 1e10."""
    pairs = [(-3.0, -1.0), (-40.0, -39.5), (-1e10, -2.5e9), (-30.5, -30.4), (1.0, 3.0),
             (39.5, 40.0), (2.5e9, 1e10), (-1.0, 2.0), (-1e10, 1e-3), (-0.1, 0.1), (-5.0, 0.0), (0.0, 5.0)]
    lo = torch.tensor([p[0] for p in pairs], dtype=F64)
    hi = torch.tensor([p[1] for p in pairs], dtype=F64)
    got = tn.log_normal_cdf_diff(lo, hi).numpy()
    ln, hn = lo.numpy(), hi.numpy()
    # scipy: reflect so that both are on the left when they do not straddle, then
    # log Phi(hi) + log(1 - Phi(lo)/Phi(hi)) in float64 (accurate for these pairs)
    flip = ln + hn > 0
    l2, h2 = np.where(flip, -hn, ln), np.where(flip, -ln, hn)
    ref = special.log_ndtr(h2) + np.log(-np.expm1(special.log_ndtr(l2) - special.log_ndtr(h2)))
    np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-14)
    assert got.dtype == np.float64
    assert tn.log_normal_cdf_diff(lo.float(), hi.float()).dtype == torch.float32


# ---------------------------------------------------------------------------
# stability: no NaN / inf in values or gradients
# ---------------------------------------------------------------------------


def _dense_grid(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    extra = torch.tensor([-20.0, 0.0, 5.0, -20.0 + 1e-7, -1e-7, 1e-7, 5.0 - 1e-7], dtype=F64)
    mus = torch.cat([torch.linspace(-25, 10, 71, dtype=F64), extra])
    lss = torch.cat([torch.linspace(-25, 10, 71, dtype=F64), torch.tensor([-20.0, 5.0, -19.9999, 4.9999], dtype=F64)])
    m, s = torch.meshgrid(mus, lss, indexing="ij")
    return m.reshape(-1).to(dtype), s.reshape(-1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_nan_or_inf_in_values_and_gradients(dtype):
    mus, lss = _dense_grid(dtype)
    gate = SBPGate(mus.numel()).to(dtype)
    with torch.no_grad():
        gate.mu.copy_(mus)
        gate.log_sigma.copy_(lss)
    gen = torch.Generator().manual_seed(0)
    outputs = {
        "kl": gate.kl(),
        "expected": gate.expected(),
        "snr": gate.snr(),
        "sample": gate.sample(2, generator=gen),
        "log_expected": tn.log_expected(gate.mu.clamp(-20, 5), gate.log_sigma.clamp(-20, 5).exp()),
        "expected_sq": tn.expected_sq(gate.mu.clamp(-20, 5), gate.log_sigma.clamp(-20, 5).exp()),
    }
    for name, value in outputs.items():
        assert value.dtype == dtype, name
        assert torch.isfinite(value).all(), name
        g_mu, g_ls = torch.autograd.grad(value.sum(), (gate.mu, gate.log_sigma))
        assert torch.isfinite(g_mu).all() and torch.isfinite(g_ls).all(), name
    assert (outputs["expected"] > 0).all() and (outputs["expected"] <= 1).all()
    assert (outputs["snr"] > 0).all() and (outputs["snr"] <= tn.SNR_MAX).all()
    assert (outputs["kl"] >= 0) and torch.isfinite(outputs["kl"])
    per_channel_kl = tn.kl(gate.mu.clamp(-20, 5).double(), gate.log_sigma.clamp(-20, 5).double().exp())
    assert (per_channel_kl > -1e-12).all()  # KL >= 0 up to rounding


def test_extreme_inputs_to_raw_functions():
    """u at 0 and 1, and float32 inputs straight into the truncnorm functions."""
    mu = torch.tensor([5.0, -20.0, 0.0, -10.0, 5.0, -20.0], requires_grad=True)
    sigma = torch.tensor([math.exp(-20), math.exp(-20), math.exp(-20), math.exp(5), math.exp(5), 1.0], requires_grad=True)
    for u in (torch.zeros(6), torch.ones(6), torch.full((6,), 0.5)):
        z = tn.sample_log(mu, sigma, A, B, u)
        assert z.dtype == torch.float32
        assert torch.isfinite(z).all() and (z >= A).all() and (z <= B).all()
        grads = torch.autograd.grad(z.sum(), (mu, sigma))
        assert all(torch.isfinite(g).all() for g in grads)
    for fn in (tn.kl, tn.expected, tn.expected_sq, tn.snr, tn.log_expected, tn.log_snr_var):
        v = fn(mu, sigma)
        assert v.dtype == torch.float32 and torch.isfinite(v).all()


# ---------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------

GRAD_POINTS = [(-10.0, 0.5), (-3.0, -1.0), (-0.5, 1.0), (0.7, -0.3), (2.0, 0.5), (-19.0, 2.0),
               (-5.0, 3.0), (-19.9, -2.0), (4.0, 4.5), (3.0, -2.0), (0.3, -3.0), (-1.0, -6.0)]


def _grad_inputs(points):
    mu = torch.tensor([p[0] for p in points], dtype=F64, requires_grad=True)
    ls = torch.tensor([p[1] for p in points], dtype=F64, requires_grad=True)
    return mu, ls


@pytest.mark.parametrize("name", ["kl", "expected", "expected_sq", "snr", "log_expected"])
def test_gradcheck_closed_forms(name):
    fn = getattr(tn, name)
    points = GRAD_POINTS
    if name == "snr":  # finite differences of SNR ~ 1/sqrt(d) need SNR modest (here <= 410)
        points = [p for p in GRAD_POINTS if reference(*p)["snr"] < 500]
    mu, ls = _grad_inputs(points)
    assert torch.autograd.gradcheck(lambda m, l: fn(m, torch.exp(l), A, B), (mu, ls))


def test_gradcheck_sample_fixed_u():
    mu, ls = _grad_inputs(GRAD_POINTS + [(2.0, -5.0), (0.5, -6.0), (-19.99, -12.0), (-25.0 + 5.5, -8.0)])
    u = torch.linspace(0.02, 0.98, mu.numel(), dtype=F64)
    assert torch.autograd.gradcheck(lambda m, l: tn.sample_log(m, torch.exp(l), A, B, u), (mu, ls))


def test_kl_gradient_in_exponential_limit():
    """mu > b, sigma tiny: KL -> log(b-a) - 1 + log(mu-b) - 2 log sigma, so dKL/dmu -> 1/(mu-b)
    and dKL/dlog sigma -> -2 (gradients through heavily cancelling closed forms)."""
    mu, ls = _grad_inputs([(5.0, -20.0), (1.0, -15.0), (5.0, -10.0)])
    g_mu, g_ls = torch.autograd.grad(tn.kl(mu, ls.exp()).sum(), (mu, ls))
    torch.testing.assert_close(g_mu, 1 / mu.detach(), rtol=1e-9, atol=0)
    torch.testing.assert_close(g_ls, torch.full_like(g_ls, -2.0), rtol=1e-9, atol=0)


# ---------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a,b,points",
    [
        (A, B, [(-3, 0), (-10, 1), (2, 0), (-1, -2), (-15, 0.5), (1, -4), (0.5, 2), (-20, 0)]),
        (-10.0, -2.0, [(-3, 0), (-10, 1), (2, 0), (-15, 0.5), (-12, -1), (-25, 0), (-14, -1)]),  # mu < a too
    ],
)
def test_sample_log_matches_scipy_ppf(a, b, points):
    u = np.array([1e-9, 0.01, 0.3, 0.5, 0.9, 0.999999])
    for m, ls in points:
        s = math.exp(ls)
        ref = stats.truncnorm.ppf(u, (a - m) / s, (b - m) / s, loc=m, scale=s)
        got = tn.sample_log(torch.full((6,), float(m), dtype=F64), torch.full((6,), s, dtype=F64), a, b, torch.tensor(u))
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-8, atol=1e-12, err_msg=str((m, ls)))


def test_sample_log_deep_tail_exponential_limit():
    """mu = 5 > b, sigma = e^-20: log theta = b + log(u) sigma^2 / (mu - b), gradients included."""
    u = torch.tensor([1e-12, 0.01, 0.5, 0.99], dtype=F64)
    mu = torch.full((4,), 5.0, dtype=F64, requires_grad=True)
    ls = torch.full((4,), -20.0, dtype=F64, requires_grad=True)
    z = tn.sample_log(mu, ls.exp(), A, B, u)
    s2 = math.exp(-40.0)
    torch.testing.assert_close(z.detach(), B + torch.log(u) * s2 / 5.0, rtol=1e-12, atol=0)
    g_mu, g_ls = torch.autograd.grad(z.sum(), (mu, ls))
    torch.testing.assert_close(g_mu, -torch.log(u) * s2 / 25.0, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_ls, 2 * torch.log(u) * s2 / 5.0, rtol=1e-12, atol=0)


def test_sample_mean_bounds_and_reproducibility():
    points = [(-3.0, 0.0), (-1.0, 1.0), (0.0, -1.0), (2.0, 0.5), (-19.0, 2.0), (-8.0, -3.0), (1.0, 3.0), (5.0, 5.0)]
    gate = SBPGate(len(points)).double()
    with torch.no_grad():
        gate.mu.copy_(torch.tensor([p[0] for p in points]))
        gate.log_sigma.copy_(torch.tensor([p[1] for p in points]))
    n = 200_000
    theta = gate.sample(n, generator=torch.Generator().manual_seed(1234))
    assert theta.shape == (n, len(points)) and theta.dtype == F64
    assert (theta >= math.exp(A)).all() and (theta <= math.exp(B)).all()
    e1 = gate.expected().detach()
    std = (tn.expected_sq(gate.mu.double(), gate.log_sigma.double().exp()).detach() - e1**2).sqrt()
    stderr = std / math.sqrt(n)
    assert ((theta.mean(0) - e1).abs() <= 5 * stderr).all(), (theta.mean(0), e1, stderr)
    # seeded generator: reproducible; another seed: different
    again = gate.sample(n, generator=torch.Generator().manual_seed(1234))
    assert torch.equal(theta, again)
    other = gate.sample(n, generator=torch.Generator().manual_seed(99))
    assert not torch.equal(theta, other)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_samples_within_bounds_over_grid(dtype):
    mus, lss = _dense_grid(dtype)
    gate = SBPGate(mus.numel()).to(dtype)
    with torch.no_grad():
        gate.mu.copy_(mus)
        gate.log_sigma.copy_(lss)
    theta = gate.sample(3, generator=torch.Generator().manual_seed(0)).double()
    slack = 1e-6 if dtype == torch.float32 else 0.0  # float32 rounding of exp(-20) and exp(0)
    assert (theta >= math.exp(A) * (1 - slack)).all() and (theta <= math.exp(B) * (1 + slack)).all()


def test_sample_is_differentiable():
    gate = SBPGate(4)
    theta = gate.sample(8, generator=torch.Generator().manual_seed(0))
    theta.sum().backward()
    assert gate.mu.grad is not None and gate.log_sigma.grad is not None
    assert torch.isfinite(gate.mu.grad).all() and gate.mu.grad.abs().sum() > 0


# ---------------------------------------------------------------------------
# module behaviour
# ---------------------------------------------------------------------------


def _gate_with(points, dtype=torch.float32) -> SBPGate:
    gate = SBPGate(len(points)).to(dtype)
    with torch.no_grad():
        gate.mu.copy_(torch.tensor([p[0] for p in points]))
        gate.log_sigma.copy_(torch.tensor([p[1] for p in points]))
    return gate


def test_construction_defaults():
    gate = SBPGate(7)
    assert gate.num_channels == 7
    assert gate.mu.dtype == torch.float32 and gate.log_sigma.dtype == torch.float32
    assert torch.equal(gate.mu.detach(), torch.zeros(7))
    assert torch.equal(gate.log_sigma.detach(), torch.full((7,), -5.0))
    assert (gate.a, gate.b) == (-20.0, 0.0)
    assert "num_channels=7" in repr(gate) and "a=-20.0" in repr(gate)
    assert {n for n, _ in gate.named_parameters()} == {"mu", "log_sigma"}
    kl = gate.kl()
    assert kl.shape == () and kl.dtype == torch.float32
    torch.testing.assert_close(kl, 7 * tn.kl(torch.tensor(0.0), torch.tensor(math.exp(-5.0))))
    with pytest.raises(ValueError):
        SBPGate(0)
    with pytest.raises(ValueError):
        SBPGate(3, a=0.0, b=-1.0)


def test_mask_threshold_and_deterministic():
    # SNR: (-1,-5) ~ 148.4, (0,2) ~ 0.517, (-3,0) ~ 0.848, (-8,-1) ~ 2.627
    gate = _gate_with([(-1.0, -5.0), (0.0, 2.0), (-3.0, 0.0), (-8.0, -1.0)])
    snr = gate.snr()
    assert snr.shape == (4,) and snr.dtype == torch.float32
    assert gate.mask().tolist() == [True, False, False, True]
    assert gate.mask(0.6).tolist() == [True, False, True, True]
    assert gate.mask(0.5).tolist() == [True, True, True, True]
    assert gate.mask(3.0).tolist() == [True, False, False, False]
    assert torch.equal(gate.mask(2.0), snr > 2.0)
    assert gate.mask().dtype == torch.bool
    det = gate.deterministic()
    assert det[1].item() == 0.0 and det[2].item() == 0.0
    torch.testing.assert_close(det[[0, 3]], gate.expected()[[0, 3]])
    assert (gate.deterministic(0.0) == gate.expected()).all()


@pytest.mark.parametrize(
    "shape,axis",
    [((5, 4), 1), ((5, 4), -1), ((5, 4, 3, 2), 1), ((5, 3, 4), -1), ((5, 3, 4), 2), ((5, 4, 6), 1)],
)
def test_forward_train_and_eval(shape, axis):
    gate = _gate_with([(-1.0, -5.0), (0.0, 2.0), (-3.0, 0.0), (-8.0, -1.0)])
    x = torch.randn(shape)
    ch_axis = axis % len(shape)

    def per_channel(t: torch.Tensor) -> torch.Tensor:  # [B, C, rest] view
        return t.movedim(ch_axis, 1).reshape(shape[0], 4, -1)

    gate.eval()
    y1, y2 = gate(x, channel_axis=axis), gate(x, channel_axis=axis)
    assert y1.shape == x.shape and torch.equal(y1, y2)
    det = gate.deterministic()
    torch.testing.assert_close(per_channel(y1), per_channel(x) * det[None, :, None])
    assert (per_channel(y1)[:, [1, 2]] == 0).all()

    gate.train()
    torch.manual_seed(0)
    ones = torch.ones(shape)
    ya = gate(ones, channel_axis=axis)
    yb = gate(ones, channel_axis=axis)
    assert ya.shape == x.shape and not torch.equal(ya, yb)
    pa = per_channel(ya)
    # one theta per example and channel, broadcast over the other axes
    assert torch.equal(pa, pa[:, :, :1].expand_as(pa))
    theta = pa[:, :, 0]
    assert not torch.equal(theta[0], theta[1])  # per-example draws
    assert (theta > 0).all() and (theta <= 1).all()
    # training output is differentiable w.r.t. the gate parameters
    (gate(x, channel_axis=axis) ** 2).sum().backward()
    assert torch.isfinite(gate.mu.grad).all() and gate.log_sigma.grad.abs().sum() > 0


def test_forward_channel_mismatch_raises():
    gate = SBPGate(4)
    with pytest.raises(ValueError):
        gate(torch.randn(2, 3, 4))  # axis 1 has 3 channels
    with pytest.raises(ValueError):
        gate(torch.randn(2, 4), channel_axis=2)


def test_clip_in_place_and_clamping_inside_computations():
    gate = _gate_with([(-30.0, -40.0), (9.0, 8.0), (-3.0, 0.0), (6.0, -25.0)])
    clipped = _gate_with([(-20.0, -20.0), (5.0, 5.0), (-3.0, 0.0), (5.0, -20.0)])
    # clamped inside every computation, before clip_()
    torch.testing.assert_close(gate.kl(), clipped.kl())
    torch.testing.assert_close(gate.expected(), clipped.expected())
    torch.testing.assert_close(gate.snr(), clipped.snr())
    g1 = gate.sample(16, generator=torch.Generator().manual_seed(3))
    g2 = clipped.sample(16, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(g1, g2)
    # out-of-range parameters get zero gradient from the clamp
    gate.kl().backward()
    assert gate.mu.grad[[0, 1, 3]].abs().sum() == 0 and gate.mu.grad[2] != 0
    out = gate.clip_()
    assert out is gate
    assert gate.mu.detach().tolist() == [-20.0, 5.0, -3.0, 5.0]
    assert gate.log_sigma.detach().tolist() == [-20.0, 5.0, 0.0, -20.0]
    assert gate.mu.requires_grad and isinstance(gate.mu, torch.nn.Parameter)


def test_float64_module():
    gate = _gate_with([(-1.0, -5.0), (0.0, 2.0)], dtype=torch.float64)
    assert gate.kl().dtype == F64 and gate.expected().dtype == F64 and gate.snr().dtype == F64
    assert gate.sample(3).dtype == F64
    gate.eval()
    assert gate(torch.ones(2, 2, dtype=F64)).dtype == F64


@pytest.mark.parametrize("mu0", [-20.0, -12.0, -3.0, 0.0, 2.0, 5.0])
@pytest.mark.parametrize("log_sigma0", [-20.0, -5.0, -1.0, 1.0, 5.0])
def test_channelwise_sampler_equals_the_careful_sampler(mu0, log_sigma0):
    """The fast per-channel path (used in training) gives the same samples and gradients."""
    torch.manual_seed(0)
    mu = torch.full((7,), mu0, dtype=torch.float64, requires_grad=True)
    log_sigma = torch.full((7,), log_sigma0, dtype=torch.float64, requires_grad=True)
    u = torch.rand(5, 7, dtype=torch.float64)
    ref = tn.sample_log(mu.unsqueeze(0), log_sigma.exp().unsqueeze(0), -20.0, 0.0, u)
    fast = tn.sample_log_channels(mu, log_sigma.exp(), -20.0, 0.0, u)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    g_ref = torch.autograd.grad(ref.sum(), [mu, log_sigma])
    g_fast = torch.autograd.grad(fast.sum(), [mu, log_sigma])
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def _mixed_channels() -> tuple[torch.Tensor, torch.Tensor]:
    """Every (mu, log sigma) combination in one vector: direct, upper-tail and lower-tail columns together."""
    grid = [(m, s) for m in (-30.0, -20.0, -12.0, -3.0, 0.0, 2.0, 5.0, 8.0) for s in (-20.0, -5.0, -1.0, 1.0, 5.0)]
    mu = torch.tensor([m for m, _ in grid], dtype=torch.float64, requires_grad=True)
    log_sigma = torch.tensor([s for _, s in grid], dtype=torch.float64, requires_grad=True)
    return mu, log_sigma


def test_branch_free_sampler_equals_the_selecting_sampler():
    """The sampler written for torch.compile (no indexing by case) gives the same samples and gradients."""
    torch.manual_seed(0)
    mu, log_sigma = _mixed_channels()
    u = torch.rand(6, mu.numel(), dtype=torch.float64)
    ref = tn.sample_log_channels(mu, log_sigma.exp(), -20.0, 0.0, u)
    fast = tn.sample_log_channels(mu, log_sigma.exp(), -20.0, 0.0, u, solver=tn.sample_channels_branch_free)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    g_ref = torch.autograd.grad(ref.sum(), [mu, log_sigma])
    g_fast = torch.autograd.grad(fast.sum(), [mu, log_sigma])
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.slow
def test_compiled_gate_matches_eager_gate():
    """torch.compile'd KL, samples and SNR agree with the eager numerics (values and gradients)."""
    gates = []
    for compiled in (False, True):
        torch.manual_seed(0)
        gate = SBPGate(40)
        mu, log_sigma = _mixed_channels()
        with torch.no_grad():
            gate.mu.copy_(mu.clamp(-20, 5).float())
            gate.log_sigma.copy_(log_sigma.float())
        gate.compiled = compiled
        gen = torch.Generator().manual_seed(1)
        loss = gate.kl() + gate.sample(8, generator=gen).sum()
        loss.backward()
        gates.append((loss.detach(), gate.mu.grad, gate.log_sigma.grad, gate.snr(), gate.mask()))
    (l0, gm0, gs0, snr0, m0), (l1, gm1, gs1, snr1, m1) = gates
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gm1, gm0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs1, gs0, rtol=1e-5, atol=1e-6)
    # above ~1e6 an SNR is only "very large" (rounding of a ~1e-15 log-ratio; see truncnorm.snr)
    finite = snr0 < 1e6
    torch.testing.assert_close(snr1[finite], snr0[finite], rtol=1e-6, atol=0)
    assert bool((snr1[~finite] > 1e6).all())
    assert torch.equal(m1, m0)
