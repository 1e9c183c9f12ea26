"""DPG that uses each draw more than once (updates_per_batch, ratio_clip, the replay pool):
exact answers on Toy A, weights under the drawing q, exact resume, clear errors."""

import math
import warnings

import pytest
import torch
from conftest import toy_a_prior, toy_a_target

from bayesalign.diagnostics import kl
from bayesalign.errors import ConfigError, DivergenceWarning
from bayesalign.inference import DPG, Exact
from bayesalign.inference.dpg import clip_mask
from bayesalign.inference.dpg_state import DPGState
from bayesalign.inference.policy import score_batch
from bayesalign.inference.replay import (
    ReplayPool,
    StoredDraws,
    bytes_per_draw,
    require_pool_fits,
)

BUDGET = {"steps": 3000, "batch_size": 64, "seed": 0, "progress": False}


@pytest.mark.parametrize("options", [{"updates_per_batch": 2}, {"replay_size": 256}])
def test_reusing_draws_reaches_the_exact_posterior(options):
    target = toy_a_target(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)  # a converged run raises no alarm
        post = DPG(**options, **BUDGET).fit(target)
    exact = Exact().fit(target)
    support = exact.samples
    kl_exact = kl(exact.log_prob(support), post.log_prob(support).detach())
    assert post.diagnostics.kl_target_policy == pytest.approx(kl_exact, abs=1e-12)
    assert kl_exact < 0.01  # the tolerance of test_policy_engines_reach_the_exact_posterior
    assert kl_exact < kl(exact.log_prob(support), support.log_q) / 20
    # The same number of optimizer steps from fewer draws: one batch per updates_per_batch
    # steps, and half of each batch fresh with a pool.
    fresh = BUDGET["batch_size"] // (2 if "replay_size" in options else 1)
    assert post.extras["samples_drawn"] == BUDGET["steps"] // options.get(
        "updates_per_batch", 1) * fresh
    assert math.exp(post.extras["running_log_z[None]"]) == pytest.approx(
        math.exp(exact.log_z), rel=0.05)


def test_replayed_draws_are_weighted_by_the_q_that_drew_them():
    target = toy_a_target(1.0)
    prior = toy_a_prior()
    torch.manual_seed(0)
    drawn = score_batch(target, prior, 32, None)  # q = a
    pool = ReplayPool(capacity=64)
    pool.add("None", StoredDraws.of(drawn))
    # The policy has moved since: a trained π ≠ a.
    policy = DPG(steps=200, batch_size=32, seed=1, progress=False, eval_samples=64).fit(
        target).policy
    replayed = pool.sample("None", 32).batch(None, torch.device("cpu"))
    log_a = prior.log_prob(replayed.y).double()
    log_pi = policy.log_prob(replayed.y).double().detach()
    assert (log_pi - log_a).abs().max() > 0.1
    assert torch.equal(replayed.log_q, log_a)
    assert torch.equal(replayed.log_w, replayed.log_score - log_a)
    # DPG's loss on them is −mean P/(Ẑ q_draw) · log π: the weights are P/a, not P/π.
    engine = DPG(steps=1, batch_size=32, progress=False)
    log_z = math.log(0.5)
    state = DPGState("", -1.0, None)
    loss, _, _ = engine._loss(policy, replayed, log_z, state)
    expected = -(torch.exp(replayed.log_score - log_z - log_a) * log_pi).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-9)
    wrong = -(torch.exp(replayed.log_score - log_z - log_pi) * log_pi).mean()
    assert abs(float(loss.detach()) - float(wrong)) > 1e-3


def test_the_pool_keeps_the_newest_draws_and_samples_without_replacement():
    target = toy_a_target(1.0)
    torch.manual_seed(0)
    batches = [StoredDraws.of(score_batch(target, toy_a_prior(), 10, None)) for _ in range(3)]
    pool = ReplayPool(capacity=15)
    for batch in batches:
        pool.add("None", batch)
    assert len(pool) == 15
    newest = StoredDraws.cat([batches[1].rows(torch.arange(5, 10)), batches[2]])
    assert torch.equal(pool.draws["None"].log_q, newest.log_q)
    picked = pool.sample("None", 15)
    assert sorted(picked.log_q.tolist()) == sorted(newest.log_q.tolist())
    assert pool.sample("other", 4) is None
    smaller = ReplayPool(capacity=4)
    smaller.load_state_dict(pool.state_dict())  # a resume with a smaller replay_size
    assert torch.equal(smaller.draws["None"].log_q, newest.log_q[-4:])


