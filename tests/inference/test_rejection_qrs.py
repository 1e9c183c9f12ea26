"""Rejection and QRS against the exact posterior of Toy A and the Poisson oracle (SPEC §4, §10)."""

import math

import numpy as np
import pyro
import pytest
import torch
from conftest import brute_force_qrs_poisson, brute_force_qrs_toy_a, toy_a_prior
from scipy import stats

import bayesalign as ba
from bayesalign.diagnostics import kl, tvd
from bayesalign.errors import ConfigError
from bayesalign.inference import QRS, Exact, Rejection
from bayesalign.models import TabularLM


def counts_by_key(samples, keys):
    index = {k: i for i, k in enumerate(keys)}
    counts = np.zeros(len(keys))
    for k in samples.keys():
        counts[index[k]] += 1
    return counts


def test_rejection_is_exact_chi_squared(toy_a):
    exact = Exact().fit(toy_a)
    bound = math.exp(3) * 1.0001  # max P/q = e^3 on Toy A
    post = Rejection(bound=bound, num_samples=100_000, chunk_size=65536, seed=0).fit(toy_a)
    assert len(post.samples) == 100_000
    p = exact.log_prob(exact.samples).exp().numpy()
    observed = counts_by_key(post.samples, exact.samples.keys())
    result = stats.chisquare(observed, p * observed.sum())
    assert result.pvalue > 1e-3
    # Acceptance rate = Z/M within 3 binomial standard errors.
    d = post.diagnostics
    assert abs(d.acceptance_rate - math.exp(exact.log_z) / bound) < 3 * d.acceptance_rate_se
    assert abs(d.log_z - exact.log_z) < 3 * d.log_z_se
    # The diagnostics' distances are those of the law Rejection declares (p, so 0 by theorem);
    # what tests the draws is the χ² above and their empirical TVD to p: ≈ 0.006 for
    # 10^5 draws on 27 sequences (seed 0).
    assert d.exact and d.distances_from == "law"
    assert tvd(torch.tensor(observed / observed.sum()).log(), torch.tensor(p).log()) < 0.01


def test_rejection_refuses_a_bound_below_max_ratio(toy_a):
    with pytest.raises(ConfigError, match="bound 10.0"):
        Rejection(bound=10.0, num_samples=100).fit(toy_a)


def qrs_law(target, beta):
    """p_β ∝ min(P, β_q q) over the support, in support order, written out independently."""
    support = Exact().fit(target).samples
    clipped = torch.minimum(target.log_score(support), support.log_q + math.log(beta))
    return (clipped - torch.logsumexp(clipped, 0)).exp().numpy()


def qrs_exact(target, betas):
    """AR, TVD(p,p_β), KL(p‖p_β) by enumeration, written out independently of the engine."""
    support = Exact().fit(target).samples
    log_q = support.log_q
    log_score = target.log_score(support)
    log_p = log_score - torch.logsumexp(log_score, 0)
    rows = []
    for beta in betas:
        clipped = torch.minimum(log_score, log_q + math.log(beta))
        log_z_beta = torch.logsumexp(clipped, 0)
        rows.append((float(log_z_beta.exp() / beta), tvd(log_p, clipped - log_z_beta),
                     kl(log_p, clipped - log_z_beta)))
    return rows


SPEC_QRS = [  # β_q, AR, TVD(p, p_β), KL(p‖p_β)
    (1.0, 1.0, 0.3776975621, 0.4912314979),
    (2.0, 0.733, 0.3194165253, 0.3059093867),
    (4.0, 0.5014485599, 0.2186219623, 0.1603136791),
    (8.0, 0.3209491775, 0.1178533767, 0.0599714753),
    (20.0, 0.1475796710, 7.256e-4, 1.549e-6),
    (21.0, 2.9543306017 / 21, 0.0, 0.0),
]


