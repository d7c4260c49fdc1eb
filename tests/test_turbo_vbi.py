"""Turbo-VBI gate: module A closed forms, module B message passing (against brute-force
enumeration of the MRF), the regulariser, a toy end-to-end fit, persistence and numerics."""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from onnxprune.bayes.turbo_vbi import (
    TurboVBIGate,
    chain_messages,
    collapsed_log_evidence,
    collapsed_precision,
    gamma_update,
    log_evidence,
    log_prior_partition,
    support_messages,
    support_update,
)

F64 = torch.float64


# ---------------------------------------------------------------------------
# brute force: enumerate every joint state of the support MRF
# ---------------------------------------------------------------------------


def _chain_weight(s, lam, t, p_stay, p_start, eps, evidence=True):
    w = p_start if s[0] else 1.0 - p_start
    for j in range(1, len(s)):
        w *= p_stay if s[j] == s[j - 1] else 1.0 - p_stay
    for j, sj in enumerate(s):
        if sj and t == 0:
            w *= eps
        if sj and evidence:
            w *= math.exp(lam[j])
    return w


def brute_force(lams, positions, num_channels, *, p_channel, p_stay, p_start, eps):
    """P(t_c = 1 | E) per channel (nan without units) and P(s = 1 | E) per producer [R, J].

    Joint: prior(t) * prod_chains [chain(s) prod_j psi(t, s_j) / Z_t(chain)] * prod_j l_j^{s_j},
    with Z_t the chain's conditional-prior normaliser (1 for t = 1)."""
    chains = [(int(pos[r]), l, r, np.asarray(lam[r], dtype=float))
              for l, (lam, pos) in enumerate(zip(lams, positions)) for r in range(len(pos))]
    p_t = np.full(num_channels, np.nan)
    marg = [np.zeros(np.asarray(lam).shape) for lam in lams]
    kw = dict(p_stay=p_stay, p_start=p_start, eps=eps)
    for c in range(num_channels):
        mine = [ch for ch in chains if ch[0] == c]
        if not mine:
            continue
        total = active = 0.0
        acc = [np.zeros(len(ch[3])) for ch in mine]
        for t in (0, 1):
            prior = p_channel if t else 1.0 - p_channel
            norm = 1.0
            for ch in mine:
                norm *= sum(_chain_weight(s, ch[3], t, evidence=False, **kw) for s in itertools.product((0, 1), repeat=len(ch[3])))
            for states in itertools.product(*[list(itertools.product((0, 1), repeat=len(ch[3]))) for ch in mine]):
                w = prior / norm
                for ch, s in zip(mine, states):
                    w *= _chain_weight(s, ch[3], t, **kw)
                total += w
                active += w * t
                for k, s in enumerate(states):
                    acc[k] += w * np.asarray(s)
        p_t[c] = active / total
        for k, ch in enumerate(mine):
            marg[ch[1]][ch[2]] = acc[k] / total
    return p_t, marg


def naive_chain(lam, t, p_stay, p_start, eps):
    """Plain sequential forward-backward in log space (numpy): log F and log P(s_j | t, E)."""
    J = len(lam)
    T = np.log([[p_stay, 1 - p_stay], [1 - p_stay, p_stay]])
    u = np.zeros((J, 2))
    u[:, 1] = lam + (math.log(eps) if t == 0 else 0.0)
    al = np.zeros((J, 2))
    al[0] = np.log([1 - p_start, p_start]) + u[0]
    for j in range(1, J):
        al[j] = special.logsumexp(al[j - 1][:, None] + T, axis=0) + u[j]
    be = np.zeros((J, 2))
    for j in range(J - 1, 0, -1):
        be[j - 1] = special.logsumexp(T + (u[j] + be[j])[None, :], axis=1)
    lf = special.logsumexp(al[-1])
    return lf, al + be - lf


MRF = dict(p_channel=0.35, p_stay=0.8, p_start=0.4, eps=0.05)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------
# module A
# ---------------------------------------------------------------------------