def test_the_ratio_clip_drops_terms_pushed_past_one_plus_or_minus_epsilon():
    coefficient = torch.tensor([-1.0, -1.0, 1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    ratio = torch.tensor([1.3, 0.5, 0.7, 1.5, 1.1, 0.9], dtype=torch.float64)
    kept = clip_mask(coefficient, ratio.log(), 0.2)
    # Pushed up past 1.2: dropped; pushed up from below: kept; pushed down past 0.8: dropped.
    assert kept.tolist() == [0.0, 1.0, 0.0, 1.0, 1.0, 1.0]


def test_later_updates_are_clipped_and_counted():
    post = DPG(updates_per_batch=4, learning_rate=0.3, steps=40, batch_size=32, seed=2,
               progress=False, eval_samples=64).fit(toy_a_target(1.0))
    updates = [row["batch_update"] for row in post.history]
    assert updates[:8] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert all("clipped_fraction" not in row for row in post.history if row["batch_update"] == 0)
    clipped = [row["clipped_fraction"] for row in post.history if row["batch_update"] > 0]
    assert max(clipped) > 0  # at this rate some ratios leave 1 ± 0.2 within a cycle
    unclipped = DPG(updates_per_batch=4, ratio_clip=None, learning_rate=0.3, steps=40,
                    batch_size=32, seed=2, progress=False, eval_samples=64).fit(toy_a_target(1.0))
    assert all("clipped_fraction" not in row for row in unclipped.history)
    assert [r["loss"] for r in unclipped.history[:5]] != [r["loss"] for r in post.history[:5]]


def parameters(post) -> list[torch.Tensor]:
    return [p.detach().clone() for p in post.policy.module.parameters()]


@pytest.mark.parametrize("off_policy", [False, True])
def test_resume_with_a_held_batch_and_a_full_pool_is_bit_identical(off_policy, tmp_path):
    settings = {"steps": 60, "batch_size": 16, "seed": 3, "progress": False, "eval_samples": 64,
                "updates_per_batch": 3, "replay_size": 40, "off_policy": off_policy,
                "proposal_update_interval": 8}
    target = toy_a_target(1.0)
    reference = DPG(**settings).fit(target)
    # Checkpoints at step 25: mid-cycle (25 = 3·8 + 1), the pool full (9 batches of 8 fresh).
    DPG(**{**settings, "steps": 25}, checkpoint_dir=str(tmp_path), checkpoint_every=25).fit(target)
    saved = torch.load(next(tmp_path.glob("checkpoint-*")) / "engine-0.pt", weights_only=False)
    assert len(saved["dpg"]["pool"]["draws"]["None"]) == 40
    assert saved["dpg"]["held"][0][0].updates == 1
    resumed = DPG(**settings, checkpoint_dir=str(tmp_path), checkpoint_every=25).fit(target)
    for a, b in zip(parameters(reference), parameters(resumed)):
        assert torch.equal(a, b)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in reference.history]
    assert resumed.extras["samples_drawn"] == reference.extras["samples_drawn"] == 20 * 8


def test_a_pool_larger_than_memory_is_refused_saying_what_it_needs():
    with pytest.raises(ConfigError, match=r"replay_size=10000000000000 needs .*TiB for "
                                          r"10000000000000 draws × 1 context\(s\) of up to 3 "
                                          r"tokens \(59 bytes each\), but only .* of memory is "
                                          "available; lower replay_size to at most"):
        DPG(replay_size=10**13, steps=2, progress=False).fit(toy_a_target(1.0))
    assert bytes_per_draw(32) == 32 * 9 + 32
    require_pool_fits(1000, 2, 32, available=2 * 1000 * bytes_per_draw(32))  # fits exactly
    with pytest.raises(ConfigError, match=r"replay_size=1000 needs 625.0 KiB"):
        require_pool_fits(1000, 2, 32, available=2 * 1000 * bytes_per_draw(32) - 1)


@pytest.mark.parametrize("options,message", [
    ({"updates_per_batch": 0}, "updates_per_batch must be an integer >= 1, got 0"),
    ({"updates_per_batch": 1.5}, "updates_per_batch must be an integer >= 1, got 1.5"),
    ({"ratio_clip": 0.0}, "ratio_clip must be > 0, got 0.0"),
    ({"replay_size": 0}, r"replay_size must be an integer >= 1 \(or None for no replay pool\), "
                         "got 0"),
    ({"replay_size": -5}, "replay_size must be an integer >= 1"),
    ({"replay_size": 10, "replay_fraction": 1.0}, r"replay_fraction must be in \(0, 1\), got 1.0"),
])
def test_bad_reuse_options_name_the_option(options, message):
    with pytest.raises(ConfigError, match=message):
        DPG(**options)
