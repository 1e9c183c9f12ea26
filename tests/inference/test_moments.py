"""λ-fitting by the convex dual against closed forms and exact enumeration (SPEC §1.3, §10 item 2)."""

import math

import numpy as np
import pyro
import pytest
import torch
from conftest import toy_a_prior

import bayesalign as ba
from bayesalign.diagnostics import kl
from bayesalign.errors import ConfigError, InvalidFactorError
from bayesalign.inference import Exact
from bayesalign.inference.moments import fit_moments
from bayesalign.models import TabularLM


def has_two(y):
    return (y.tokens == 2).any(-1)


def one_feature_target(mean, prior=None):
    prior = prior or toy_a_prior()

    @ba.target
    def half_have_two():
        y = pyro.sample("y", prior)
        ba.moment("has_two", has_two(y).double(), mean=mean)

    return half_have_two


def two_feature_target(mean):
    prior = toy_a_prior()

    @ba.target
    def two_features():
        y = pyro.sample("y", prior)
        ba.moment("phi", torch.stack([has_two(y), y.tokens[:, 0] == 0], -1).double(), mean=mean)

    return two_features


def closed_form_lambda(mean, m0):
    """SPEC §1.3: the single binary feature's λ* = log(μ̄/(1−μ̄) · (1−m0)/m0)."""
    return math.log(mean / (1 - mean) * (1 - m0) / m0)


def prior_mass_with_two():
    support = toy_a_prior().enumerate_support()
    return float(support.log_q.exp()[has_two(support)].sum())


def assert_non_increasing(history):
    # Exact Newton steps never raise L; the last steps can move it by float64 rounding only.
    assert np.all(np.diff(history) <= 1e-15), history


def test_exact_fit_recovers_closed_form_lambda():
    m0 = prior_mass_with_two()
    assert m0 == pytest.approx(0.466, abs=1e-12)
    lam_star = closed_form_lambda(0.5, m0)
    fit = fit_moments(one_feature_target(0.5))
    assert fit.exact and fit.ess is None and fit.ess_fraction is None
    assert float(fit.lambdas["has_two"]) == pytest.approx(lam_star, abs=1e-8)
    assert float(fit.lambdas["has_two"]) == pytest.approx(0.1362102048, abs=1e-8)
    assert math.exp(fit.log_z) == pytest.approx(1.068, abs=1e-9)
    assert float(fit.moments["has_two"]) == pytest.approx(0.5, abs=1e-10)
    assert_non_increasing(fit.dual_history)
    assert fit.iterations == len(fit.dual_history) - 1 >= 1

    post = Exact().fit(fit.target)
    kl_p_a = post.diagnostics.kl_policy_prior
    assert post.log_z == pytest.approx(fit.log_z, abs=1e-12)
    assert post.diagnostics.moments["has_two"] == pytest.approx([0.5], abs=1e-10)
    assert kl_p_a == pytest.approx(lam_star * 0.5 - math.log(1.068), abs=1e-9)
    assert kl_p_a == pytest.approx(0.0023173619, abs=1e-9)
    # At the optimum the dual equals −KL(p‖a): log Z − λ·μ̄.
    assert fit.dual_history[-1] == pytest.approx(-kl_p_a, abs=1e-12)


def test_refit_of_a_fitted_target_starts_at_its_lambda():
    fit = fit_moments(one_feature_target(0.5))
    again = fit_moments(fit.target)
    assert again.iterations == 0
    assert float(again.lambdas["has_two"]) == pytest.approx(float(fit.lambdas["has_two"]), abs=1e-14)