def test_gamma_update_by_hand():
    pi = torch.tensor([0.3, 1.0, 0.0], dtype=F64)
    sq = torch.tensor([2.5, 0.0, 4.0], dtype=F64)
    a_t, b_t = gamma_update(pi, sq, 9, 1.5, 0.2, 2.0, 1e-4)
    # a_tilde = pi a + (1 - pi) a_bar + n/2; b_tilde = pi b + (1 - pi) b_bar + ||w||^2 / 2
    assert a_t.tolist() == pytest.approx([0.3 * 1.5 + 0.7 * 2.0 + 4.5, 1.5 + 4.5, 2.0 + 4.5], rel=1e-15)
    assert b_t.tolist() == pytest.approx([0.3 * 0.2 + 0.7 * 1e-4 + 1.25, 0.2, 1e-4 + 2.0], rel=1e-15)


@pytest.mark.parametrize("a, b, a_bar, b_bar", [(1.5, 0.2, 2.0, 1e-4), (1.0, 0.01, 1.0, 1e-6), (0.7, 3.0, 0.7, 0.5)])
def test_log_evidence_is_expected_log_density_ratio(a, b, a_bar, b_bar):
    a_t, b_t = torch.tensor([6.35, 0.8], dtype=F64), torch.tensor([1.31007, 2.5], dtype=F64)
    lam = log_evidence(a_t, b_t, a, b, a_bar, b_bar)
    for k in range(2):
        q = stats.gamma(a=float(a_t[k]), scale=1.0 / float(b_t[k]))
        # hand: E[rho] = a_t / b_t, E[log rho] = digamma(a_t) - log b_t
        e_rho, e_log = float(a_t[k] / b_t[k]), special.digamma(float(a_t[k])) - math.log(float(b_t[k]))
        hand = (a * math.log(b) - special.gammaln(a) + (a - 1) * e_log - b * e_rho) - (
            a_bar * math.log(b_bar) - special.gammaln(a_bar) + (a_bar - 1) * e_log - b_bar * e_rho
        )
        ref, _ = integrate.quad(
            lambda r, q=q: q.pdf(r) * (stats.gamma.logpdf(r, a, scale=1 / b) - stats.gamma.logpdf(r, a_bar, scale=1 / b_bar)),
            0,
            np.inf,
            limit=200,
        )
        assert float(lam[k]) == pytest.approx(hand, rel=1e-12, abs=1e-12)
        assert float(lam[k]) == pytest.approx(ref, rel=1e-7, abs=1e-7)


def _log_marginal(w, a, b):
    """log ∫ prod_i N(w_i; 0, 1/rho) Gamma(rho; a, b) drho by quadrature over log rho."""
    n, S = len(w), float(np.sum(np.square(w)))

    def log_integrand(x):  # x = log rho
        return (a * math.log(b) - special.gammaln(a) + a * x - b * math.exp(x)
                + 0.5 * n * (x - math.log(2 * math.pi)) - 0.5 * S * math.exp(x))

    mode = math.log((a + 0.5 * n) / (b + 0.5 * S))
    peak = log_integrand(mode)
    val, _ = integrate.quad(lambda x: math.exp(log_integrand(x) - peak), mode - 60, mode + 30, points=[mode], limit=400)
    return peak + math.log(val)


@pytest.mark.parametrize("w", [[0.3, -0.1, 0.05], [0.0, 0.0, 0.0], [2.0, 1.0, -3.0], [1e-3, -2e-3, 0.0]])
def test_collapsed_evidence_and_precision_by_quadrature(w):
    a, b, a_bar, b_bar = 1.0, 1.0 / 4.5, 1.0, 1e-6
    sq = torch.tensor([float(np.sum(np.square(w)))], dtype=F64)
    lam = collapsed_log_evidence(sq, len(w), a, b, a_bar, b_bar)
    assert float(lam) == pytest.approx(_log_marginal(w, a, b) - _log_marginal(w, a_bar, b_bar), rel=1e-8, abs=1e-8)
    # E[rho | w] = pi E[rho | w, s=1] + (1 - pi) E[rho | w, s=0]; the conditional is Gamma(a + n/2, b + ||w||^2/2)
    pi = torch.tensor([0.3], dtype=F64)
    e = collapsed_precision(pi, sq, len(w), a, b, a_bar, b_bar)
    hand = 0.3 * (a + 1.5) / (b + sq / 2) + 0.7 * (a_bar + 1.5) / (b_bar + sq / 2)
    assert float(e) == pytest.approx(float(hand), rel=1e-14)


