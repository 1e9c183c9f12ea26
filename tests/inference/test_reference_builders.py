"""Reference builders (SPEC §12): exact pools by Rejection, SNIS pools by Importance, on tabular
worlds (against enumeration), on the bundled code prior at step 0 (π = a: KL(p‖π) = −log Z)
and on a policy collapsed onto a few sequences, where only the yardstick sees the missed mass."""

from __future__ import annotations

import math
import warnings

import pyro
import pytest
import torch
from conftest import (
    assert_se_calibrated,
    brute_force_policy_distances,
    brute_force_toy_a,
    conditional_world,
    toy_a_target,
)

import bayesalign as ba
from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import ConfigError
from bayesalign.evaluation import evaluate, evaluate_policy
from bayesalign.inference import exact_reference, snis_reference
from bayesalign.models import CausalLM
from bayesalign.models.tiny import tiny_causal_lm
from bayesalign.sequences import Sequences


class Collapsed(SequenceDistribution):
    """(1 − ε)·uniform over a few sequences + ε·prior: a policy collapsed onto a few modes.

    The ε·prior part keeps KL(p‖π) finite (log π ≥ log ε + log a) while π's own draws almost
    never come from it (ε·eval_samples ≪ 1)."""

    def __init__(self, prior: SequenceDistribution, modes: Sequences, eps: float) -> None:
        super().__init__()
        self.prior, self.modes, self.eps = prior, modes, eps
        self.vocab_size, self.eos_token_id = prior.vocab_size, prior.eos_token_id
        self.mode_keys = set(modes.keys())
        assert len(self.mode_keys) == len(modes), "modes must be distinct"

    def log_prob(self, y: Sequences) -> torch.Tensor:
        on_mode = torch.tensor([k in self.mode_keys for k in y.keys()])
        log_mode = torch.where(on_mode, math.log((1 - self.eps) / len(self.modes)), -math.inf)
        log_prior = self.prior.log_prob(y).detach().double() + math.log(self.eps)
        return torch.logaddexp(log_mode.double(), log_prior)

    def sample_batch(self, num_samples: int) -> Sequences:
        from_prior = torch.rand(num_samples) < self.eps
        parts = [self.modes[torch.randint(len(self.modes), (int((~from_prior).sum()),))]]
        if from_prior.any():
            parts.append(self.prior.sample_batch(int(from_prior.sum())))
        y = Sequences.cat(parts, pad_token_id=self.prior.pad_token_id)
        return y.with_log_q(self.log_prob(y))


@pytest.fixture(scope="module")
def token_world():
    """A tiny GPT-2 prior (non-enumerable) and a constraint "token t appears", prior rate ≈ 10%."""
    prior = tiny_causal_lm(seed=1, initializer_range=0.3, max_new_tokens=12)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        draws = prior.sample_batch(512)
    present = torch.stack([((draws.tokens == t) & draws.mask).any(-1)
                           for t in range(prior.vocab_size)]).double().mean(-1)
    chosen = int((present - 0.1).abs().argmin())
    rate = float(present[chosen])
    assert 0.05 <= rate <= 0.2, rate

    @ba.target
    def has_token():
        y = pyro.sample("y", prior)
        ba.constraint("has_token", ((y.tokens == chosen) & y.mask).any(-1))

    return has_token, prior


def test_exact_reference_agrees_with_enumeration_on_toy_a():
    # Toy A's reward r = #2s ∈ [0, 3] at kl_coef 1: P/a = e^r ≤ e^3, so bound = e^3 is valid.
    target = toy_a_target(1.0)
    reference = exact_reference(target, bound=math.exp(3), num_samples=2000, seed=0)
    assert reference.kind == "exact samples" and len(reference.samples) == 2000
    assert "Rejection(bound=" in reference.method
    policy = target.prior()  # π = a: exact KL(p‖a) by enumeration, next to the yardstick
    d = evaluate(target, policy.sample_batch(8), law=policy.log_prob, reference=reference)
    assert d.exact
    assert abs(d.reference_kl_target_policy - d.kl_target_policy) <= (
        3 * d.reference_kl_target_policy_se)
    assert abs(d.reference_tvd - d.tvd) <= 3 * d.reference_tvd_se
    assert d.reference_kl_target_policy_se < 0.05


