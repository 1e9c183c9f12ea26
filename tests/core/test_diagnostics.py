"""ESS, Pareto k̂ and the IS estimators (SPEC §9, §10 'ESS' and 'Diagnostics')."""

import math

import numpy as np
import pytest
import torch

from bayesalign import diagnostics as dx
from bayesalign.errors import EmptySupportError


def test_ess_cases():
    weights = torch.tensor([4.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    assert dx.ess(weights.log()) == pytest.approx(64 / 22, abs=1e-12)
    assert dx.ess(weights.log()) == pytest.approx(2.9091, abs=1e-4)
    assert dx.ess(torch.zeros(100)) == pytest.approx(100.0)
    one_hot = torch.full((100,), -math.inf)
    one_hot[7] = 0.0
    assert dx.ess(one_hot) == pytest.approx(1.0)


def test_all_zero_weights_name_the_problem():
    with pytest.raises(EmptySupportError, match="all 5 importance weights are zero"):
        dx.ess(torch.full((5,), -math.inf))


def normal_log_pdf(x, scale=1.0):
    return -0.5 * (x / scale) ** 2 - math.log(scale * math.sqrt(2 * math.pi))


def test_pareto_k_small_for_exact_proposal_and_large_for_heavy_tails():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(4000)
    same = normal_log_pdf(x) - normal_log_pdf(x)
    assert dx.pareto_k(torch.tensor(same)) < 0.5
    close = normal_log_pdf(x, 1.1) - normal_log_pdf(x)  # target slightly wider: light tail
    assert dx.pareto_k(torch.tensor(close)) < 0.5
    # Target Student-t(2), proposal N(0,1): weights have infinite variance, k̂ > 0.7.
    from scipy import stats

    heavy = stats.t(df=2).logpdf(x) - normal_log_pdf(x)
    assert dx.pareto_k(torch.tensor(heavy)) > 0.7


def test_khat_threshold_values():
    assert dx.khat_threshold(100) == pytest.approx(0.5)
    assert dx.khat_threshold(1000) == pytest.approx(2 / 3)
    assert dx.khat_threshold(10_000) == pytest.approx(0.7)


def test_is_kl_and_tvd_match_exact_on_a_small_space():
    rng = np.random.default_rng(1)
    p = torch.tensor(rng.dirichlet(np.ones(6)))
    pi = torch.tensor(rng.dirichlet(np.ones(6)))
    q = torch.full((6,), 1 / 6, dtype=torch.float64)
    # Enumerate q exactly: the IS estimators with weights q (as "samples" with multiplicity)
    draws = torch.tensor(rng.choice(6, size=200_000, p=q.numpy()))
    log_P = (3.0 * p).log()[draws]  # unnormalised target, Z = 3
    est_kl = dx.is_kl_target_policy(log_P, q.log()[draws], pi.log()[draws])
    est_tvd = dx.is_tvd(log_P, q.log()[draws], pi.log()[draws])
    assert est_kl == pytest.approx(dx.kl(p.log(), pi.log()), abs=0.01)
    assert est_tvd == pytest.approx(dx.tvd(p.log(), pi.log()), abs=0.01)
    # The exact KL and TVD are what a plain loop over the six items computes.
    kl_by_loop = sum(a * math.log(a / b) for a, b in zip(p.tolist(), pi.tolist()))
    tvd_by_loop = 0.5 * sum(abs(a - b) for a, b in zip(p.tolist(), pi.tolist()))
    assert dx.kl(p.log(), pi.log()) == pytest.approx(kl_by_loop, abs=1e-12)
    assert dx.tvd(p.log(), pi.log()) == pytest.approx(tvd_by_loop, abs=1e-12)
    assert est_kl == pytest.approx(kl_by_loop, abs=0.01)
    assert est_tvd == pytest.approx(tvd_by_loop, abs=0.01)


def test_log_z_estimate_and_warning_on_high_khat():
    log_w = torch.tensor(np.random.default_rng(2).standard_normal(1000) * 0.1)
    log_z, se = dx.log_z_estimate(log_w)
    assert log_z == pytest.approx(float(torch.logsumexp(log_w, 0) - math.log(1000)))
    assert 0 < se < 0.01
    d = dx.Diagnostics(pareto_k=0.9, pareto_k_threshold=0.7, num_proposed=1000)
    with pytest.warns(UserWarning, match="Pareto k̂ = 0.90 exceeds 0.70"):
        d.check_pareto_k()
    assert d.warnings