def test_support_update_is_prior_message_times_evidence():
    prior = torch.tensor([0.2, 0.5, 0.9, 1e-6], dtype=F64)
    lam = torch.tensor([1.3, -2.0, 0.0, 12.0], dtype=F64)
    got = support_update(torch.log(prior) - torch.log1p(-prior), lam)
    l = torch.exp(lam)
    want = prior * l / (prior * l + (1 - prior))
    assert torch.allclose(got, want, rtol=1e-14, atol=0)


# ---------------------------------------------------------------------------
# module B: exact marginals of the support MRF
# ---------------------------------------------------------------------------


def _check_against_brute_force(lams, positions, C, **kw):
    msg = support_messages(lams, positions, C, **kw)
    p_t, marg = brute_force([l.numpy() for l in lams], [p.numpy() for p in positions], C, **kw)
    covered = ~np.isnan(p_t)
    assert msg.covered.numpy().tolist() == covered.tolist()
    got_t = torch.sigmoid(msg.channel_logit).numpy()
    np.testing.assert_allclose(got_t[covered], p_t[covered], rtol=0, atol=1e-10)
    for l, lam in enumerate(lams):
        got = torch.sigmoid(msg.prior_logit[l] + lam).numpy()  # B's marginal = extrinsic x evidence
        np.testing.assert_allclose(got, marg[l], rtol=0, atol=1e-10)
    return msg


def test_hub_and_two_chains_match_enumeration():
    g = torch.Generator().manual_seed(1)
    lams = [torch.randn(1, 3, generator=g, dtype=F64) * 2, torch.randn(1, 4, generator=g, dtype=F64) * 2]
    positions = [torch.tensor([0]), torch.tensor([0])]
    _check_against_brute_force(lams, positions, 1, **MRF)
    # and with the defaults (eps = 1e-3, p_stay = 0.9, p_channel = p_start = 0.5)
    _check_against_brute_force(lams, positions, 1, p_channel=0.5, p_stay=0.9, p_start=0.5, eps=1e-3)


def test_several_channels_rows_and_an_uncovered_channel_match_enumeration():
    g = torch.Generator().manual_seed(2)
    lams = [torch.randn(3, 2, generator=g, dtype=F64) * 3, torch.randn(2, 3, generator=g, dtype=F64),
            torch.randn(1, 1, generator=g, dtype=F64)]
    positions = [torch.tensor([2, 0, 1]), torch.tensor([0, 2]), torch.tensor([1])]  # channel 3: no units
    msg = _check_against_brute_force(lams, positions, 4, **MRF)
    assert float(torch.sigmoid(msg.channel_logit[3])) == pytest.approx(MRF["p_channel"], abs=1e-15)  # the prior


def test_extreme_evidence_matches_enumeration():
    lams = [torch.tensor([[30.0, -25.0, 0.5]], dtype=F64), torch.tensor([[-40.0, -40.0, 12.0, -3.0]], dtype=F64)]
    _check_against_brute_force(lams, [torch.tensor([0]), torch.tensor([0])], 1, **MRF)


@pytest.mark.parametrize("how", ["p_channel=1", "eps=1"])
def test_chain_only_matches_enumeration(how):
    # with the hub pinned active (p_channel = 1) or decoupled (eps = 1), each row is a plain Markov chain
    kw = dict(MRF, p_channel=1.0) if how == "p_channel=1" else dict(MRF, eps=1.0)
    g = torch.Generator().manual_seed(3)
    lam = torch.randn(2, 6, generator=g, dtype=F64) * 2
    msg = support_messages([lam], [torch.tensor([0, 1])], 2, **kw)
    for r in range(2):
        states = list(itertools.product((0, 1), repeat=6))
        w = np.array([_chain_weight(s, lam[r].numpy(), 1, kw["p_stay"], kw["p_start"], 1.0) for s in states])
        want = (w[:, None] * np.array(states)).sum(0) / w.sum()
        np.testing.assert_allclose(torch.sigmoid(msg.prior_logit[0][r] + lam[r]).numpy(), want, rtol=0, atol=1e-10)
        # the extrinsic message is the chain prior given the other units' evidence
        lam0 = lam[r].clone()
        for j in range(6):
            lam_j = lam0.clone()
            lam_j[j] = 0.0
            wj = np.array([_chain_weight(s, lam_j.numpy(), 1, kw["p_stay"], kw["p_start"], 1.0) for s in states])
            prior_j = (wj * np.array(states)[:, j]).sum() / wj.sum()
            assert float(torch.sigmoid(msg.prior_logit[0][r, j])) == pytest.approx(prior_j, abs=1e-10)


