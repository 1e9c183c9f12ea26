"""The one result type: sampling, log_prob, summary, ArviZ export, save/load; conditional targets."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import P1, T, brute_force_toy_a, conditional_world, toy_a_prior
from safetensors.torch import save_file
from scipy import stats

import bayesalign as ba
from bayesalign.inference import QRS, BestOfN, Exact, Importance, Rejection
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
                  "tvd", "rewards[r]", "qrs_beta", "distances_from"):
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


def test_saved_extras_and_settings_round_trip(toy_a, tmp_path):
    post = BestOfN(n=4, reward="r", num_samples=50, seed=0).fit(toy_a)
    post.save(tmp_path / "bon")
    assert json.loads((tmp_path / "bon" / "posterior.json").read_text())["format"] == 2
    loaded = ba.Posterior.load(tmp_path / "bon")
    assert loaded.extras == post.extras and set(loaded.extras) == {"kl_bound", "win_rate_bound"}
    assert loaded.config == {"n": 4, "reward": "r", "num_samples": 50}
    assert loaded.diagnostics == post.diagnostics


# posterior.json as written before the engine's numbers moved into the diagnostics (format 1,
# no "format" key): Diagnostics without distances_from or extras, and beside them the engine's
# extras, its estimates and the counts that were evaluate's inputs.
FORMAT_1_DIAGNOSTICS = {
    "log_z": 1.05, "log_z_se": 0.08, "ess": 1.8, "ess_fraction": 0.45, "pareto_k": -math.inf,
    "pareto_k_threshold": 0.0, "acceptance_rate": 0.5, "acceptance_rate_se": 0.25,
    "kl_target_policy": 0.1603136791, "kl_policy_prior": 0.3, "tvd": 0.2186219623,
    "elbo": 1.0, "rewards": {"r": 1.5}, "moments": {}, "num_proposed": 4, "num_samples": 2,
    "exact": True, "warnings": [],
}


def test_load_reads_the_format_1_layout(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    tokens = torch.tensor([[2, 2, 2], [0, 2, 1]])
    log_w = torch.tensor([3.0, 1.0, -0.5, 0.2], dtype=torch.float64)
    save_file({"tokens": tokens, "mask": torch.ones_like(tokens, dtype=torch.bool),
               "proposal_log_weights": log_w}, str(folder / "samples.safetensors"))
    meta = {"engine": "QRS", "config": {"qrs_beta": 4.0, "num_samples": 2}, "history": [],
            "num_proposed": 4, "num_accepted": 2, "exact_log_z": None,
            "estimates": {"tvd": 0.2, "kl_target_policy": 0.16}, "extras": {"qrs_beta": 4.0},
            "diagnostics": FORMAT_1_DIAGNOSTICS, "context": None}
    (folder / "posterior.json").write_text(json.dumps(meta, indent=2))
    loaded = ba.Posterior.load(folder)
    assert loaded.engine == "QRS" and loaded.config == meta["config"]
    assert torch.equal(loaded.samples.tokens, tokens) and loaded.log_weights is None
    assert torch.equal(loaded.proposal_log_weights, log_w)
    d = loaded.diagnostics
    for name, value in FORMAT_1_DIAGNOSTICS.items():
        assert getattr(d, name) == value, name
    assert d.distances_from is None and loaded.extras == {"qrs_beta": 4.0}
    assert loaded.log_z == 1.05 and "qrs_beta" in loaded.summary()
    # Saved again, it is format 2 and reads back the same.
    loaded.save(tmp_path / "new")
    again = ba.Posterior.load(tmp_path / "new")
    assert again.diagnostics == d and again.extras == {"qrs_beta": 4.0}


def test_evaluate_is_a_function_of_draws_weights_and_law(toy_a):
    post = Importance(num_samples=500, seed=0).fit(toy_a)
    samples, log_w = post.samples, post.log_weights
    tokens, weights = samples.tokens.clone(), log_w.clone()
    d = ba.evaluate(toy_a, samples, log_weights=log_w, proposal_log_weights=log_w)
    assert d == post.diagnostics and d.num_proposed == 500
    assert torch.equal(samples.tokens, tokens) and torch.equal(log_w, weights)
    assert d.exact and d.distances_from == "weighted samples" and d.kl_target_policy > 0
    # A declared law replaces the weighted empirical law in the distances (here p itself).
    exact = Exact().fit(toy_a)
    by_law = ba.evaluate(toy_a, samples, law=exact.law)
    assert by_law.distances_from == "law" and by_law.kl_target_policy == pytest.approx(0, abs=1e-12)
    # With the prior a as the declared law, the distances are KL(p‖a) and TVD(p, a) by loop.
    oracle = brute_force_toy_a(1.0)
    by_prior = ba.evaluate(toy_a, samples, law=toy_a_prior().log_prob)
    tvd_p_a = 0.5 * sum(abs(oracle["p"][x] - oracle["a"][x]) for x in oracle["a"])
    assert by_prior.distances_from == "law"
    assert by_prior.kl_target_policy == pytest.approx(oracle["kl_p_a"], abs=1e-12)
    assert by_prior.tvd == pytest.approx(tvd_p_a, abs=1e-12)
    assert by_law.rewards["r"] == pytest.approx(exact.diagnostics.rewards["r"], abs=1e-12)
    # Neither: no distances, and the rewards are averages over the draws.
    plain = ba.evaluate(toy_a, samples)
    assert plain.distances_from is None and plain.kl_target_policy is None and not plain.exact
    assert plain.rewards["r"] == pytest.approx(float((samples.tokens == 2).sum(-1).double().mean()))


def test_evaluate_estimates_from_fresh_policy_draws(toy_a):
    prior = toy_a_prior()
    oracle = brute_force_toy_a(1.0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        d = ba.evaluate(toy_a, prior.sample_batch(10), policy=prior, eval_samples=20_000)
    assert d.num_proposed == 20_000 and d.distances_from == "policy draws" and not d.exact
    assert abs(d.log_z - math.log(oracle["z"])) < 3 * d.log_z_se
    # IS estimates (seed 0: 0.487 and 0.378) of KL(p‖a) and TVD(p, a) = 0.3777 (SPEC §10).
    assert d.kl_target_policy == pytest.approx(oracle["kl_p_a"], abs=0.02)
    assert d.tvd == pytest.approx(0.3776975621, abs=0.02)
    tvd_p_a = 0.5 * sum(abs(oracle["p"][x] - oracle["a"][x]) for x in oracle["a"])
    assert tvd_p_a == pytest.approx(0.3776975621, abs=1e-9)
    assert d.tvd == pytest.approx(tvd_p_a, abs=0.02)
    assert d.kl_policy_prior == pytest.approx(0.0, abs=1e-12)  # π = a, draw by draw
    # π ≠ a (first-token law (.2,.3,.5), same transitions): the estimate of KL(π‖a) from π's
    # draws against a plain loop over the 27 sequences.
    first = [0.2, 0.3, 0.5]
    policy = TabularLM(torch.tensor(first, dtype=torch.float64), torch.tensor(T, dtype=torch.float64), 3)
    pi = {x: first[x[0]] * T[x[0]][x[1]] * T[x[1]][x[2]] for x in oracle["a"]}
    kl_pi_a = sum(w * math.log(w / oracle["a"][x]) for x, w in pi.items())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        moved = ba.evaluate(toy_a, policy.sample_batch(10), policy=policy, eval_samples=20_000)
    assert moved.distances_from == "policy draws" and not moved.exact
    assert moved.kl_policy_prior == pytest.approx(kl_pi_a, abs=0.03)
    assert abs(moved.log_z - math.log(oracle["z"])) < 3 * moved.log_z_se


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