def test_qrs_exact_table_and_engine_law(toy_a):
    betas = [row[0] for row in SPEC_QRS]
    for (beta, ar, tv, kl_), (ar_e, tv_e, kl_e) in zip(SPEC_QRS, qrs_exact(toy_a, betas)):
        assert ar_e == pytest.approx(ar, abs=1e-9)
        assert tv_e == pytest.approx(tv, abs=1e-6)
        assert kl_e == pytest.approx(kl_, abs=1e-8)
        # The SPEC row is also what a plain loop over the 27 sequences computes.
        brute = brute_force_qrs_toy_a(beta)
        assert brute["acceptance_rate"] == pytest.approx(ar, abs=1e-9)
        assert brute["tvd"] == pytest.approx(tv, abs=1e-6)
        assert brute["kl"] == pytest.approx(kl_, abs=1e-8)
        assert (ar_e, tv_e, kl_e) == pytest.approx(
            (brute["acceptance_rate"], brute["tvd"], brute["kl"]), abs=1e-12)
    post = QRS(qrs_beta=4.0, num_samples=20_000, seed=0).fit(toy_a)
    ar_e, tv_e, kl_e = qrs_exact(toy_a, [4.0])[0]
    d = post.diagnostics
    # The engine's declared law p_β agrees with the independent formula...
    assert d.exact and d.distances_from == "law" and d.tvd == pytest.approx(tv_e, abs=1e-12)
    assert d.kl_target_policy == pytest.approx(kl_e, abs=1e-12)
    assert abs(d.acceptance_rate - ar_e) < 3 * d.acceptance_rate_se
    # ...and the draws follow p_β (χ², seed 0), not p.
    observed = counts_by_key(post.samples, Exact().fit(toy_a).samples.keys())
    assert stats.chisquare(observed, qrs_law(toy_a, 4.0) * observed.sum()).pvalue > 1e-3
    p = Exact().fit(toy_a).log_prob(Exact().fit(toy_a).samples).exp().numpy()
    assert stats.chisquare(observed, p * observed.sum()).pvalue < 1e-6


def test_qrs_sweep_within_three_standard_errors_and_monotone(toy_a):
    betas = [0.5, 1.0, 2.0, 4.0, 8.0, 20.0, 21.0]
    curves = QRS(num_samples=20_000, seed=0).sweep(toy_a, betas)
    for i, (ar, tv, kl_) in enumerate(qrs_exact(toy_a, betas)):
        for estimate, se, exact in (
            (curves.acceptance_rate[i], curves.acceptance_rate_se[i], ar),
            (curves.tvd[i], curves.tvd_se[i], tv),
            (curves.kl[i], curves.kl_se[i], kl_),
        ):
            assert abs(estimate - exact) <= 3 * se + 1e-9, (betas[i], estimate, exact, se)
    for name in ("acceptance_rate", "tvd", "kl"):
        values = getattr(curves, name)
        assert all(b <= a + 1e-12 for a, b in zip(values, values[1:])), name


def poisson_world():
    """q = Poisson(10), p = Poisson(11) on {0..59}: the disco QRS oracle as a length-1 LM."""
    k = torch.arange(60, dtype=torch.float64)
    log_q = k * math.log(10) - 10 - torch.lgamma(k + 1)
    q = (log_q - torch.logsumexp(log_q, 0)).exp()
    prior = TabularLM(q, q.expand(60, 60).contiguous(), length=1)

    @ba.target
    def poisson():
        y = pyro.sample("y", prior)
        x = y.tokens[:, 0].double()
        ba.reward("ratio", x * math.log(1.1) - 1.0)  # log Poisson(11)/Poisson(10)

    return poisson


def test_qrs_poisson_oracle():
    target = poisson_world()
    # SPEC §10's Poisson table: β_q, AR, TVD(p, p_β), KL(p‖p_β).
    spec = [(0.5, 0.999496, 0.122941, 0.048146), (1.0, 0.876849, 0.074922, 0.019885),
            (2.0, 0.498182, 0.003531, 0.000487)]
    exact_rows = qrs_exact(target, [row[0] for row in spec])
    curves = QRS(num_samples=100_000, seed=0).sweep(target, [row[0] for row in spec])
    for i, (beta, ar, tv, kl_) in enumerate(spec):
        assert exact_rows[i] == pytest.approx((ar, tv, kl_), abs=2e-6)
        # The SPEC row is also what a plain loop over the truncated Poisson support computes.
        brute = brute_force_qrs_poisson(beta)
        assert (brute["acceptance_rate"], brute["tvd"], brute["kl"]) == pytest.approx(
            (ar, tv, kl_), abs=2e-6)
        assert exact_rows[i] == pytest.approx(
            (brute["acceptance_rate"], brute["tvd"], brute["kl"]), abs=1e-12)
        # disco asserts these to 2 decimal places from 10^5 samples.
        assert curves.acceptance_rate[i] == pytest.approx(ar, abs=0.01)
        assert curves.tvd[i] == pytest.approx(tv, abs=0.01)
        assert curves.kl[i] == pytest.approx(kl_, abs=0.01)


def test_rejection_from_an_adapted_proposal_is_still_exact(toy_a):
    proposal = toy_a_prior().adapted(temperature=1.5)
    exact = Exact().fit(toy_a)
    support = exact.samples
    ratio = float((toy_a.log_score(support) - proposal.log_prob(support)).max().exp())
    post = Rejection(bound=ratio * 1.001, num_samples=20_000, proposal=proposal, seed=1).fit(toy_a)
    p = exact.log_prob(support).exp().numpy()
    observed = counts_by_key(post.samples, support.keys())
    assert stats.chisquare(observed, p * observed.sum()).pvalue > 1e-3
