"""PPO with a value head and GAE (KLRL(algorithm="ppo", advantage="gae")): GAE against a
hand-worked example, the per-token rewards of KL-regularised RL, convergence to the exact
posterior on tabular worlds, the value head's fixed point log Z(s_t), bit-identical resume."""

import math
import warnings

import pyro
import pytest
import torch
from conftest import has_two_target, toy_a_target
from safetensors.torch import load_file
from test_policy_engines import random_world

import bayesalign as ba
from bayesalign.diagnostics import kl
from bayesalign.errors import ConfigError, DivergenceWarning
from bayesalign.inference import KLRL, Exact
from bayesalign.inference.value_head import (
    HiddenStateValue,
    clipped_value_loss,
    gae,
    token_rewards,
    value_head_for,
)
from bayesalign.models.tiny import tiny_causal_lm

GAE = {"algorithm": "ppo", "advantage": "gae", "batch_size": 64, "seed": 0, "progress": False}


def test_gae_matches_a_hand_worked_example():
    # γ = 0.9, λ = 0.8 (γλ = 0.72). Row 1, three tokens: δ = (0.08, 0.07, 0.7), so
    # A₂ = 0.7, A₁ = 0.07 + 0.72·0.7 = 0.574, A₀ = 0.08 + 0.72·0.574 = 0.49328.
    # Row 2 ends after two tokens (its third value, 9, is never read): δ = (0.55, 1.5),
    # A₁ = 1.5, A₀ = 0.55 + 0.72·1.5 = 1.63.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    expected = torch.tensor([[0.49328, 0.574, 0.7], [1.63, 1.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(returns, torch.tensor([[0.59328, 0.774, 1.0], [2.03, 2.0, 0.0]],
                                                     dtype=torch.float64), rtol=0, atol=1e-12)


def test_gae_at_lambda_one_is_the_monte_carlo_return_minus_the_value():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 7, generator=g, dtype=torch.float64)
    values = torch.randn(5, 7, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 1, 4, 0, 6])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    rewards = torch.where(mask, rewards, 0.0)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = rewards.flip(-1).cumsum(-1).flip(-1)  # G_t = Σ_{k≥t} r_k
    torch.testing.assert_close(advantages, torch.where(mask, to_go - values, 0.0), rtol=0,
                               atol=1e-12)
    torch.testing.assert_close(returns, to_go, rtol=0, atol=1e-12)
    # λ = 0: one-step TD errors δ_t = r_t + γV_{t+1} − V_t (V = 0 past the end).
    td, _ = gae(rewards, values, mask, gamma=0.5, lam=0.0)
    following = torch.where(torch.roll(mask, -1, -1) & mask, torch.roll(values, -1, -1), 0.0)
    following[:, -1] = 0.0
    torch.testing.assert_close(td, torch.where(mask, rewards + 0.5 * following - values, 0.0),
                               rtol=0, atol=1e-12)