def test_extrinsic_message_does_not_depend_on_own_evidence():
    g = torch.Generator().manual_seed(4)
    lams = [torch.randn(3, 7, generator=g, dtype=F64), torch.randn(2, 5, generator=g, dtype=F64)]
    positions = [torch.tensor([0, 1, 0]), torch.tensor([1, 0])]
    base = support_messages(lams, positions, 2, **MRF).prior_logit
    for l, r, j in [(0, 0, 0), (0, 2, 6), (1, 1, 3)]:
        moved = [x.clone() for x in lams]
        moved[l][r, j] += 5.0
        assert float(support_messages(moved, positions, 2, **MRF).prior_logit[l][r, j]) == pytest.approx(float(base[l][r, j]), abs=1e-10)


@pytest.mark.parametrize("J", [1, 2, 3, 4, 5, 9, 10, 17, 50, 101])
def test_blocked_forward_backward_matches_sequential(J):
    g = torch.Generator().manual_seed(J)
    lam = torch.randn(3, J, generator=g, dtype=F64) * 3
    kw = dict(p_stay=0.9, p_start=0.3, eps=1e-3)
    log_f, cav = chain_messages(lam, **kw)
    for t in (0, 1):
        for r in range(3):
            lf, lm = naive_chain(lam[r].numpy(), t, **kw)
            assert float(log_f[t, r]) == pytest.approx(lf, abs=1e-10)
            got = cav[t, r].numpy() + np.stack([np.zeros(J), lam[r].numpy()], 1)
            np.testing.assert_allclose(got, lm, rtol=0, atol=1e-10)
    lf0, _ = naive_chain(np.zeros(J), 0, **kw)
    assert log_prior_partition(J, **kw) == pytest.approx(lf0, abs=1e-12)


# ---------------------------------------------------------------------------
# the gate
# ---------------------------------------------------------------------------