def test_reverse_kl_from_policy_draws_agrees_with_enumeration_on_toy_a():
    # KL(π‖p) = E_π[log π − log P] + log Z on π's draws with the pool's log Ẑ (SPEC §12);
    # π = a here, whose exact KL(a‖p) a plain loop over the 27 sequences gives.
    target = toy_a_target(1.0)
    reference = exact_reference(target, bound=math.exp(3), num_samples=2000, seed=0)
    torch.manual_seed(1)
    d = evaluate_policy(target, target.prior(), reference, eval_samples=4096)
    exact = brute_force_toy_a(1.0)["kl_a_p"]
    assert abs(d.reference_kl_policy_target - exact) <= 3 * d.reference_kl_policy_target_se
    assert d.reference_kl_policy_target_se < 0.05
    # A reward has full support: nothing outside it, and the in-support KL is the whole KL.
    assert d.reference_outside_support == 0.0
    assert d.reference_kl_policy_target_in_support == d.reference_kl_policy_target


def test_reverse_kl_of_a_policy_that_breaks_a_hard_constraint():
    # π = context a's prior measured against p(·|b) = a_b·1[has a 2]/Z: π puts mass on
    # sequences without a 2, so KL(π‖p) is infinite, and π's mass outside p's support and
    # KL(π_S‖p) of π conditioned on the support are what the draws can estimate.
    world = conditional_world()
    reference = exact_reference(world, bound=1.0, num_samples=2000, context="b", seed=2)
    prior_a = world.prior("a")
    support = world.support("b")
    log_pi = prior_a.log_prob(support).double()
    log_score = world.log_score(support, "b")
    inside = torch.isfinite(log_score)
    log_pi_s = log_pi[inside] - torch.logsumexp(log_pi[inside], 0)
    log_p = log_score[inside] - torch.logsumexp(log_score[inside], 0)
    exact_outside = 1 - float(log_pi[inside].exp().sum())
    exact_in_support = float((log_pi_s.exp() * (log_pi_s - log_p)).sum())
    assert 0.1 < exact_outside < 0.9 and exact_in_support > 0.05
    torch.manual_seed(3)
    d = evaluate_policy(world, prior_a, reference, context="b", eval_samples=4096)
    assert d.reference_kl_policy_target == math.inf and d.reference_kl_policy_target_se == 0.0
    assert abs(d.reference_outside_support - exact_outside) <= 3 * d.reference_outside_support_se
    assert abs(d.reference_kl_policy_target_in_support - exact_in_support) <= (
        3 * d.reference_kl_policy_target_in_support_se)


def test_reverse_distance_refuses_mismatched_or_empty_draws():
    from bayesalign.reference import reverse_distance

    reference = exact_reference(toy_a_target(1.0), bound=math.exp(3), num_samples=10, seed=0)
    with pytest.raises(ConfigError, match="got 3 values of log π for 2 of log P"):
        reverse_distance(reference, torch.zeros(2), torch.zeros(3))
    with pytest.raises(ConfigError, match="needs at least one policy draw"):
        reverse_distance(reference, torch.zeros(0), torch.zeros(0))


def test_exact_reference_standard_errors_are_calibrated_over_seeds():
    # The pool and log Ẑ come from one Rejection run (the accepted draws are some of the
    # proposals), with its stopping rule; z = (estimate − exact)/se over 60 runs still has
    # sd ≈ 1 (measured 0.98 for KL, 1.05 for TVD; a KL se without the log Ẑ term gives 1.41).
    target = toy_a_target(1.0)
    kl, tvd = brute_force_policy_distances()
    references = (exact_reference(target, bound=math.exp(3), num_samples=300, chunk_size=512,
                                  seed=100 + seed) for seed in range(60))
    assert_se_calibrated(references, kl, tvd)


def test_exact_reference_for_one_context_of_a_conditional_world():
    world = conditional_world()
    reference = exact_reference(world, bound=1.0, num_samples=2000, context="b", seed=1)
    prior_a = world.prior("a")  # π = the other context's prior: a real distance from p(·|b)
    d = evaluate(world, prior_a.sample_batch(8), context="b", law=prior_a.log_prob,
                 reference=reference)
    assert d.kl_target_policy > 0.5
    assert abs(d.reference_kl_target_policy - d.kl_target_policy) <= (
        3 * d.reference_kl_target_policy_se)
    # π puts mass where p(·|b) is 0 (no token 2): TVD = Σ (p − π)₊ still counts it, which
    # ½ E_p |1 − π/p| cannot (p never draws those sequences).
    assert abs(d.reference_tvd - d.tvd) <= 3 * d.reference_tvd_se
    log_pi = prior_a.log_prob(reference.samples).double()
    half_abs = float(0.5 * (1 - torch.exp(log_pi + reference.log_z - reference.log_score))
                     .abs().mean())
    assert abs(half_abs - d.tvd) > 10 * d.reference_tvd_se
    with pytest.raises(ConfigError, match="built for context 'b', not for context 'a'"):
        evaluate_policy(world, prior_a, reference, context="a", eval_samples=8)