def test_two_features_fitted_jointly_and_pythagoras():
    mean = torch.tensor([0.5, 0.3], dtype=torch.float64)
    fit = fit_moments(two_feature_target(mean))
    assert fit.lambdas["phi"].shape == (2,)
    assert fit.lambdas["phi"].tolist() == pytest.approx([-0.248509, -0.953313], abs=1e-6)
    assert math.exp(fit.log_z) == pytest.approx(0.6070963, abs=1e-7)
    assert fit.moments["phi"].tolist() == pytest.approx([0.5, 0.3], abs=1e-10)
    assert_non_increasing(fit.dual_history)

    post = Exact().fit(fit.target)
    support = post.samples
    log_p, log_a = post.log_prob(support), support.log_q
    kl_p_a = kl(log_p, log_a)
    assert kl_p_a == pytest.approx(0.0888195, abs=1e-7)
    # Pythagoras for any c in C: spread cell masses m[φ1, φ2] with the right marginals over
    # each cell, uniformly or in proportion to a.
    cell = 2 * has_two(support).long() + (support.tokens[:, 0] == 0).long()
    a = log_a.exp()
    for masses in ([0.35, 0.15, 0.35, 0.15], [0.4, 0.1, 0.3, 0.2]):
        for within in (torch.ones_like(a), a):
            c = torch.zeros_like(a)
            for k, m in enumerate(masses):
                c[cell == k] = m * within[cell == k] / within[cell == k].sum()
            phi = torch.stack([has_two(support), support.tokens[:, 0] == 0], -1).double()
            assert (c @ phi).tolist() == pytest.approx([0.5, 0.3], abs=1e-12)
            lhs = kl(c.log(), log_a)
            assert lhs == pytest.approx(kl(c.log(), log_p) + kl_p_a, abs=1e-9)
            assert lhs > kl_p_a  # p is the I-projection: the closest member of C to a


def test_snis_fit_from_the_prior():
    lam_star = closed_form_lambda(0.5, prior_mass_with_two())
    num_samples = 100_000
    fit = fit_moments(one_feature_target(0.5), num_samples=num_samples, seed=0)
    assert not fit.exact
    assert float(fit.moments["has_two"]) == pytest.approx(0.5, abs=1e-10)  # on the sample
    assert abs(float(fit.lambdas["has_two"]) - lam_star) < 0.02
    exact_moment = Exact().fit(fit.target).diagnostics.moments["has_two"][0]
    assert abs(exact_moment - 0.5) < 0.01
    assert 1 <= fit.ess <= num_samples
    assert fit.ess_fraction == pytest.approx(fit.ess / num_samples)
    assert_non_increasing(fit.dual_history)
    # Same seed, same sample, same λ; another seed another sample.
    again = fit_moments(one_feature_target(0.5), num_samples=num_samples, seed=0)
    assert torch.equal(again.lambdas["has_two"], fit.lambdas["has_two"])


def test_snis_fit_from_a_proposal_weights_by_prior_over_proposal():
    uniform = torch.full((3,), 1 / 3, dtype=torch.float64)
    proposal = TabularLM(uniform, uniform.expand(3, 3).contiguous(), 3)
    lam_star = closed_form_lambda(0.3, prior_mass_with_two())
    fit = fit_moments(one_feature_target(0.3), num_samples=50_000, proposal=proposal, seed=1)
    assert abs(float(fit.lambdas["has_two"]) - lam_star) < 0.03
    assert 1 <= fit.ess < 50_000  # a ≠ q: the weights are not flat


@pytest.mark.parametrize("other", ["constraint", "reward"])
def test_hybrid_fit_matches_mean_under_the_full_target(other):
    prior = toy_a_prior()

    @ba.target
    def hybrid():
        y = pyro.sample("y", prior)
        if other == "constraint":
            ba.constraint("starts_low", y.tokens[:, 0] != 2)
        else:
            ba.reward("r", (y.tokens == 1).sum(-1).double())
        ba.moment("has_two", has_two(y).double(), mean=0.5)

    fit = fit_moments(hybrid)
    post = Exact().fit(fit.target)
    assert post.diagnostics.moments["has_two"] == pytest.approx([0.5], abs=1e-10)
    assert_non_increasing(fit.dual_history)
    # The fit tilts a·b, not a: a λ fitted to the prior alone misses μ̄ under the full target.
    prior_only = fit_moments(one_feature_target(0.5)).lambdas
    naive = Exact().fit(hybrid.with_lambdas(prior_only)).diagnostics.moments["has_two"][0]
    assert abs(naive - 0.5) > 0.01
    if other == "constraint":
        assert post.diagnostics.moments["starts_low"] == pytest.approx([1.0])
        support = prior.enumerate_support()
        keep = support.tokens[:, 0] != 2
        a = support.log_q.exp()
        m0 = float(a[keep & has_two(support)].sum() / a[keep].sum())  # P_a(2∈y | b)
        assert float(fit.lambdas["has_two"]) == pytest.approx(closed_form_lambda(0.5, m0), abs=1e-8)
        snis = fit_moments(hybrid, num_samples=20_000, seed=0)
        assert abs(Exact().fit(snis.target).diagnostics.moments["has_two"][0] - 0.5) < 0.02


