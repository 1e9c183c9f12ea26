"""SNIS and best-of-n against exact answers (SPEC §4.3, §9, §10)."""

import math

import numpy as np
import pyro
import pytest
import torch
from conftest import brute_force_toy_a
from scipy import stats

import bayesalign as ba
from bayesalign.diagnostics import kl
from bayesalign.inference import BestOfN, Exact, Importance, best_of_n_kl_bound
from bayesalign.models import TabularLM


def brute_force_d2() -> float:
    """D₂(p‖a) = log Σ p²/a at β = 1 by a plain loop over the 27 sequences."""
    world = brute_force_toy_a(1.0)
    p, a = world["p"], world["a"]
    return math.log(sum(p[x] ** 2 / a[x] for x in a))


def test_snis_log_z_within_three_standard_errors(toy_a):
    exact = Exact().fit(toy_a)
    population_ness = math.exp(-brute_force_d2())  # SPEC §10's 0.384609
    for seed in range(3):
        d = Importance(num_samples=10_000, seed=seed).fit(toy_a).diagnostics
        assert abs(d.log_z - exact.log_z) < 3 * d.log_z_se
        assert d.ess_fraction == pytest.approx(0.384609, abs=0.03)  # population nESS, SPEC §10
        assert d.ess_fraction == pytest.approx(population_ness, abs=0.03)


def test_population_ess_by_enumeration(toy_a):
    exact = Exact().fit(toy_a)
    log_p = exact.log_prob(exact.samples)
    log_a = exact.samples.log_q
    d2 = float(torch.logsumexp(2 * log_p - log_a, 0))  # log E_a[(p/a)^2] = D_2(p‖a)
    assert d2 == pytest.approx(0.955527, abs=1e-6)
    assert math.exp(-d2) == pytest.approx(0.384609, abs=1e-6)
    brute = brute_force_d2()
    assert brute == pytest.approx(0.955527, abs=1e-6)
    assert math.exp(-brute) == pytest.approx(0.384609, abs=1e-6)
    assert d2 == pytest.approx(brute, abs=1e-12)


def test_snis_with_resampling_and_empirical_law(toy_a):
    post = Importance(num_samples=20_000, resample=True, seed=0).fit(toy_a)
    assert post.log_weights is None and len(post.samples) == 20_000
    assert post.diagnostics.kl_target_policy < 0.01
    assert post.diagnostics.rewards["r"] == pytest.approx(brute_force_toy_a(1.0)["reward"], abs=0.03)


def test_snis_with_target_as_proposal_has_flat_weights(toy_a):
    exact = Exact().fit(toy_a)
    p = exact.log_prob(exact.samples).exp()
    # p itself as a unigram-over-sequences proposal: a length-1 LM over the 27 sequences.
    proposal_world = TabularLM(p, p.expand(27, 27).contiguous(), length=1)

    @ba.target
    def same():
        y = pyro.sample("y", proposal_world)
        pyro.factor("zero", torch.zeros(len(y), dtype=torch.float64))

    d = Importance(num_samples=5000, seed=0).fit(same).diagnostics
    assert d.ess == pytest.approx(5000.0)
    assert d.pareto_k < 0.5


PI0 = [0.4, 0.25, 0.15, 0.10, 0.06, 0.04]


def six_item_target():
    pi0 = torch.tensor(PI0, dtype=torch.float64)
    prior = TabularLM(pi0, pi0.expand(6, 6).contiguous(), length=1)

    @ba.target
    def ranked():
        y = pyro.sample("y", prior)
        pyro.factor("r", y.tokens[:, 0].double())

    return ranked


@pytest.mark.parametrize("n,kl_exact,bound", [
    (2, 0.15923796, 0.19314718), (4, 0.60252835, 0.63629436),
    (8, 1.17121395, 1.20444154), (64, 2.92028875, 3.17450808),
])
def test_best_of_n_exact_law_table(n, kl_exact, bound):
    post = BestOfN(n=n, reward="r", num_samples=200, seed=0).fit(six_item_target())
    support = Exact().fit(six_item_target()).samples
    law = post.log_prob(support)
    # Independent: π(k) = F(k)^n − F(k−1)^n with F the prior CDF of the distinct rewards.
    cdf = np.cumsum(PI0)
    by_hand = cdf ** n - np.concatenate([[0.0], cdf[:-1]]) ** n
    assert law.exp().numpy() == pytest.approx(by_hand, abs=1e-12)
    assert float(law.exp().sum()) == pytest.approx(1.0, abs=1e-12)
    assert post.diagnostics.kl_policy_prior == pytest.approx(kl_exact, abs=1e-8)
    assert post.extras["kl_bound"] == pytest.approx(bound, abs=1e-8)
    # The SPEC row is also Σ π log(π/π0) of the by-hand law, and log n − (n−1)/n.
    kl_by_hand = sum(b * math.log(b / a) for b, a in zip(by_hand, PI0))
    assert kl_by_hand == pytest.approx(kl_exact, abs=1e-8)
    assert post.diagnostics.kl_policy_prior == pytest.approx(kl_by_hand, abs=1e-12)
    assert math.log(n) - (n - 1) / n == pytest.approx(bound, abs=1e-8)
    assert post.extras["kl_bound"] == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-12)
    assert post.diagnostics.kl_policy_prior <= post.extras["kl_bound"]
    # Win rate against a draw from the prior: P(r(BoN) > r(a)) + ½ P(tie) ≤ n/(n+1).
    p_bon = law.exp().numpy()
    win = sum(p_bon[i] * (sum(PI0[:i]) + 0.5 * PI0[i]) for i in range(6))
    assert win <= n / (n + 1) + 1e-12


def test_best_of_n_bound_is_tight_on_a_large_uniform_world():
    n_items, n = 10_000, 4
    rewards = torch.arange(n_items, dtype=torch.float64)
    from bayesalign.inference import best_of_n_log_law

    log_q = torch.full((n_items,), -math.log(n_items), dtype=torch.float64)
    law = best_of_n_log_law(rewards, log_q, n)
    assert kl(law, log_q) == pytest.approx(best_of_n_kl_bound(n), abs=1e-6)
    # By a plain loop: π(k) = ((k+1)/N)^n − (k/N)^n on distinct rewards, against log n − (n−1)/n.
    by_hand = [((k + 1) / n_items) ** n - (k / n_items) ** n for k in range(n_items)]
    kl_by_hand = sum(w * math.log(w * n_items) for w in by_hand)
    assert kl_by_hand == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-6)
    assert law.exp().tolist() == pytest.approx(by_hand, abs=1e-12)
    assert kl(law, log_q) == pytest.approx(kl_by_hand, abs=1e-9)


def test_best_of_n_samples_follow_the_exact_law_with_ties(toy_a):
    post = BestOfN(n=3, reward="r", num_samples=20_000, seed=0).fit(toy_a)
    support = Exact().fit(toy_a).samples
    law = post.log_prob(support).exp().numpy()
    assert law.sum() == pytest.approx(1.0, abs=1e-12)
    index = {k: i for i, k in enumerate(support.keys())}
    observed = np.zeros(len(law))
    for k in post.samples.keys():
        observed[index[k]] += 1
    assert stats.chisquare(observed, law * observed.sum()).pvalue > 1e-3