def _linear(out_f, in_f, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter((torch.randn(out_f, in_f, generator=g) * math.sqrt(2.0 / in_f)).to(dtype))


def test_before_attach_and_without_producers():
    for gate in (TurboVBIGate(5), TurboVBIGate(5).attach([])):
        assert torch.equal(gate.active_probability(), torch.ones(5, dtype=F64))
        assert torch.equal(gate.deterministic(), torch.ones(5))
        assert torch.equal(gate.sample(3), torch.ones(3, 5))
        assert float(gate.kl()) == 0.0
        gate.after_step()
        gate.update()
        assert gate.kept() == (5, 5)


def test_regulariser_value_and_gradient():
    w = _linear(6, 5, dtype=F64)
    rows, positions = torch.tensor([4, 0, 2]), torch.tensor([1, 2, 0])
    for evidence in ("collapsed", "mean_field"):
        gate = TurboVBIGate(3, evidence=evidence).attach([(w, rows, positions)])
        w.grad = None
        reg = gate.kl()
        reg.backward()
        reg = reg.detach()
        erho = gate.expected_precision(0)
        assert erho.shape == (3, 5) and bool((erho > 0).all())
        want_grad = torch.zeros_like(w)
        want_grad[rows] = erho * w.detach()[rows]
        assert torch.allclose(w.grad, want_grad, rtol=1e-12, atol=0)
        assert float(reg) == pytest.approx(float(0.5 * (erho * w.detach()[rows] ** 2).sum()), rel=1e-12)
    # conv weights: one unit per (row, input channel), E[rho] shared by its k*k weights
    wc = torch.nn.Parameter(torch.randn(4, 3, 3, 3, dtype=F64) * 0.3)
    gate = TurboVBIGate(4).attach([(wc, torch.arange(4), torch.arange(4))])
    gate.kl().backward()
    assert torch.allclose(wc.grad, gate.expected_precision(0)[..., None, None] * wc.detach(), rtol=1e-12, atol=0)


def test_collapsed_state_matches_the_closed_forms():
    w = _linear(4, 6, dtype=F64)
    gate = TurboVBIGate(4, active_precision="attach").attach([(w, torch.arange(4), torch.arange(4))])
    a, b, a_bar, b_bar = gate.hyper_0.tolist()
    assert a == a_bar == 1.0
    assert a / b == pytest.approx(1.0 / float((w.detach() ** 2).mean()), rel=1e-12)  # "attach": 1 / mean square
    assert a_bar / b_bar == pytest.approx(1e6, rel=1e-12)
    sq = w.detach() ** 2
    assert torch.allclose(gate.sq_norm_0, sq, rtol=1e-15, atol=0)
    lam = collapsed_log_evidence(sq, 1, a, b, a_bar, b_bar)
    assert torch.allclose(gate.pi_0, torch.sigmoid(gate.prior_logit_0 + lam), rtol=1e-14, atol=0)
    assert torch.allclose(gate.erho_0, collapsed_precision(gate.pi_0, sq, 1, a, b, a_bar, b_bar), rtol=1e-14, atol=0)
    (q1a, q1b), (q0a, q0b) = gate.q_rho(0)
    assert torch.allclose(q1a / q1b * gate.pi_0 + q0a / q0b * (1 - gate.pi_0), gate.erho_0, rtol=1e-14, atol=0)


def test_empirical_scale_is_an_em_step():
    w = _linear(5, 7, seed=9, dtype=F64)
    with torch.no_grad():
        w[2] = 0.0
    gate = TurboVBIGate(5, active_precision="attach").attach([(w, torch.arange(5), torch.arange(5))])
    a, b, a_bar, _ = gate.hyper_0.tolist()
    pi, sq = gate.pi_0.clone(), w.detach() ** 2
    gate.active_precision = "empirical"
    gate.update()
    # M step for b with the shape fixed: a / b = sum pi E[rho | s=1, w] / sum pi, E[rho | s=1, w] = (a + n/2) / (b + ||w||^2/2)
    m1 = float((pi * (a + 0.5) / (b + 0.5 * sq)).sum() / pi.sum())
    a2, b2, a_bar2, b_bar2 = gate.hyper_0.tolist()
    assert (a2, a_bar2) == (a, a_bar)
    assert a2 / b2 == pytest.approx(m1, rel=1e-12)
    assert a_bar2 / b_bar2 == pytest.approx(max(1e6, 100 * m1), rel=1e-12)
    assert gate.deterministic()[2] == 0.0


def test_sample_without_mask_in_training_is_ones():
    w = torch.nn.Parameter(torch.zeros(3, 4))
    gate = TurboVBIGate(3, mask_in_training=False).attach([(w, torch.arange(3), torch.arange(3))])
    assert gate.deterministic().tolist() == [0.0] * 3
    assert torch.equal(gate.sample(4), torch.ones(4, 3))
    gate.train()
    assert torch.equal(gate(torch.ones(2, 3, 5)), torch.ones(2, 3, 5))
    gate.eval()
    assert torch.equal(gate(torch.ones(2, 3, 5)), torch.zeros(2, 3, 5))


def test_toy_fit_prunes_the_noise_rows():
    torch.manual_seed(0)
    N, d_in = 256, 16
    x = torch.randn(N, d_in)
    w_true = torch.randn(4, d_in) * math.sqrt(2.0 / d_in)
    y = torch.cat([x @ w_true.T, 0.1 * torch.randn(N, 4)], 1)  # outputs 4..7: noise, unrelated to x
    layer = torch.nn.Linear(d_in, 8)
    gate = TurboVBIGate(8, update_every=10).attach([(layer.weight, torch.arange(8), torch.arange(8))])
    assert gate.active_precision == "empirical" and gate.mask_in_training
    assert bool(gate.mask().all())  # He-initialised rows all look active at first
    opt = torch.optim.Adam(layer.parameters(), lr=2e-2)
    for _ in range(300):
        loss = (0.5 * N * ((layer(x) - y) ** 2).sum(1).mean() / 0.1**2 + gate.kl()) / N
        opt.zero_grad()
        loss.backward()
        opt.step()
        gate.after_step()
    p = gate.active_probability()
    assert bool((p[4:] < 0.5).all()) and bool((p[:4] > 0.5).all()), p
    d = gate.deterministic()
    assert d.tolist() == [1.0] * 4 + [0.0] * 4  # exact zeros
    assert torch.equal(gate.sample(2), d.expand(2, 8))  # training sees the decision (mask_in_training)
    # unit level: every kernel of a noise row is inactive (and pinned by a large precision);
    # the signal rows keep most kernels (a few true weights are small enough to be dropped)
    pi, erho = gate.pi_0, gate.expected_precision(0)
    assert float(pi[4:].max()) < 1e-2 and float((pi[:4] > 0.5).double().mean()) > 0.9
    assert float(erho[4:].min()) > 100 * float(erho[:4].median())


def test_channel_with_several_producers_is_removed_only_when_all_are_inactive():
    w1, w2 = _linear(4, 12, seed=1), _linear(4, 20, seed=2)
    with torch.no_grad():
        w1[3] = 0.0
        w2[3] = 0.0  # channel 3: dead in both producers
        w1[1] = 0.0  # channel 1: dead in one producer only
    reversed_rows = torch.tensor([3, 2, 1, 0])
    gate = TurboVBIGate(4, active_precision="he").attach([(w1, torch.arange(4), torch.arange(4)), (w2, reversed_rows, reversed_rows)])
    assert gate.deterministic().tolist() == [1.0, 1.0, 1.0, 0.0]
    # an active hub still allows all-inactive rows with chain-prior probability 0.5 * 0.9^(J-1) per row
    assert float(gate.active_probability()[3]) < 0.02 and float(gate.active_probability()[1]) > 1 - 1e-9


def test_after_step_runs_updates_every_update_every_steps(monkeypatch):
    gate = TurboVBIGate(2, update_every=3).attach([(_linear(2, 4), torch.arange(2), torch.arange(2))])
    calls = []
    monkeypatch.setattr(gate, "update", lambda *a, **k: calls.append(gate._steps))
    for _ in range(10):
        gate.after_step()
    assert calls == [3, 6, 9]
    gate.begin_epoch(1, 5)  # no-op


def test_state_dict_round_trip():
    w = _linear(6, 9, seed=5)
    with torch.no_grad():
        w[[1, 4]] = 0.0
    gate = TurboVBIGate(3, update_every=2).attach([(w, torch.arange(6), torch.tensor([0, 1, 2, 0, 1, 2]))])
    for _ in range(5):
        gate.after_step()
    buf = io.BytesIO()
    torch.save(gate.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    names = {k for k in state if not k.startswith("_")}
    assert {"pi_0", "prior_logit_0", "sq_norm_0", "erho_0", "rows_0", "positions_0", "hyper_0", "active_prob"} <= names

    def same(a, b):
        for k, v in a.state_dict().items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, b.state_dict()[k]), k
        assert a._steps == b._steps == 5
        assert torch.equal(a.deterministic(), b.deterministic())
        assert float(a.kl().detach()) == float(b.kl().detach())

    # attach first (as the wrapper does), then load
    other = _linear(6, 9, seed=6)
    with torch.no_grad():
        other.copy_(w)
    g2 = TurboVBIGate(3, update_every=2).attach([(other, torch.arange(6), torch.tensor([0, 1, 2, 0, 1, 2]))])
    g2.load_state_dict(state)
    same(gate, g2)
    # load into a bare gate, then attach: the loaded state is kept
    g3 = TurboVBIGate(3, update_every=2)
    g3.load_state_dict(state)
    assert torch.equal(g3.deterministic(), gate.deterministic())
    g3.attach([(other, torch.arange(6), torch.tensor([0, 1, 2, 0, 1, 2]))])
    same(gate, g3)


@pytest.mark.parametrize("evidence, a", [("collapsed", 1.0), ("mean_field", 0.01)])
def test_zero_and_huge_weights_give_no_nan(evidence, a):
    w = torch.nn.Parameter(torch.zeros(4, 8))
    conv = torch.nn.Parameter(torch.zeros(4, 3, 3, 3))
    gate = TurboVBIGate(4, evidence=evidence, a=a).attach([(w, torch.arange(4), torch.arange(4)), (conv, torch.arange(4), torch.arange(4))])
    for l in range(2):
        for name in ("pi", "prior_logit", "sq_norm", "erho"):
            assert bool(torch.isfinite(gate._buf(name, l)).all()), name
    assert bool(torch.isfinite(gate.active_probability()).all())
    assert gate.deterministic().tolist() == [0.0] * 4
    assert float(gate.kl().detach()) == 0.0
    with torch.no_grad():
        w[0] = 1e30
        w[1, :4] = 1e-30
        conv[2] = 3e18
    gate.update()
    reg = gate.kl().detach()
    assert bool(torch.isfinite(gate.active_probability()).all())
    assert bool(torch.isfinite(gate.erho_0).all()) and bool(torch.isfinite(gate.prior_logit_0).all())
    assert math.isfinite(float(reg))
    if evidence == "collapsed":  # (mean field's positive evidence is at most a log(m0/m1) ~ 0.1 a unit: too weak here)
        assert gate.deterministic()[0] == 1.0 and gate.deterministic()[3] == 0.0


def test_mean_field_turbo_iterations_converge():
    w = _linear(8, 40, seed=7)
    with torch.no_grad():
        w[5:] *= 1e-3
    gate = TurboVBIGate(8, evidence="mean_field", a=0.01, active_precision="attach", turbo_iterations=200, attach_iterations=200)
    gate.attach([(w, torch.arange(8), torch.arange(8))])
    assert gate.last_iterations < 200  # converged (|change of q(s)| < tol)
    pi = gate.pi_0.clone()
    gate.update()  # already at the fixed point: one round, no change
    assert gate.last_iterations <= 2
    assert torch.allclose(gate.pi_0, pi, atol=1e-6)
    assert gate.deterministic()[5:].tolist() == [0.0] * 3


# ---------------------------------------------------------------------------
# producers followed by BatchNorm: the prior acts on the folded weights
# ---------------------------------------------------------------------------


def _conv_bn(seed=0, out_c=4, in_c=3, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(out_c, in_c, 3, 3, generator=g, dtype=dtype) * 0.2)
    bn = torch.nn.BatchNorm2d(out_c).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(out_c, generator=g, dtype=dtype) + 0.5)
        bn.running_var.copy_(torch.rand(out_c, generator=g, dtype=dtype) * 2 + 0.1)
    return w, bn


