"""Recursive Bayesian Pruning gate: noise, KL approximation, mask, layer-by-layer schedule, state.

The KL reference is computed by numerical integration (scipy.integrate.quad, the log
singularity of log|1 + sqrt(alpha) eps| handled by quad's algebraic-logarithmic weights) and
cross-checked against the exact Poisson-series form derived in docs/methods.md (Recursive Bayesian Pruning).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from onnxprune.bayes.rbp import K1, K2, K3, RBPGate, kl_log_uniform, log_alpha_reach

LOG_ALPHA_GRID = np.linspace(-8.0, 8.0, 81)
# KL -> 0 as alpha -> inf fixes the additive constant: -E log|eps| = (gamma + log 2) / 2.
KL_CONST = (np.euler_gamma + math.log(2.0)) / 2.0


# ---------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------


def kl_quad(log_alpha: float) -> float:
    """KL(N(theta, alpha theta^2) || p(|z|) ∝ 1/|z|), normalised to -> 0 as alpha -> inf, by quad.

    KL = -H[q] - E_q log p + const = -0.5 log alpha + E log|1 + sqrt(alpha) eps| + const
       = E log|eps + a| + KL_CONST,  a = alpha^-1/2 (theta cancels).
    """
    a = math.exp(-0.5 * log_alpha)
    L = 40.0  # the standard normal density is below 1e-340 beyond
    kw = dict(epsabs=1e-14, epsrel=1e-12, limit=200)
    if a < L:  # log singularity at eps = -a: integrate phi(eps) * log|eps + a| with quad's log weights
        right = integrate.quad(stats.norm.pdf, -a, L, weight="alg-loga", wvar=(0.0, 0.0), **kw)[0]
        left = integrate.quad(stats.norm.pdf, -L, -a, weight="alg-logb", wvar=(0.0, 0.0), **kw)[0]
        value = left + right
    else:
        value = integrate.quad(lambda e: stats.norm.pdf(e) * math.log(e + a), -L, L, **kw)[0]
    return value + KL_CONST


def kl_series(log_alpha: float) -> float:
    """Exact: (eps + a)^2 is non-central chi-square(1, a^2), a Poisson(a^2/2) mixture of
    chi-square(1 + 2j), and E log chi-square(nu) = log 2 + digamma(nu/2); hence
    KL = 0.5 (E_j digamma(j + 1/2) - digamma(1/2))."""
    lam = 0.5 * math.exp(-log_alpha)
    j = np.arange(int(lam + 40.0 * math.sqrt(lam) + 60))
    return 0.5 * (float(np.sum(stats.poisson.pmf(j, lam) * special.digamma(j + 0.5))) - float(special.digamma(0.5)))


ALPHA = {"parametrization": "alpha"}  # tests that set or read the parameter log_alpha itself


def gate_with(log_alpha, log_theta=None, **kwargs) -> RBPGate:
    la = torch.as_tensor(log_alpha, dtype=torch.float32)
    g = RBPGate(la.numel(), **{**ALPHA, **kwargs})
    with torch.no_grad():
        g.log_alpha.copy_(la)
        if log_theta is not None:
            g.log_theta.copy_(torch.as_tensor(log_theta, dtype=torch.float32))
    return g


# ---------------------------------------------------------------------------
# noise
# ---------------------------------------------------------------------------


def test_noise_moments_match_theta_and_alpha_theta_squared():
    log_theta = torch.tensor([0.0, -1.0, 0.7, 1.5])
    log_alpha = torch.tensor([-8.0, -2.0, 0.0, 1.0])
    g = gate_with(log_alpha, log_theta)
    n = 400_000
    z = g.sample(n, generator=torch.Generator().manual_seed(0)).detach().double()
    assert z.shape == (n, 4)
    theta, alpha = log_theta.double().exp(), log_alpha.double().exp()
    std = (alpha.sqrt() * theta)
    # mean within 5 standard errors; variance within 5 standard errors of a Gaussian sample variance
    assert torch.all((z.mean(0) - theta).abs() <= 5 * std / math.sqrt(n))
    assert torch.all((z.var(0) / std**2 - 1).abs() <= 5 * math.sqrt(2.0 / n))
    # independent across examples and channels
    c = np.corrcoef(z[:, 1:].numpy().T)
    assert np.abs(c - np.eye(3)).max() < 0.01


def test_sample_is_reparametrised():
    g = gate_with([-1.0, 0.5], [0.2, -0.3])
    z = g.sample(64, generator=torch.Generator().manual_seed(1))
    z.sum().backward()
    assert g.log_theta.grad is not None and torch.all(g.log_theta.grad != 0)
    assert g.log_alpha.grad is not None and torch.all(g.log_alpha.grad != 0)


# ---------------------------------------------------------------------------
# KL
# ---------------------------------------------------------------------------


def test_kl_approximation_matches_numerical_integration():
    ref = np.array([kl_quad(la) for la in LOG_ALPHA_GRID])
    series = np.array([kl_series(la) for la in LOG_ALPHA_GRID])
    np.testing.assert_allclose(ref, series, rtol=0, atol=1e-9)  # two independent references agree
    approx = kl_log_uniform(torch.tensor(LOG_ALPHA_GRID, dtype=torch.float64)).numpy()
    diff = approx - ref
    # Same additive constant (both -> 0 as alpha -> inf): the approximation is within 0.01 everywhere,
    # i.e. the difference is constant in log alpha to within 0.01 (we see -0.0044 .. +0.0094).
    assert np.abs(diff).max() < 0.01
    assert diff.max() - diff.min() < 0.02
    # its constant k1 is the exact limit (gamma + log 2) / 2 = 0.635181 to 1e-3
    assert abs(K1 - KL_CONST) < 1e-3


def test_kl_limits_and_sum():
    la = torch.tensor([-30.0, 30.0], dtype=torch.float64)
    kl = kl_log_uniform(la)
    # alpha -> 0: KL ~ -0.5 log alpha + k1 (1 - sigmoid(-inf)); alpha -> inf: 0
    assert abs(float(kl[0]) - (15.0 + K1)) < 1e-6
    assert abs(float(kl[1])) < 1e-6
    g = gate_with([-8.0, 0.0, 3.0])
    expected = sum(K1 - K1 / (1 + math.exp(-(K2 + K3 * v))) + 0.5 * math.log1p(math.exp(-v)) for v in (-8.0, 0.0, 3.0))
    assert g.kl().shape == ()
    assert abs(g.kl().item() - expected) < 1e-4


def test_minimising_kl_increases_alpha():
    g = gate_with(torch.linspace(-9.5, 9.5, 39))
    g.kl().backward()
    assert torch.all(g.log_alpha.grad < 0)  # KL decreases monotonically in alpha
    assert g.log_theta.grad is None or torch.all(g.log_theta.grad == 0)  # KL independent of theta
    before = g.log_alpha.detach().clone()
    kl_before = g.kl().item()
    opt = torch.optim.SGD(g.parameters(), lr=0.1)
    opt.step()
    assert torch.all(g.log_alpha.detach() > before)
    assert g.kl().item() < kl_before


def test_clip_clamps_log_alpha():
    g = gate_with([-50.0, 0.0, 50.0])
    assert torch.isfinite(g.kl()) and torch.isfinite(g.snr()).all()
    g.clip_()
    assert g.log_alpha.tolist() == [-10.0, 0.0, 10.0]


# ---------------------------------------------------------------------------
# the additive parametrization (the default): log sigma^2 = log alpha + 2 log theta
# ---------------------------------------------------------------------------


def test_additive_log_alpha_is_log_sigma2_minus_twice_log_theta():
    g = RBPGate(3)
    assert g.parametrization == "additive" and not hasattr(g, "log_alpha")
    assert torch.all(g.log_alpha_values() == -8.0) and torch.all(g.deterministic() == 1)  # same start as "alpha"
    with torch.no_grad():
        g.log_theta.copy_(torch.tensor([0.0, -1.0, 0.5]))
        g.log_sigma2.copy_(torch.tensor([-8.0, 1.0, -2.0]))
    torch.testing.assert_close(g.log_alpha_values(), torch.tensor([-8.0, 3.0, -3.0]))
    assert g.mask().tolist() == [True, True, True]  # log alpha 3.0 is at the threshold, kept
    z = g.sample(400_000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.std(0).square(), g.log_sigma2.detach().exp(), rtol=0.02, atol=0)  # Var z = sigma^2


def test_additive_kl_shrinks_theta_and_grows_sigma():
    g = RBPGate(5)
    with torch.no_grad():
        g.log_sigma2.copy_(torch.linspace(-8.0, 4.0, 5))
    g.kl().backward()
    assert torch.all(g.log_theta.grad > 0) and torch.all(g.log_sigma2.grad < 0)
    torch.testing.assert_close(g.log_theta.grad, -2 * g.log_sigma2.grad)  # d log alpha / d log theta = -2
    before = g.log_alpha_values().clone()
    torch.optim.SGD(g.parameters(), lr=0.1).step()
    assert torch.all(g.log_alpha_values() > before)


def test_additive_clip_keeps_log_alpha_in_range():
    g = RBPGate(3)
    with torch.no_grad():
        g.log_theta.copy_(torch.tensor([-4.0, 0.0, 2.0]))
        g.log_sigma2.copy_(torch.tensor([40.0, 0.0, -40.0]))
    g.clip_()
    torch.testing.assert_close(g.log_alpha_values(), torch.tensor([10.0, 0.0, -10.0]))
    torch.testing.assert_close(g.log_sigma2.detach(), torch.tensor([2.0, 0.0, -6.0]))


def test_additive_state_dict_holds_log_sigma2():
    g = RBPGate(4)
    assert set(g.state_dict()) == {"log_theta", "log_sigma2", "state_code", "frozen_mask"}


def test_unknown_parametrization_is_rejected():
    with pytest.raises(ValueError, match="parametrization"):
        RBPGate(2, parametrization="beta")


# ---------------------------------------------------------------------------
# threshold, mask, evaluation
# ---------------------------------------------------------------------------


def test_threshold_mask_and_exact_zeros():
    g = gate_with([-8.0, 2.9, 3.0, 3.1, 9.0], [0.1, 0.2, 0.3, 0.4, 0.5])
    assert g.mask().tolist() == [True, True, True, False, False]
    det = g.deterministic()
    assert det[3].item() == 0.0 and det[4].item() == 0.0  # exact zeros
    torch.testing.assert_close(det[:3], torch.tensor([0.1, 0.2, 0.3]).exp())
    assert g.mask(log_alpha_threshold=0.0).tolist() == [True, False, False, False, False]
    torch.testing.assert_close(g.snr(), torch.exp(-0.5 * g.log_alpha.detach()))
    torch.testing.assert_close(g.dropout_rate()[2], torch.tensor(1 / (1 + math.exp(-3.0))))  # 0.953
    torch.testing.assert_close(g.expected(), g.log_theta.detach().exp())


def test_eval_is_deterministic():
    g = gate_with([-8.0, 5.0, 0.0], [0.3, 0.1, -0.2])
    x = torch.randn(6, 3, 4, 4)
    g.eval()
    y1, y2 = g(x), g(x)
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y1, x * g.deterministic().reshape(1, 3, 1, 1))
    assert torch.all(y1[:, 1] == 0)
    g.train()
    y3, y4 = g(x), g(x)
    assert not torch.equal(y3, y4)  # training samples noise, per example
    y = g(torch.ones(2, 3))  # linear layout, channels last
    assert y.shape == (2, 3)


def test_initial_gate_is_almost_the_identity():
    g = RBPGate(8)
    assert g.state == "active" and g.stage_index == 0 and g.stage_count == 1
    assert torch.all(g.deterministic() == 1)
    z = g.sample(1000, generator=torch.Generator().manual_seed(0))
    assert (z - 1).abs().max() < 0.1  # sqrt(e^-8) = 0.018 relative noise


# ---------------------------------------------------------------------------
# layer-by-layer schedule
# ---------------------------------------------------------------------------


def states(stage_count: int, epochs: int) -> list[str]:
    """One string per epoch: a letter per gate (d dormant, a active, f frozen)."""
    rows = []
    for e in range(epochs):
        rows.append("".join(RBPGate.schedule(k, stage_count, e, epochs)[0] for k in range(stage_count)))
    return rows


@pytest.mark.parametrize(
    "stage_count, epochs, expected",
    [
        (1, 3, ["a", "a", "a"]),
        (2, 4, ["ad", "ad", "fa", "fa"]),
        (3, 3, ["add", "fad", "ffa"]),
        (3, 10, ["add"] * 4 + ["fad"] * 3 + ["ffa"] * 3),  # stage = epoch * 3 // 10
        (4, 6, ["addd", "addd", "fadd", "ffad", "ffad", "fffa"]),
        # more gates than epochs: neighbours share an epoch, none is skipped
        (5, 2, ["aaadd", "fffaa"]),
        (7, 3, ["aaadddd", "fffaadd", "fffffaa"]),
    ],
)
def test_schedule(stage_count, epochs, expected):
    got = states(stage_count, epochs)
    assert got == expected
    for k in range(stage_count):  # every gate: dormant* active+ frozen*, active at least once
        seq = "".join(row[k] for row in got)
        assert "a" in seq and seq == "d" * seq.count("d") + "a" * seq.count("a") + "f" * seq.count("f")
    # past the end: the last epoch's states
    assert [RBPGate.schedule(k, stage_count, epochs + 5, epochs)[0] for k in range(stage_count)] == list(got[-1])


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError):
        RBPGate.schedule(3, 3, 0, 5)
    with pytest.raises(ValueError):
        RBPGate.schedule(0, 1, 0, 0)


def test_begin_epoch_states_and_frozen_mask_stays_fixed():
    g = gate_with([-8.0, 5.0, 0.0, 4.0], [0.1, 0.2, 0.3, 0.4])
    g.stage_index, g.stage_count = 1, 3
    epochs = 6  # gate 1 is active in epochs 2 and 3
    x = torch.rand(5, 4)

    g.begin_epoch(0, epochs)
    assert g.state == "dormant"
    assert g.kl().item() == 0.0
    assert torch.all(g.sample(5) == 1) and torch.all(g.deterministic() == 1) and torch.all(g.mask())
    out = (g.train()(x)).sum()
    assert not out.requires_grad  # dormant: no parameter is used

    g.begin_epoch(2, epochs)
    assert g.state == "active"
    assert g.kl().item() > 0
    assert g.mask().tolist() == [True, False, True, False]

    g.begin_epoch(4, epochs)  # stage over: the mask is fixed from log alpha at the end of the stage
    assert g.state == "frozen"
    frozen_det = g.deterministic().detach().clone()
    assert g.mask().tolist() == [True, False, True, False]
    with torch.no_grad():
        g.log_alpha.copy_(torch.tensor([9.0, -9.0, 9.0, -9.0]))  # later changes of alpha do not matter
    for e in (4, 5, 9):
        g.begin_epoch(e, epochs)
        assert g.state == "frozen"
        assert g.mask().tolist() == [True, False, True, False]
        assert torch.equal(g.deterministic(), frozen_det)
    assert g.kl().item() == 0.0
    z = g.sample(7)
    assert z.shape == (7, 4) and torch.equal(z, frozen_det.expand(7, -1))  # no noise
    g.zero_grad()
    (g.train()(x)).sum().backward()
    assert g.log_alpha.grad is None  # alpha no longer trained
    assert g.log_theta.grad is not None and g.log_theta.grad[1] == 0 and g.log_theta.grad[0] != 0  # theta is

    g.begin_epoch(0, epochs)  # a new schedule (e.g. a second run) releases the mask
    assert g.state == "dormant" and torch.all(g.mask())


def test_first_gate_active_then_frozen_and_last_gate_dormant_then_active():
    gates = [RBPGate(3) for _ in range(3)]
    for i, g in enumerate(gates):
        g.stage_index, g.stage_count = i, 3
    seen = []
    for e in range(9):
        for g in gates:
            g.begin_epoch(e, 9)
        seen.append(tuple(g.state for g in gates))
    assert seen[0] == ("active", "dormant", "dormant")
    assert seen[4] == ("frozen", "active", "dormant")
    assert seen[8] == ("frozen", "frozen", "active")


def test_non_recursive_gate_is_always_active():
    g = RBPGate(4, recursive=False)
    g.stage_index, g.stage_count = 2, 5
    for e in range(10):
        g.begin_epoch(e, 10)
        assert g.state == "active"
        assert g.kl().item() > 0


def test_set_state_rejects_unknown():
    with pytest.raises(ValueError):
        RBPGate(2).set_state("sleeping")


def test_after_step_is_a_no_op():
    g = gate_with([0.0, 1.0])
    before = {k: v.clone() for k, v in g.state_dict().items()}
    g.after_step()
    assert all(torch.equal(before[k], v) for k, v in g.state_dict().items())


# ---------------------------------------------------------------------------
# state_dict
# ---------------------------------------------------------------------------


def test_state_dict_round_trip_keeps_parameters_state_and_frozen_mask():
    g = gate_with([-8.0, 6.0, 1.0, 3.5], [0.5, -0.5, 0.0, 1.0])
    g.stage_index, g.stage_count = 0, 2
    g.begin_epoch(3, 4)  # frozen with mask [T, F, T, F]
    with torch.no_grad():
        g.log_alpha.fill_(-9.0)  # the frozen mask no longer follows alpha
    sd = g.state_dict()
    assert set(sd) == {"log_theta", "log_alpha", "state_code", "frozen_mask"}
    h = RBPGate(4, **ALPHA)
    assert h.state == "active"
    h.load_state_dict(sd)
    assert h.state == "frozen"
    assert h.mask().tolist() == [True, False, True, False]
    assert torch.equal(h.deterministic(), g.deterministic())
    assert torch.equal(h.log_alpha, g.log_alpha) and torch.equal(h.log_theta, g.log_theta)
    # resume: the wrapper sets the position again and calls begin_epoch; the saved mask is kept
    h.stage_index, h.stage_count = 0, 2
    h.begin_epoch(3, 4)
    assert h.mask().tolist() == [True, False, True, False]


# ---------------------------------------------------------------------------
# inside a wrapped model
# ---------------------------------------------------------------------------


def test_wrapped_model_trains_layer_by_layer():
    from onnxprune.bayes import methods

    if "rbp" not in methods.METHODS:
        pytest.skip("rbp not registered in onnxprune.bayes.methods")
    import torch.nn as nn

    from onnxprune import bayes

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).eval()
    x = torch.rand(4, 3, 8, 8)
    wrapped = bayes.wrap(model, (x[:1],), method="rbp", **ALPHA)
    gates = list(wrapped.gates.values())
    assert len(gates) == 2 and all(isinstance(g, RBPGate) for g in gates)
    for i, g in enumerate(gates):
        g.stage_index, g.stage_count = i, len(gates)  # what the wrapper does; set here in case it does not
    first, second = gates
    with torch.no_grad():
        first.log_alpha[:3] = 8.0  # first layer: 3 redundant channels
    for g in gates:
        g.begin_epoch(2, 4)  # stage 1: first frozen, second active
    assert (first.state, second.state) == ("frozen", "active")
    wrapped.train()
    loss = wrapped(x).square().mean() + wrapped.kl()
    loss.backward()
    assert first.log_alpha.grad is None and second.log_alpha.grad is not None
    assert wrapped.kl().item() == pytest.approx(second.kl().item())
    wrapped.eval()
    with torch.no_grad():
        y1, y2 = wrapped(x), wrapped(x)
    assert torch.equal(y1, y2)
    assert wrapped.kept()[next(iter(wrapped.gates))] == (5, 8)



@pytest.mark.parametrize("parametrization", ["additive", "alpha"])
def test_toy_elbo_prunes_layer_by_layer(parametrization):
    """Two chained gates, y = sum(x * z1 * z2), target x0 + x1 + x2 (x3 is a nuisance input).

    Stage 0 (gate 1 active, gate 2 dormant): channel 3 of gate 1 only adds error, so its theta
    shrinks and, its noise becoming cheap, the KL raises its alpha; the useful channels keep
    alpha small (their noise costs N * alpha * theta^2 * E[x^2]). Stage 1 (gate 1 frozen, its
    mask fixed, noise off): channel 3 of gate 2 now multiplies an almost-silent input and is
    pruned; the useful channels of both gates are kept.
    """
    torch.manual_seed(0)
    n_data, steps, epochs = 100, 300, 2
    g1, g2 = RBPGate(4, parametrization=parametrization), RBPGate(4, parametrization=parametrization)
    for i, g in enumerate((g1, g2)):
        g.stage_index, g.stage_count = i, 2
    opt = torch.optim.Adam([*g1.parameters(), *g2.parameters()], lr=0.1)
    for epoch in range(epochs):
        for g in (g1, g2):
            g.begin_epoch(epoch, epochs)
        for _ in range(steps):
            x = torch.randn(64, 4)
            pred = (x * g1.sample(64) * g2.sample(64)).sum(1)
            loss = n_data * (pred - x[:, :3].sum(1)).square().mean() + g1.kl() + g2.kl()
            opt.zero_grad()
            loss.backward()
            opt.step()
            g1.clip_(), g2.clip_()
        if epoch == 0:
            assert g2.state == "dormant" and torch.all(g2.log_alpha_values() == -8.0)  # untouched while dormant
            la, lt = g1.log_alpha_values().clone(), g1.log_theta.detach().clone()
            noise = g1.noise_parameter().detach().clone()
            assert la[3] > la[:3].max() + 4 and lt[3] < lt[:3].min() - 2
            mask0 = g1.mask()
    assert (g1.state, g2.state) == ("frozen", "active")
    assert torch.equal(g1.mask(), mask0) and torch.equal(g1.noise_parameter().detach(), noise)  # frozen: noise untouched
    assert mask0[:3].all() and g2.mask().tolist() == [True, True, True, False]


@pytest.mark.parametrize("stage_count,epochs", [(1, 3), (2, 4), (3, 9), (3, 10), (4, 6), (5, 2), (7, 3)])
def test_stage_span_covers_exactly_the_epochs_of_the_active_stage(stage_count, epochs):
    for e in range(epochs):
        start, end = RBPGate.stage_span(stage_count, e, epochs)
        assert start <= e < end <= epochs
        active = {k for k in range(stage_count) if RBPGate.schedule(k, stage_count, e, epochs) == "active"}
        for other in range(epochs):  # the same gates are active in every epoch of the span, and only there
            same = {k for k in range(stage_count) if RBPGate.schedule(k, stage_count, other, epochs) == "active"} == active
            assert same == (start <= other < end)


def test_wrapped_model_reports_a_stage_span_only_for_recursive_gates():
    import torch.nn as nn

    from onnxprune import bayes

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.rand(2, 4)
    wrapped = bayes.wrap(model, (x,), method="rbp")  # 2 gates: 6 of 12 epochs each
    assert wrapped.stage_span(5, 12) == (0, 6) and wrapped.stage_span(6, 12) == (6, 12)
    assert bayes.wrap(model, (x,), method="rbp", recursive=False).stage_span(5, 12) is None
    assert bayes.wrap(model, (x,), method="sbp").stage_span(5, 12) is None


def test_a_compiled_training_step_is_traced_once_for_every_stage_of_the_schedule():
    """The gate reads its state as data: a compiled forward and KL (as fit compiles them) is not recompiled when the
    schedule moves a gate from dormant to active to frozen, where a branch on the host-side state would be."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    g = RBPGate(4)
    g.stage_index, g.stage_count = 1, 3
    g.state_as_data = True  # as fit sets it while it runs a compiled step
    counter = CompileCounter()
    step = torch.compile(lambda x: g(x).sum() + g.kl(), backend=counter, dynamic=False)
    x = torch.rand(5, 4)
    g.train()
    values = []
    for epoch in (0, 2, 4):  # dormant, active, frozen
        g.begin_epoch(epoch, 6)
        values.append(step(x))
    assert g.state == "frozen" and counter.frame_count == 1
    assert torch.allclose(values[0], x.sum())  # dormant: ones, no KL
    assert torch.allclose(values[2], (x * g.deterministic()).sum())  # frozen: theta * mask, no KL
    torch._dynamo.reset()


