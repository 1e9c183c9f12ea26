"""DPG family and KL-regularised RL converge to the exact posterior (SPEC §2, §3, §10)."""

import math
import warnings

import pyro
import pytest
import torch
from conftest import (
    assert_monitor_quiet,
    conditional_world,
    has_two_target,
    toy_a_prior,
    toy_a_target,
)

import bayesalign as ba
from bayesalign.diagnostics import kl
from bayesalign.errors import ConfigError, DivergenceWarning
from bayesalign.inference import DPG, KLRL, Exact
from bayesalign.models import TabularLM

BUDGET = {"steps": 3000, "batch_size": 64, "seed": 0, "progress": False}

ENGINES = {
    "dpg": lambda: DPG(**BUDGET),
    "dpg_baseline": lambda: DPG(baseline=True, **BUDGET),
    "dpg_off_policy": lambda: DPG(off_policy=True, **BUDGET),
    "rloo": lambda: KLRL(algorithm="rloo", **BUDGET),
    "ppo": lambda: KLRL(algorithm="ppo", **BUDGET),
}
TOLERANCE = {"ppo": 0.02}


def random_world(seed: int) -> ba.Target:
    g = torch.Generator().manual_seed(seed)
    vocab, length = 3, 3
    initial = torch.rand(vocab, generator=g, dtype=torch.float64) + 0.1
    transition = torch.rand(vocab, vocab, generator=g, dtype=torch.float64) + 0.1
    reward = torch.randn(vocab, generator=g, dtype=torch.float64)
    prior = TabularLM(initial / initial.sum(), transition / transition.sum(-1, keepdim=True), length)

    @ba.target
    def world():
        y = pyro.sample("y", prior)
        ba.reward("r", reward[y.tokens].sum(-1), kl_coef=1.0)

    return world


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("world", ["toy_a", "random_1", "random_2"])
def test_policy_engines_reach_the_exact_posterior(engine, world):
    target = toy_a_target(1.0) if world == "toy_a" else random_world(int(world[-1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)  # a converged run raises no alarm
        post = ENGINES[engine]().fit(target)
    assert_monitor_quiet(post, checks_every=4 if engine == "ppo" else 1)
    exact = Exact().fit(target)
    # The diagnostics are exact: recompute KL(p‖π) here from the two laws on the support.
    support = exact.samples
    kl_exact = kl(exact.log_prob(support), post.log_prob(support).detach())
    assert post.diagnostics.exact
    assert post.diagnostics.kl_target_policy == pytest.approx(kl_exact, abs=1e-12)
    assert kl_exact < TOLERANCE.get(engine, 0.01)
    start = kl(exact.log_prob(support), support.log_q)
    assert kl_exact < start / 20
    if engine in ("rloo", "ppo"):
        # KL-RL's objective E_π[log L] − KL(π‖a) (J/kl_coef) approaches log Z from below.
        assert post.diagnostics.elbo <= exact.log_z + 1e-12
        assert exact.log_z - post.diagnostics.elbo < 0.01


def test_pointwise_constraint_with_dpg():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        post = DPG(**BUDGET).fit(has_two_target())
    assert post.diagnostics.kl_target_policy < 0.01
    assert post.diagnostics.moments["has_two"][0] > 0.99
    assert math.exp(post.extras["running_log_z[None]"]) == pytest.approx(0.466, rel=0.05)


def test_klrl_with_a_hard_constraint_stays_finite():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        post = KLRL(algorithm="rloo", **BUDGET).fit(has_two_target())
    assert all(math.isfinite(row["loss"]) for row in post.history)
    assert post.diagnostics.kl_target_policy < 0.02
    assert post.diagnostics.moments["has_two"][0] > 0.99


def test_kl_estimators_match_in_mean_and_unbiased_gradients():
    """k1 and k3 average to KL(π‖a); (k1, reward) and (k2, loss) give the exact ∇KL(π‖a)."""
    from bayesalign.inference.klrl import kl_estimate

    prior = toy_a_prior()
    policy = prior.trainable_copy()
    with torch.no_grad():
        policy.module.tables[0] += torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64)
    support = prior.enumerate_support()
    log_a = support.log_q
    log_pi = policy.log_prob(support)
    pi = log_pi.detach().exp()
    ratio = (log_pi - log_a).detach()
    exact_kl = float((pi * ratio).sum())
    for estimator in ("k1", "k3"):
        assert float((pi * kl_estimate(estimator, ratio)).sum()) == pytest.approx(exact_kl, abs=1e-12)
    params = list(policy.module.parameters())
    exact_grad = torch.autograd.grad((log_pi.exp() * (log_pi - log_a)).sum(), params,
                                     retain_graph=True)
    # Expectations under π of the two unbiased surrogates, computed exactly over the support.
    reward_surrogate = (pi * kl_estimate("k1", ratio) * log_pi).sum()
    loss_surrogate = (pi * kl_estimate("k2", log_pi - log_a)).sum()
    for surrogate in (reward_surrogate, loss_surrogate):
        grads = torch.autograd.grad(surrogate, params, retain_graph=True)
        for g, e in zip(grads, exact_grad):
            assert torch.allclose(g, e, atol=1e-10)
    biased = (pi * kl_estimate("k3", log_pi - log_a)).sum()
    grads = torch.autograd.grad(biased, params)
    assert not all(torch.allclose(g, e, atol=1e-6) for g, e in zip(grads, exact_grad))


def test_dpg_baseline_keeps_the_mean_gradient_and_lowers_variance():
    """E_q[(π/q) ∇log π] = 0, so the Ẑ baseline changes no expected gradient (SPEC §10.3)."""
    target = toy_a_target(1.0)
    exact = Exact().fit(target)
    support = exact.samples
    policy = toy_a_prior().trainable_copy()
    log_pi = policy.log_prob(support)
    pi = log_pi.detach().exp()
    p = exact.log_prob(support).exp()
    params = list(policy.module.parameters())

    def per_sample_grads(weight):
        rows = []
        for i in range(len(support)):
            g = torch.autograd.grad(-weight[i] * log_pi[i], params, retain_graph=True)
            rows.append(torch.cat([x.reshape(-1) for x in g]))
        return torch.stack(rows)

    plain = per_sample_grads(p / pi)  # on-policy DPG: (P/(Zπ)) ∇log π
    centred = per_sample_grads(p / pi - 1)
    mean_plain, mean_centred = (pi[:, None] * plain).sum(0), (pi[:, None] * centred).sum(0)
    assert torch.allclose(mean_plain, mean_centred, atol=1e-12)
    var_plain = (pi[:, None] * (plain - mean_plain) ** 2).sum()
    var_centred = (pi[:, None] * (centred - mean_centred) ** 2).sum()
    assert var_centred < var_plain


def test_off_policy_swaps_only_when_the_estimated_kl_improves():
    post = DPG(off_policy=True, proposal_update_interval=8, **{**BUDGET, "steps": 400}).fit(
        toy_a_target(1.0))
    checks = [row for row in post.history if "kl_target_policy_check" in row]
    assert checks
    swaps = [row["proposal_swaps"] for row in post.history]
    previous = 0.0
    for row in post.history:
        if "kl_target_policy_check" in row:
            improved = row["kl_target_policy_check"] < row["kl_target_proposal_check"]
            assert (row["proposal_swaps"] == previous + 1) == improved
        else:
            assert row["proposal_swaps"] == previous
        previous = row["proposal_swaps"]
    assert swaps[-1] >= 1


@pytest.mark.parametrize("divergence", ["reverse_kl", "tv", "js"])
def test_f_dpg_divergences_move_towards_the_target(divergence):
    target = toy_a_target(1.0)
    post = DPG(divergence=divergence, baseline=True, **{**BUDGET, "steps": 1500}).fit(target)
    assert post.diagnostics.kl_target_policy < 0.05


def test_cdpg_per_context_z_beats_one_global_z():
    """A policy shared by both contexts: with Ẑ_c CDPG fits the context average (the equal
    mixture of p_a and p_b), with one global Z it fits a Z_c-weighted mixture (SPEC §2.5)."""
    target = conditional_world()
    settings = {**BUDGET, "steps": 2000, "contexts_per_step": 2}
    cdpg = DPG(**settings).fit(target, contexts=["a", "b"])
    global_z = DPG(per_context_z=False, **settings).fit(target, contexts=["a", "b"])
    for context, z in (("a", 0.466), ("b", 0.872)):
        assert math.exp(Exact().fit(target, context).log_z) == pytest.approx(z, abs=1e-12)
        assert math.exp(cdpg.extras[f"running_log_z[{context}]"]) == pytest.approx(z, rel=0.05)
    assert cdpg.diagnostics.kl_target_policy < global_z.diagnostics.kl_target_policy
    # And CDPG approaches the best a shared policy can do: KL to the equal mixture.
    support = Exact().fit(target, "a").samples
    log_pa = Exact().fit(target, "a").log_prob(support)
    log_pb = Exact().fit(target, "b").log_prob(support)
    mixture = torch.logaddexp(log_pa, log_pb) - math.log(2)
    floor = 0.5 * (kl(log_pa, mixture) + kl(log_pb, mixture))
    assert cdpg.diagnostics.kl_target_policy < floor + 0.05


def test_dpg_on_a_fitted_moment_target():
    """λ fitted by SNIS within 0.02 of λ* (exact fit to 1e-6), then DPG: E_π[φ] within 0.02."""
    from bayesalign.inference import fit_moments

    prior = toy_a_prior()

    @ba.target
    def half_have_two():
        y = pyro.sample("y", prior)
        ba.moment("has_two", (y.tokens == 2).any(-1).double(), mean=0.5)

    exact_fit = fit_moments(half_have_two)
    m0 = 0.466
    closed_form = math.log((1 - m0) / m0)
    assert float(exact_fit.lambdas["has_two"]) == pytest.approx(closed_form, abs=1e-6)
    sampled = fit_moments(half_have_two, num_samples=100_000, seed=0)
    assert float(sampled.lambdas["has_two"]) == pytest.approx(closed_form, abs=0.02)
    assert 1 <= sampled.ess <= 100_000
    post = DPG(**BUDGET).fit(sampled.target)
    assert post.diagnostics.moments["has_two"][0] == pytest.approx(0.5, abs=0.02)
    assert post.diagnostics.kl_target_policy < 0.01


@pytest.mark.parametrize("engine", [DPG, KLRL])
def test_constructor_contexts_are_deprecated_and_fit_the_same(engine):
    settings = {**BUDGET, "steps": 20, "contexts_per_step": 2, "eval_samples": 64}
    with pytest.warns(DeprecationWarning, match=r"\(contexts=\.\.\.\) is deprecated.*"
                                                r"fit\(target, contexts=\.\.\.\)") as caught:
        old = engine(**settings, contexts=["a", "b"])
    assert caught[0].filename == __file__  # the warning points at the caller
    target = conditional_world()
    before, after = old.fit(target), engine(**settings).fit(target, contexts=["a", "b"])
    assert before.engine == after.engine == ("CDPG" if engine is DPG else "KLRL-rloo")
    for a, b in zip(before.policy.module.parameters(), after.policy.module.parameters()):
        assert torch.equal(a, b)
    assert [r["loss"] for r in before.history] == [r["loss"] for r in after.history]


def test_a_context_given_two_ways_is_refused():
    target = conditional_world()
    with pytest.raises(ConfigError, match=r"DPG.fit got context='a' and contexts=: give one "
                                          "context or several, not both"):
        DPG(**BUDGET).fit(target, "a", contexts=["a", "b"])
    with pytest.warns(DeprecationWarning):
        old = KLRL(**BUDGET, contexts=["a", "b"])
    with pytest.raises(ConfigError, match=r"KLRL.fit got contexts=, but the constructor got "
                                          r"contexts= \(deprecated\)"):
        old.fit(target, contexts=["a", "b"])
    with pytest.raises(ConfigError, match=r"KLRL.fit got context='a', but the constructor got "
                                          "contexts="):
        old.fit(target, "a")


def test_step_metrics_average_over_the_contexts_that_report_them():
    from bayesalign.inference.policy import mean_metrics

    rows = [{"log_z": 0.0, "ess_fraction": 0.0}, {"log_z": -1.0, "kl_target_policy": 0.3}]
    assert mean_metrics(rows) == {"log_z": -0.5, "ess_fraction": 0.0, "kl_target_policy": 0.3}


def test_cdpg_logs_the_proposal_check_once_per_step_not_per_context():
    settings = {**BUDGET, "steps": 16, "contexts_per_step": 2, "eval_samples": 64}
    post = DPG(off_policy=True, proposal_update_interval=8, **settings).fit(
        conditional_world(), contexts=["a", "b"])
    swaps = [row["proposal_swaps"] for row in post.history]
    assert all(s == int(s) for s in swaps) and swaps[-1] >= 1  # counts, not halved counts