def test_batchnorm_folded_regulariser_value_and_gradient():
    w, bn = _conv_bn()
    rows = torch.tensor([3, 0, 2])
    gate = TurboVBIGate(3).attach([(w, rows, torch.tensor([1, 2, 0]), bn)])
    assert gate.folded() == [True]
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()[rows]  # gamma / sigma per row
    folded = w.detach()[rows] * scale[:, None, None, None]
    assert torch.allclose(gate.sq_norm_0, folded.square().sum((2, 3)), rtol=1e-12, atol=0)
    reg = gate.kl()
    reg.backward()
    erho = gate.expected_precision(0)
    assert float(reg.detach()) == pytest.approx(float(0.5 * (erho[..., None, None] * folded**2).sum()), rel=1e-12)
    # d/d gamma_r: exact; d/d w_r: the folded gradient with its component along w_r removed
    want_gamma = torch.zeros(4, dtype=F64)
    want_gamma[rows] = (erho * folded.square().sum((2, 3))).sum(1) / bn.weight.detach()[rows]
    assert torch.allclose(bn.weight.grad, want_gamma, rtol=1e-10, atol=0)
    naive = erho[..., None, None] * folded * scale[:, None, None, None]
    u = w.detach()[rows] / w.detach()[rows].flatten(1).norm(dim=1)[:, None, None, None]
    want_w = naive - u * (naive * u).sum((1, 2, 3), keepdim=True)
    assert torch.allclose(w.grad[rows], want_w, rtol=1e-9, atol=1e-12)
    assert float(w.grad[1].abs().max()) == 0.0  # row 1 is not gated
    assert float((w.grad[rows] * w.detach()[rows]).sum((1, 2, 3)).abs().max()) < 1e-12  # orthogonal to every row