@pytest.mark.parametrize("state_as_data", [False, True])
def test_a_state_trains_only_its_parameters_when_the_state_is_read_as_data_too(state_as_data):
    """Dormant trains nothing, frozen theta only, active both; read as data, the untrained parameters get zero
    gradients in the graph, which before_step drops, so the optimizer sees what an eager branch gives it."""
    g = RBPGate(4, parametrization="alpha")
    g.stage_index, g.stage_count = 1, 3
    g.state_as_data = state_as_data
    x = torch.rand(5, 4)
    trained = {}
    for epoch, state in ((0, "dormant"), (2, "active"), (4, "frozen")):
        g.begin_epoch(epoch, 6)
        assert g.state == state
        g.zero_grad(set_to_none=True)
        out = (g.train()(x)).sum() + g.kl()
        if out.requires_grad:
            out.backward()
        g.before_step()
        trained[state] = (g.log_theta.grad is not None, g.log_alpha.grad is not None)
    assert trained == {"dormant": (False, False), "active": (True, True), "frozen": (True, False)}


@pytest.mark.parametrize("parametrization,per_step", [("additive", 3.0), ("alpha", 1.0)])
def test_the_kl_alone_moves_log_alpha_by_the_estimated_reach(parametrization, per_step):
    """Under a steady gradient Adam moves each parameter by its learning rate per step, so the KL alone carries
    log alpha log_alpha_reach() in n steps: three times the rate per step when log sigma^2 and log theta both move."""
    lr, steps = 0.01, 100
    gate = RBPGate(4, parametrization=parametrization)
    opt = torch.optim.Adam(gate.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        gate.kl().backward()
        opt.step()
    travelled = gate.log_alpha_values() - gate.init_log_alpha
    reach = log_alpha_reach(lr, [1.0] * steps, parametrization)
    assert reach == pytest.approx(per_step * lr * steps)
    assert torch.allclose(travelled, torch.full_like(travelled, reach), rtol=0.01)


def test_log_alpha_reach_sums_the_schedule_and_rejects_an_unknown_parametrization():
    assert log_alpha_reach(0.1, [1.0, 0.5, 0.0]) == pytest.approx(0.45)
    with pytest.raises(ValueError, match="parametrization"):
        log_alpha_reach(0.1, [1.0], "gaussian")


def _two_gate_model():
    import torch.nn as nn

    from onnxprune import bayes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    return bayes.wrap(model, (torch.zeros(1, 3, 6, 6),), method="rbp")


def test_fit_warns_when_a_stage_is_too_short_for_any_channel_to_be_rejected():
    from onnxprune.bayes.training import fit

    x = np.random.default_rng(0).random((64, 3, 6, 6), dtype=np.float32)
    y = np.arange(64) % 3
    with pytest.warns(RuntimeWarning, match=r"2 of 2 gates train for too few steps.*at least 1\.8"):
        fit(_two_gate_model(), x, y, epochs=2, batch_size=32, gate_lr=1e-3, progress=False, compile_step=False)


def test_fit_does_not_warn_when_every_stage_can_reach_the_threshold(recwarn):
    from onnxprune.bayes.schedule import reach_warning
    from onnxprune.bayes.training import fit

    x = np.random.default_rng(0).random((64, 3, 6, 6), dtype=np.float32)
    y = np.arange(64) % 3
    fit(_two_gate_model(), x, y, epochs=2, batch_size=32, gate_lr=2.0, progress=False, compile_step=False)
    assert not [w for w in recwarn if "too few steps" in str(w.message)]
    # a cosine schedule restarted per stage halves the reach: the same rate then falls short
    assert reach_warning(_two_gate_model(), epochs=2, steps_per_epoch=2, gate_lr=2.0) is None
    assert "at least 2.4" in reach_warning(_two_gate_model(), epochs=2, steps_per_epoch=2, gate_lr=2.0,
                                           lr_schedule="cosine")
