"""The one result type: sampling, log_prob, summary, ArviZ export, save/load; conditional targets."""

import math

import numpy as np
import pytest
import torch
from conftest import P1, T, conditional_world
from scipy import stats

import bayesalign as ba
from bayesalign.inference import QRS, Exact, Importance, Rejection
from bayesalign.models import TabularLM
from bayesalign.sequences import Sequences


def test_sample_follows_weights(toy_a):
    exact = Exact().fit(toy_a)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        draws = exact.sample(50_000)
    r = (draws.tokens == 2).sum(-1).double().mean()
    assert float(r) == pytest.approx(exact.diagnostics.rewards["r"], abs=0.03)


def test_summary_lists_what_applies(toy_a):
    text = QRS(qrs_beta=4.0, num_samples=500).fit(toy_a).summary()
    for field in ("log_z", "ess_fraction", "pareto_k", "acceptance_rate", "kl_target_policy",
                  "tvd", "rewards[r]", "qrs_beta"):
        assert field in text


def test_to_arviz_holds_draws_weights_and_diagnostics(toy_a):
    post = Importance(num_samples=1000, seed=0).fit(toy_a)
    data = post.to_arviz()
    assert data.posterior["r"].shape == (1, 1000)
    weights = data.sample_stats["weight"].values
    assert weights.sum() == pytest.approx(1.0)
    assert data.proposal_stats["log_weight"].shape == (1, 1000)
    assert data.attrs["ess"] == pytest.approx(post.diagnostics.ess)


def test_save_and_load_round_trip(toy_a, tmp_path):
    post = Importance(num_samples=300, seed=0).fit(toy_a)
    post.save(tmp_path / "post")
    loaded = ba.Posterior.load(tmp_path / "post")
    assert torch.equal(loaded.samples.tokens, post.samples.tokens)
    assert torch.equal(loaded.log_weights, post.log_weights)
    assert loaded.diagnostics == post.diagnostics
    support = Exact().fit(toy_a).samples
    assert torch.allclose(loaded.log_prob(support), post.log_prob(support))


def test_policy_posterior_round_trip(tmp_path):
    prior = TabularLM(torch.tensor(P1, dtype=torch.float64), torch.tensor(T, dtype=torch.float64), 3)
    policy = prior.trainable_copy()
    with torch.no_grad():
        policy.module.tables[0] += torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    sample = policy.sample_batch(5)
    post = ba.Posterior(sample, engine="Policy", policy=policy, law=policy.log_prob,
                        diagnostics=ba.Diagnostics())
    post.save(tmp_path / "policy")
    fresh = prior.trainable_copy()
    loaded = ba.Posterior.load(tmp_path / "policy", policy=fresh)
    support = prior.enumerate_support()
    assert torch.allclose(loaded.log_prob(support), policy.log_prob(support))


def test_conditional_target_per_context_normalisers():
    target = conditional_world()
    assert math.exp(Exact().fit(target, "a").log_z) == pytest.approx(0.466, abs=1e-12)
    assert math.exp(Exact().fit(target, "b").log_z) == pytest.approx(0.872, abs=1e-12)
    # Rejection given "b" draws from p(·|b), not p(·|a): χ² of 5000 draws (seed 0) against
    # each context's exact law (its declared distance, 0 by theorem, tests nothing).
    post = Rejection(bound=1.0, num_samples=5000, seed=0).fit(target, "b")
    assert post.diagnostics.distances_from == "law"
    for context, accept in (("b", True), ("a", False)):
        exact = Exact().fit(target, context)
        p = exact.log_prob(exact.samples).exp().numpy()
        keep = p > 0  # sequences without a 2 have no mass under either context
        index = {k: i for i, k in enumerate(exact.samples.keys())}
        observed = np.zeros(len(p))
        for k in post.samples.keys():
            observed[index[k]] += 1
        assert observed[~keep].sum() == 0
        pvalue = stats.chisquare(observed[keep], p[keep] * observed.sum()).pvalue
        assert (pvalue > 1e-3) if accept else (pvalue < 1e-6), (context, pvalue)


def test_rows_with_different_contexts_are_scored_by_their_own_prior():
    target = conditional_world()
    tokens = torch.tensor([[2, 0, 0], [2, 0, 0], [0, 0, 0]])
    y = Sequences(tokens=tokens, context=["a", "b", "b"])
    log_score = target.log_score(y)
    expected = [math.log(0.2 * 0.3 * 0.6), math.log(0.8 * 0.3 * 0.6), -math.inf]
    assert log_score.tolist() == pytest.approx(expected)