def test_token_rewards_sum_to_the_penalised_sequence_reward():
    task = torch.tensor([1.5, -30.0, 0.25], dtype=torch.float64)
    log_ratio = torch.tensor([[0.1, -0.2, 0.3], [0.4, 0.0, 0.0], [0.0, 0.0, 0.0]],
                             dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    rewards = token_rewards(task, log_ratio, mask, kl_scale=2.0)
    expected = torch.tensor([[-0.2, 0.4, -0.6 + 1.5], [-0.8 - 30.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
                            dtype=torch.float64)
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-12)
    # With k1 the per-token rewards add up to log L − c(log π − log a), RLOO's reward.
    torch.testing.assert_close(rewards[:2].sum(-1), task[:2] - 2.0 * log_ratio[:2].sum(-1))


def test_clipped_value_loss():
    new, old, returns = (torch.tensor([[1.0, 0.5]], dtype=torch.float64),
                         torch.tensor([[0.0, 0.4]], dtype=torch.float64),
                         torch.tensor([[2.0, 0.0]], dtype=torch.float64))
    mask = torch.tensor([[True, True]])
    # Token 0: V moved 1 > ε = 0.2, max((1 − 2)², (0.2 − 2)²) = 3.24; token 1: within ε, 0.25.
    assert float(clipped_value_loss(new, old, returns, mask, 0.2)) == pytest.approx(
        0.5 * (3.24 + 0.25) / 2, abs=1e-12)
    assert float(clipped_value_loss(new, old, returns, mask, None)) == pytest.approx(
        0.5 * (1.0 + 0.25) / 2, abs=1e-12)


@pytest.mark.parametrize("world", ["toy_a", "random_2"])
def test_ppo_with_gae_reaches_the_exact_posterior(world):
    target = toy_a_target(1.0) if world == "toy_a" else random_world(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        post = KLRL(steps=600, **GAE).fit(target)
    exact = Exact().fit(target)
    support = exact.samples
    kl_exact = kl(exact.log_prob(support), post.log_prob(support).detach())
    assert post.diagnostics.exact
    assert post.diagnostics.kl_target_policy == pytest.approx(kl_exact, abs=1e-12)
    assert kl_exact < 0.02  # the tolerance test_policy_engines gives PPO
    assert kl_exact < kl(exact.log_prob(support), support.log_q) / 20
    assert post.diagnostics.elbo <= exact.log_z + 1e-12
    assert exact.log_z - post.diagnostics.elbo < 0.01


def test_ppo_with_gae_and_a_hard_constraint():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        post = KLRL(steps=800, **GAE).fit(has_two_target())
    assert all(math.isfinite(row["loss"]) for row in post.history)
    assert post.diagnostics.kl_target_policy < 0.02
    assert post.diagnostics.moments["has_two"][0] > 0.99


def test_the_value_head_learns_the_soft_values_log_z_of_each_prefix(tmp_path):
    """At π = p, k1's penalised return from s_t is log Z(s_t) = log Σ a(y_≥t | s_t) L(y) on
    every draw, so the value table's fixed point is known exactly: log Z at the root, and
    log Z(x₁) = logsumexp over the y starting with x₁ of log a(y) + log L(y) − log a(x₁)."""
    target = toy_a_target(1.0)
    KLRL(steps=1000, checkpoint_dir=str(tmp_path), **GAE).fit(target)
    final = sorted(tmp_path.glob("checkpoint-*"))[-1]
    weights = load_file(str(final / "policy.safetensors"))
    exact = Exact().fit(target)
    support = exact.samples
    log_score = target.log_score(support).double()
    first = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    soft = torch.stack([torch.logsumexp(log_score[support.tokens[:, 0] == x] - first[x], 0)
                        for x in range(3)])
    assert float(weights["value.tables.0"][0]) == pytest.approx(exact.log_z, abs=0.02)
    torch.testing.assert_close(weights["value.tables.1"], soft, rtol=0, atol=0.05)


def test_resume_with_the_value_head_is_bit_identical(tmp_path):
    target = toy_a_target(1.0)
    settings = {**GAE, "steps": 200, "batch_size": 32, "seed": 3, "ppo_epochs": 3,
                "checkpoint_every": 50}
    reference = KLRL(**settings, checkpoint_dir=str(tmp_path / "whole")).fit(target)
    KLRL(**{**settings, "steps": 110}, checkpoint_dir=str(tmp_path / "split")).fit(target)
    resumed = KLRL(**settings, checkpoint_dir=str(tmp_path / "split")).fit(target)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in reference.history]
    assert [r["value_loss"] for r in resumed.history] == [r["value_loss"] for r in
                                                          reference.history]
    whole = load_file(str(tmp_path / "whole" / "checkpoint-00000200" / "policy.safetensors"))
    split = load_file(str(tmp_path / "split" / "checkpoint-00000200" / "policy.safetensors"))
    assert any(name.startswith("value.") for name in whole) and whole.keys() == split.keys()
    for name in whole:
        assert torch.equal(whole[name], split[name]), name


def test_the_hidden_state_head_reads_the_policy_forward():
    policy = tiny_causal_lm(seed=0, max_new_tokens=6).trainable_copy()
    head = value_head_for(policy)
    assert isinstance(head, HiddenStateValue)
    with torch.no_grad():
        head.linear.weight.normal_()
        head.linear.bias.fill_(0.5)
    torch.manual_seed(0)
    y = policy.sample_batch(8)
    log_probs, values = head.score(policy, y)
    torch.testing.assert_close(log_probs, policy.token_log_probs(y))
    # The same values from transformers' own hidden states: the context (BOS) then y_<t.
    context_ids, attention = policy._encode_contexts(policy._contexts(len(y)))
    ids = torch.cat([context_ids, y.tokens[:, :-1]], 1)
    out = policy.module(input_ids=ids, attention_mask=torch.cat(
        [attention, torch.ones_like(y.tokens[:, :-1])], 1), output_hidden_states=True)
    hidden = out.hidden_states[-1][:, -y.tokens.shape[1]:]
    expected = torch.where(y.mask, head.linear(hidden).squeeze(-1).double(), 0.0)
    torch.testing.assert_close(values, expected.detach(), rtol=1e-5, atol=1e-5)
    # The critic is detached: its loss trains the head, never the policy's weights.
    grads = torch.autograd.grad(values.sum(), [*policy.module.parameters(), head.linear.weight],
                                allow_unused=True)
    assert all(g is None for g in grads[:-1]) and grads[-1] is not None


def test_ppo_with_gae_trains_a_causal_lm_policy():
    prior = tiny_causal_lm(seed=1, initializer_range=0.3, max_new_tokens=8)

    @ba.target
    def short():
        y = pyro.sample("y", prior)
        ba.reward("short", -y.mask.sum(-1).double(), kl_coef=1.0)

    post = KLRL(algorithm="ppo", advantage="gae", steps=12, batch_size=16, ppo_epochs=2,
                learning_rate=1e-3, value_learning_rate=1e-2, eval_samples=64,
                progress=False).fit(short)
    losses = [row["value_loss"] for row in post.history]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]  # the head learns the returns
    assert post.config["advantage"] == "gae"


@pytest.mark.parametrize("options, named", [
    ({"advantage": "td"}, "advantage"),
    ({"algorithm": "rloo", "advantage": "gae"}, "advantage='gae' is for algorithm='ppo'"),
    ({"advantage": "gae", "kl_placement": "loss", "kl_estimator": "k2"}, "kl_placement"),
    ({"gae_lambda": 1.5}, "gae_lambda"),
    ({"gae_lambda": -0.1}, "gae_lambda"),
    ({"gamma": 0.0}, "gamma"),
    ({"gamma": 1.01}, "gamma"),
    ({"value_coef": 0.0}, "value_coef"),
    ({"value_clip": -0.2}, "value_clip"),
    ({"value_learning_rate": 0.0}, "value_learning_rate"),
])
def test_bad_gae_options_are_named(options, named):
    with pytest.raises(ConfigError, match=named):
        KLRL(**{"algorithm": "ppo", **options})


def test_a_policy_with_no_value_head_is_refused():
    from bayesalign.distribution import SequenceDistribution
    from bayesalign.models import TabularLM

    # An enumerable policy whose prefix table (Σ_t 40^t, t < 6: ~1e8 values) is too large.
    wide = TabularLM(torch.full((40,), 1 / 40, dtype=torch.float64),
                     torch.full((40, 40), 1 / 40, dtype=torch.float64), 6)
    with pytest.raises(ConfigError, match="value table for TabularLM needs 105025641 entries"):
        value_head_for(wide)

    class Opaque(SequenceDistribution):  # neither hidden states nor an enumerable support
        module = torch.nn.Linear(1, 1)

    with pytest.raises(ConfigError, match="Opaque has neither hidden states"):
        value_head_for(Opaque())