def test_batchnorm_folded_state_ignores_the_rows_scale():
    # BatchNorm makes a row's output independent of its scale (the running variance follows it):
    # the support and the precision must not depend on it either
    w, bn = _conv_bn(seed=3, out_c=6, in_c=5)
    bn.eps = 1e-12  # (exact invariance; eps would set a floor under the variance)
    with torch.no_grad():
        w[4] *= 1e-3  # a dead-looking channel without BatchNorm, whose pre-BN variance is 1e-6 times smaller
        bn.running_var[4] *= 1e-6
    assert TurboVBIGate(6).attach([(w, torch.arange(6), torch.arange(6))]).deterministic()[4] == 0.0
    gate = TurboVBIGate(6, active_precision="attach").attach([(w, torch.arange(6), torch.arange(6), bn)])
    pi, prob, sq = gate.pi_0.clone(), gate.active_probability(), gate.sq_norm_0.clone()
    assert gate.deterministic()[4] == 1.0
    with torch.no_grad():
        for r, f in ((1, 1e-2), (4, 1e3)):
            w[r] *= f
            bn.running_var[r] = (bn.running_var[r] + bn.eps) * f**2 - bn.eps
    gate.update()
    assert torch.allclose(gate.sq_norm_0, sq, rtol=1e-9, atol=0)
    assert torch.allclose(gate.pi_0, pi, rtol=1e-6, atol=1e-9)
    assert torch.allclose(gate.active_probability(), prob, rtol=1e-6, atol=1e-9)
    assert gate.deterministic()[1] == 1.0
    with pytest.raises(ValueError):
        TurboVBIGate(6).attach([(w, torch.arange(6), torch.arange(6), torch.nn.BatchNorm2d(5))])


