"""The reference estimator (SPEC §12) on Toy A: exact and SNIS pools against brute-force KL/TVD.

Pools are drawn here by hand (exact draws from the enumerated p, prior draws for SNIS), so the
estimator is checked independently of the inference builders
(tests/inference/test_reference_builders.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    PI_T,
    assert_se_calibrated,
    brute_force_policy_distances,
    conditional_world,
    toy_a_policy,
    toy_a_target,
)

from bayesalign import diagnostics as dx
from bayesalign.errors import ConfigError, EmptySupportError
from bayesalign.evaluation import evaluate
from bayesalign.models import TabularLM
from bayesalign.reference import EXACT, SNIS, Reference, distances


def exact_pool(target, n: int, seed: int, num_prior: int = 4000) -> Reference:
    """n exact draws from the enumerated p; log Ẑ from num_prior independent prior draws."""
    generator = torch.Generator().manual_seed(seed)
    support = target.support()
    log_score = target.log_score(support)
    index = torch.multinomial(torch.softmax(log_score, 0), n, replacement=True,
                              generator=generator)
    prior_index = torch.multinomial(support.log_q.exp(), num_prior, replacement=True,
                                    generator=generator)
    log_z, log_z_se = dx.log_z_estimate((log_score - support.log_q.double())[prior_index])
    return Reference(samples=support[index], log_score=log_score[index], log_z=log_z,
                     log_z_se=log_z_se, kind=EXACT, target=target)


def snis_pool(target, n: int, seed: int) -> Reference:
    generator = torch.Generator().manual_seed(seed)
    support = target.support()
    index = torch.multinomial(support.log_q.exp(), n, replacement=True, generator=generator)
    log_score = target.log_score(support)[index]
    log_w = log_score - support.log_q.double()[index]
    log_z, log_z_se = dx.log_z_estimate(log_w)
    return Reference(samples=support[index], log_score=log_score, log_z=log_z,
                     log_z_se=log_z_se, kind=SNIS, target=target, log_weights=log_w)


@pytest.mark.parametrize("build", [exact_pool, snis_pool], ids=["exact", "snis"])
def test_reference_agrees_with_brute_force_within_3_se(build):
    target = toy_a_target(1.0)
    kl, tvd = brute_force_policy_distances()
    reference = build(target, 2000, seed=0)
    measured = distances(reference, toy_a_policy().log_prob(reference.samples))
    assert abs(measured.kl_target_policy - kl) <= 3 * measured.kl_target_policy_se
    assert abs(measured.tvd - tvd) <= 3 * measured.tvd_se
    # The standard errors are those of 2,000 draws, not vanishing nor useless.
    assert 0.005 < measured.kl_target_policy_se < 0.1
    assert 0.002 < measured.tvd_se < 0.05


@pytest.mark.parametrize("build", [exact_pool, snis_pool], ids=["exact", "snis"])
def test_standard_errors_are_calibrated_over_seeds(build):
    # z = (estimate − exact)/se over 60 independent pools: sd ≈ 1 if the se is honest (a
    # missing log Ẑ term or a wrong delta method moves it out of [0.7, 1.35]).
    target = toy_a_target(1.0)
    kl, tvd = brute_force_policy_distances()
    extra = {"num_prior": 300} if build is exact_pool else {}
    assert_se_calibrated((build(target, 300, seed=seed, **extra) for seed in range(60)), kl, tvd)


def test_the_log_z_term_is_in_the_se():
    # An exact pool whose log Ẑ comes from few prior draws has a larger se than the same pool
    # with log Ẑ's se set to 0: the difference is log Ẑ's se, added in quadrature.
    target = toy_a_target(1.0)
    reference = exact_pool(target, 1000, seed=1, num_prior=100)
    log_pi = toy_a_policy().log_prob(reference.samples)
    with_z = distances(reference, log_pi)
    without = distances(Reference(samples=reference.samples, log_score=reference.log_score,
                                  log_z=reference.log_z, log_z_se=0.0, kind=EXACT,
                                  target=target), log_pi)
    assert with_z.kl_target_policy_se == pytest.approx(
        math.hypot(without.kl_target_policy_se, reference.log_z_se), rel=1e-12)
    assert with_z.kl_target_policy_se > 1.5 * without.kl_target_policy_se


def test_evaluate_reports_the_reference_next_to_the_exact_distances():
    target = toy_a_target(1.0)
    pi = toy_a_policy()
    reference = exact_pool(target, 2000, seed=2)
    d = evaluate(target, pi.sample_batch(10), law=pi.log_prob, reference=reference)
    assert d.exact and d.distances_from == "law"
    assert d.reference_kind == "exact samples" and d.reference_num_samples == 2000
    assert d.reference_ess is None and d.reference_pareto_k is None
    assert abs(d.reference_kl_target_policy - d.kl_target_policy) <= (
        3 * d.reference_kl_target_policy_se)
    assert abs(d.reference_tvd - d.tvd) <= 3 * d.reference_tvd_se
    snis = evaluate(target, pi.sample_batch(10), law=pi.log_prob,
                    reference=snis_pool(target, 2000, seed=3))
    assert snis.reference_kind == "snis"
    assert 100 < snis.reference_ess < 2000 and snis.reference_pareto_k < 0.7


def test_a_policy_that_misses_target_mass_has_infinite_kl():
    # π puts no mass on sequences starting with token 2, which p reaches: KL(p‖π) = ∞.
    target = toy_a_target(1.0)
    blind = TabularLM(torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64),
                      torch.tensor(PI_T, dtype=torch.float64), 3)
    measured = distances(exact_pool(target, 500, seed=4), blind.log_prob(
        exact_pool(target, 500, seed=4).samples))
    assert measured.kl_target_policy == math.inf


def test_reference_for_another_target_or_context_is_refused():
    world = conditional_world()
    support = world.support("a")
    log_score = world.log_score(support, "a")
    keep = torch.isfinite(log_score)
    reference = Reference(samples=support[keep.nonzero().squeeze(-1)], log_score=log_score[keep],
                          log_z=float(torch.logsumexp(log_score, 0)), log_z_se=0.0, kind=EXACT,
                          target=world, context="a")
    prior_b = world.prior("b")
    with pytest.raises(ConfigError, match="built for context 'a', not for context 'b'"):
        evaluate(world, prior_b.sample_batch(4), context="b", law=prior_b.log_prob,
                 reference=reference)
    other = toy_a_target(1.0)
    with pytest.raises(ConfigError, match="built for target 'has_two', not for the target 'toy_a'"):
        evaluate(other, prior_b.sample_batch(4), law=prior_b.log_prob, reference=reference)
    with pytest.raises(ConfigError, match="needs the law"):
        evaluate(world, prior_b.sample_batch(4), context="a", reference=reference)
    # The right target and context pass.
    d = evaluate(world, prior_b.sample_batch(4), context="a", law=world.prior("a").log_prob,
                 reference=reference)
    assert d.reference_kl_target_policy == pytest.approx(d.kl_target_policy, abs=1e-9)


def test_an_empty_pool_is_refused():
    target = toy_a_target(1.0)
    support = target.support()
    with pytest.raises(EmptySupportError, match="empty pool"):
        Reference(samples=support[:0], log_score=torch.zeros(0, dtype=torch.float64),
                  log_z=0.0, log_z_se=0.0, kind=EXACT, target=target)
    with pytest.raises(EmptySupportError, match="exact draw 1 has log P = -inf"):
        Reference(samples=support[:2], log_score=torch.tensor([0.0, -math.inf]),
                  log_z=0.0, log_z_se=0.0, kind=EXACT, target=target)
    with pytest.raises(ConfigError, match="needs log_weights"):
        Reference(samples=support[:2], log_score=torch.zeros(2), log_z=0.0, log_z_se=0.0,
                  kind=SNIS, target=target)