@pytest.mark.parametrize("mean", [1.0, 1.5, 0.0, -0.2])
def test_mean_outside_the_feature_range_names_the_site(mean):
    with pytest.raises(ConfigError, match=r"moment 'has_two'.*not strictly inside"):
        fit_moments(one_feature_target(mean))
    with pytest.raises(ConfigError, match=r"moment 'has_two'.*draws"):
        fit_moments(one_feature_target(mean), num_samples=1000)


def test_feature_absent_from_the_sample_names_the_site():
    # A proposal that never emits token 2: φ = 1[2∈y] is 0 on every draw.
    never_two = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    proposal = TabularLM(never_two, never_two.expand(3, 3).contiguous(), 3)
    with pytest.raises(ConfigError, match=r"moment 'has_two'.*range \[0, 0\].*occur in the sample"):
        fit_moments(one_feature_target(0.5), num_samples=1000, proposal=proposal)


def test_vector_coordinate_out_of_range_names_the_coordinate():
    mean = torch.tensor([0.5, 1.0], dtype=torch.float64)
    with pytest.raises(ConfigError, match=r"moment 'phi'\[1\]"):
        fit_moments(two_feature_target(mean))


def test_jointly_infeasible_vector_feature_diverges_with_a_clear_error():
    prior = toy_a_prior()

    @ba.target
    def exclusive():
        y = pyro.sample("y", prior)
        first = y.tokens[:, 0]
        ba.moment("first", torch.stack([first == 0, first == 1], -1).double(),
                  mean=torch.tensor([0.6, 0.6], dtype=torch.float64))

    with pytest.raises(ConfigError, match=r"moment 'first'.*λ diverges.*convex hull"):
        fit_moments(exclusive)


def test_target_without_moment_sites_is_an_error(toy_a):
    with pytest.raises(ConfigError, match=r"'toy_a' has no moment sites"):
        fit_moments(toy_a)


def test_nan_mean_and_nan_feature_name_the_site():
    with pytest.raises(ConfigError, match=r"moment 'has_two': mean must be finite"):
        fit_moments(one_feature_target(float("nan")))
    prior = toy_a_prior()

    @ba.target
    def nan_feature():
        y = pyro.sample("y", prior)
        phi = has_two(y).double().masked_fill(y.tokens[:, 0] == 1, float("nan"))
        ba.moment("nan_phi", phi, mean=0.5)

    with pytest.raises(InvalidFactorError, match=r"moment 'nan_phi'.*sample \d+"):
        fit_moments(nan_feature)


def test_non_convergence_reports_the_residual():
    with pytest.raises(ConfigError, match=r"did not converge in 1 Newton steps.*max \|μ\(λ\) − μ̄\|"):
        fit_moments(two_feature_target(torch.tensor([0.5, 0.3], dtype=torch.float64)), max_iterations=1)


def test_batch_size_is_the_old_name_of_chunk_size():
    target = one_feature_target(0.5)
    chunked = fit_moments(target, num_samples=3000, seed=0, chunk_size=700)
    assert not torch.equal(fit_moments(target, num_samples=3000, seed=0).lambdas["has_two"],
                           chunked.lambdas["has_two"])  # chunks are drawn one after another
    with pytest.warns(DeprecationWarning, match=r"fit_moments\(batch_size=\.\.\.\) is deprecated"):
        old = fit_moments(target, num_samples=3000, seed=0, batch_size=700)
    assert torch.equal(old.lambdas["has_two"], chunked.lambdas["has_two"])
    with pytest.raises(ConfigError, match="batch_size= is the old name of chunk_size="):
        fit_moments(target, num_samples=3000, chunk_size=700, batch_size=700)