def _conv_bn_net():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 8, 1), torch.nn.ReLU(),  # no BatchNorm: prior on the raw weights
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4),
    )


def test_wrap_binds_the_norm_after_each_producer():
    from onnxprune.bayes import wrap
    from onnxprune.bayes.turbo_vbi import bind_batchnorms

    wrapped = wrap(_conv_bn_net(), (torch.zeros(2, 3, 8, 8),), method="turbo-vbi")  # wrap binds them
    assert [g.folded() for g in wrapped.gates.values()] == [[True], [True], [False]]
    assert bind_batchnorms(wrapped) == 2  # binding again finds the same norms
    assert wrapped.gates["0"]._norms[0] is wrapped.model.get_submodule("1")
    raw = wrap(_conv_bn_net(), (torch.zeros(2, 3, 8, 8),), method="turbo-vbi", fold_norms=False)
    assert bind_batchnorms(raw) == 0 and [g.folded() for g in raw.gates.values()] == [[False]] * 3


@pytest.mark.parametrize("bind", [True, False])
def test_conv_bn_net_keeps_its_weights_and_accuracy(bind):
    """The failure this guards against: a conv followed by BatchNorm has a likelihood flat in each
    row's scale, so a prior on the raw weights shrinks them (Adam: by about lr per step) until
    BatchNorm's eps dominates the channel's variance and the signal dies, while the support still
    calls the channel active. With the prior on the folded weights the rows keep their scale."""
    from onnxprune.bayes import wrap
    from onnxprune.bayes.exporting import fold_gates

    g = torch.Generator().manual_seed(0)
    templates = torch.randn(4, 3, 8, 8, generator=g)

    def batch(n):
        y = torch.randint(0, 4, (n,), generator=g)
        return templates[y] + torch.randn(n, 3, 8, 8, generator=g), y

    torch.manual_seed(0)
    net = _conv_bn_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        x, y = batch(64)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    wrapped = wrap(net, (torch.zeros(2, 3, 8, 8),), method="turbo-vbi", update_every=10, fold_norms=bind)
    convs = [wrapped.model.get_submodule(k) for k in ("0", "3")]
    start = [c.weight.detach().flatten(1).norm(dim=1) for c in convs]
    opt = torch.optim.Adam(wrapped.weight_parameters(), lr=3e-3)
    correct = 0
    for step in range(200):
        x, y = batch(64)
        out = wrapped(x)
        loss = torch.nn.functional.cross_entropy(out, y) + wrapped.kl() / 2000
        opt.zero_grad()
        loss.backward()
        opt.step()
        wrapped.after_step()
        correct += int((out.argmax(1) == y).sum()) if step >= 150 else 0
    shrink = min(float((c.weight.detach().flatten(1).norm(dim=1) / s).min()) for c, s in zip(convs, start))
    if not bind:  # the failure mode, measured: raw weights driven towards zero
        assert shrink < 0.05
        return
    assert shrink > 0.5
    assert correct / (50 * 64) > 0.95
    assert bool(wrapped.gates["3"].mask().any())
    # export path: the folded plain module equals the wrapped model in evaluation mode
    wrapped.eval()
    x, _ = batch(32)
    with torch.no_grad():
        assert torch.allclose(fold_gates(wrapped)(x), wrapped(x), rtol=1e-4, atol=1e-5)