def test_snis_reference_reports_ess_and_pareto_k():
    target = toy_a_target(1.0)
    reference = snis_reference(target, num_samples=4000, seed=2)
    assert reference.kind == "snis" and reference.num_proposed == 4000
    policy = target.prior()
    d = evaluate(target, policy.sample_batch(8), law=policy.log_prob, reference=reference)
    assert abs(d.reference_kl_target_policy - d.kl_target_policy) <= (
        3 * d.reference_kl_target_policy_se)
    assert d.reference_ess == pytest.approx(reference.ess) and 500 < d.reference_ess < 4000
    assert d.reference_pareto_k is not None and d.reference_pareto_k < 0.7


def test_a_yardstick_with_no_bound_says_what_to_pass():
    target = toy_a_target(1.0)
    with pytest.raises(ConfigError, match="got no bound and no proposal: pass bound=M") as error:
        exact_reference(target, num_samples=10)
    assert "snis_reference" in str(error.value)
    with pytest.raises(ConfigError, match="got no bound and a proposal"):
        exact_reference(target, num_samples=10, proposal=target.prior())
    # A bound below max P/q is refused by Rejection, naming the draw.
    with pytest.raises(ConfigError, match="bound 1.0"):
        exact_reference(target, bound=1.0, num_samples=10)


def test_yardstick_at_step_0_is_minus_log_z_on_a_tiny_gpt2(token_world):
    # π = a on a pointwise target a·1[b]: KL(p‖a) = −log Z = −log P_a(b). The yardstick's
    # log Ẑ (Rejection's proposals) and the on-policy estimate (fresh prior draws) are
    # independent; they agree within 3 combined se.
    target, prior = token_world
    reference = exact_reference(target, bound=1.0, num_samples=300, seed=3)
    torch.manual_seed(4)
    d = evaluate_policy(target, prior, reference, eval_samples=2048)
    assert d.distances_from == "policy draws" and not d.exact
    se = math.hypot(d.reference_kl_target_policy_se, d.log_z_se)
    assert abs(d.reference_kl_target_policy - d.kl_target_policy) <= 3 * se
    # log P − log π = 0 on the pool up to float32 rounding (log a cached while sampling with a
    # KV cache vs recomputed in one pass), so the yardstick is −log Ẑ.
    assert d.reference_kl_target_policy == pytest.approx(-reference.log_z, abs=1e-4)
    assert 1.5 < d.reference_kl_target_policy < 3.1  # prior rate 5–20%
    # In reverse: a restricted to b's support is p itself, so KL(π_S‖p) = 0 (two estimates of
    # log Z, the draws' share in S and the pool's, differ by chance), and π's mass outside the
    # support is 1 − Z.
    assert abs(d.reference_kl_policy_target_in_support) <= (
        3 * d.reference_kl_policy_target_in_support_se)
    assert d.reference_kl_policy_target == math.inf
    outside_se = math.hypot(d.reference_outside_support_se,
                            math.exp(reference.log_z) * reference.log_z_se)
    assert abs(d.reference_outside_support - (1 - math.exp(reference.log_z))) <= 3 * outside_se


@pytest.mark.slow
def test_yardstick_at_step_0_is_minus_log_z_on_the_code_prior():
    # bundled:code-small, b = "return" appears in 32 tokens (prior rate ≈ 10%).
    prior = CausalLM.from_pretrained("bundled:code-small", max_new_tokens=32)

    @ba.target
    def has_return():
        y = pyro.sample("y", prior)
        ba.constraint("return", torch.tensor(["return" in s for s in y.text]))

    reference = exact_reference(has_return, bound=1.0, num_samples=200, chunk_size=256, seed=5)
    torch.manual_seed(6)
    d = evaluate_policy(has_return, prior, reference, eval_samples=1024)
    rate = d.moments["return"][0]
    assert 0.05 <= rate <= 0.2
    se = math.hypot(d.reference_kl_target_policy_se, d.log_z_se)
    assert abs(d.reference_kl_target_policy - d.kl_target_policy) <= 3 * se
    assert d.reference_kl_target_policy == pytest.approx(-reference.log_z, abs=1e-4)


def test_a_collapsed_policy_looks_close_on_policy_but_far_by_the_yardstick(token_world):
    target, prior = token_world
    reference = exact_reference(target, bound=1.0, num_samples=300, seed=7)
    keys, first = set(), []
    for i, key in enumerate(reference.samples.keys()):
        if key not in keys:
            keys.add(key)
            first.append(i)
    modes = reference.samples[first[:3]]  # three sequences that meet the constraint
    eps = 1e-6
    collapsed = Collapsed(prior, modes, eps)
    torch.manual_seed(8)
    d = evaluate_policy(target, collapsed, reference, eval_samples=1024)
    step0 = evaluate_policy(target, prior, reference, eval_samples=1024)
    # On-policy: π's draws are the three modes, which all meet the constraint, so the SNIS
    # estimate is KL between p restricted to them and uniform: at most log 3.
    assert d.distances_from == "policy draws"
    assert d.moments["has_token"][0] == 1.0
    assert d.kl_target_policy <= math.log(3) + 1e-9
    # The yardstick: p's draws off the modes have log π ≈ log ε + log a, so KL(p‖π) ≈ −log ε
    # − log Z ≫ KL(p‖a), the prior's own distance.
    assert d.reference_kl_target_policy > 10
    assert d.reference_kl_target_policy > step0.reference_kl_target_policy + 8
    assert d.reference_kl_target_policy - 3 * d.reference_kl_target_policy_se > (
        5 * d.kl_target_policy)
    # TVD = E_p (1 − π/p)₊: p's draws off the modes have π/p ≈ ε, so it is ≈ 1.
    assert 0.95 < d.reference_tvd <= 1.0


def test_a_reference_for_another_target_is_refused(token_world):
    target, prior = token_world
    reference = exact_reference(toy_a_target(1.0), bound=math.exp(3), num_samples=10)
    with pytest.raises(ConfigError, match="built for target 'toy_a', not for the target "
                                          "'has_token'"):
        evaluate_policy(target, prior, reference, eval_samples=8)


def test_one_pool_measures_several_engines_and_a_saved_policy(tmp_path):
    from bayesalign.inference import DPG, KLRL
    from bayesalign.posterior import Posterior

    target = toy_a_target(1.0)
    reference = exact_reference(target, bound=math.exp(3), num_samples=2000, seed=9)
    budget = {"steps": 100, "batch_size": 32, "seed": 0, "progress": False}
    for engine in (DPG(**budget), KLRL(algorithm="rloo", **budget)):
        post = engine.fit(target)
        d = evaluate_policy(target, post.policy, reference, eval_samples=64)
        # The policy's exact KL(p‖π) (enumeration) is what the yardstick estimates.
        assert d.kl_target_policy == pytest.approx(post.diagnostics.kl_target_policy, abs=1e-9)
        assert abs(d.reference_kl_target_policy - d.kl_target_policy) <= (
            3 * d.reference_kl_target_policy_se)
    # A saved policy, loaded into a fresh copy of the prior, gets the same numbers from the pool.
    post.save(tmp_path / "post")
    loaded = Posterior.load(tmp_path / "post", policy=target.prior().trainable_copy())
    again = evaluate_policy(target, loaded.policy, reference, eval_samples=64)
    assert again.reference_kl_target_policy == pytest.approx(d.reference_kl_target_policy,
                                                             abs=1e-9)
    assert again.reference_kl_target_policy != pytest.approx(
        evaluate_policy(target, target.prior(), reference, eval_samples=64)
        .reference_kl_target_policy, abs=1e-3)


def ids_target(prior, kl_coef: float):
    @ba.target
    def token_ids():
        y = pyro.sample("y", prior)
        ba.reward("ids", (y.tokens.double() * y.mask).sum(-1) / 1000, kl_coef=kl_coef)

    return token_ids


@pytest.mark.parametrize("kl_coef, reason", [(0.1, "Pareto k̂ = "), (0.3, "ESS = "),
                                             (1.0, None)])
def test_an_untrustworthy_snis_reference_is_flagged(token_world, kl_coef, reason):
    # A continuous reward on the tiny GPT-2 at a small kl_coef gives heavy-tailed weights on
    # 400 prior draws (measured: k̂ ≈ 2.0, ESS ≈ 2 at 0.1; k̂ ≈ 0.44, ESS ≈ 42 at 0.3; k̂ < 0,
    # ESS ≈ 288 at 1.0).
    _, prior = token_world
    target = ids_target(prior, kl_coef)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Importance's own k̂ warning on its weights
        reference = snis_reference(target, num_samples=400, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = evaluate_policy(target, prior, reference, eval_samples=64)
    flagged = [w for w in d.warnings if "SNIS reference" in w]
    assert len([w for w in caught if "SNIS reference" in str(w.message)]) == len(flagged)
    if reason is None:
        assert not flagged and reference.untrusted() is None
    else:
        assert len(flagged) == 1 and reason in flagged[0] and "unreliable" in flagged[0]
