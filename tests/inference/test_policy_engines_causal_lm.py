"""The policy engines on a transformers `CausalLM` policy: same code path as the exact worlds."""

import math

import pyro
import pytest
import torch

import bayesalign as ba
from bayesalign.inference import DPG, KLRL
from bayesalign.models.tiny import tiny_causal_lm


@pytest.fixture(scope="module")
def token_target():
    prior = tiny_causal_lm(seed=1, initializer_range=0.3, max_new_tokens=12)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        draws = prior.sample_batch(256)
    counts = torch.bincount(draws.tokens[draws.mask], minlength=prior.vocab_size)
    chosen = int(torch.argsort(counts, descending=True)[4])  # a common, not dominant, token

    @ba.target
    def more_of_one_token():
        y = pyro.sample("y", prior)
        share = ((y.tokens == chosen) & y.mask).sum(-1) / y.mask.sum(-1).clamp(min=1)
        ba.reward("share", share.double(), kl_coef=0.1)

    return more_of_one_token


def prior_share(target):
    prior = target.prior()
    with torch.random.fork_rng():
        torch.manual_seed(123)
        y = prior.sample_batch(1024)
    return float(target.factors(y)["share"].value.mean())


# DPG at lr 1e-3 runs away on this prior (KL(π‖a) 7–13 nats over seeds 0–2, the divergence
# warning fires, and whether the share ends above or below the prior's depends on the CPU's
# float rounding); at 3e-4 it ends at 0.035–0.054 with KL(π‖a) 0.6–0.8 on those seeds.
@pytest.mark.parametrize("engine", [
    lambda: DPG(steps=60, batch_size=32, learning_rate=3e-4, eval_samples=512, progress=False),
    lambda: KLRL(algorithm="rloo", steps=60, batch_size=32, learning_rate=1e-3,
                 eval_samples=512, progress=False),
    lambda: KLRL(algorithm="ppo", steps=60, batch_size=32, learning_rate=1e-3, ppo_epochs=2,
                 eval_samples=512, progress=False),
], ids=["dpg", "rloo", "ppo"])
def test_reward_rises_and_kl_stays_finite(token_target, engine):
    post = engine().fit(token_target)
    before = prior_share(token_target)
    after = post.diagnostics.rewards["share"]
    # The prior's share is ~0.022 ± 0.002 (512 draws); the target's is far higher.
    assert after > before + 0.008, (before, after)
    assert not post.diagnostics.exact
    assert math.isfinite(post.diagnostics.kl_policy_prior) and post.diagnostics.kl_policy_prior >= -0.05
    assert math.isfinite(post.diagnostics.log_z)
    assert all(math.isfinite(row["loss"]) for row in post.history)
    # The prior is untouched: the policy is a trainable copy.
    assert post.policy.module is not token_target.prior().module
    assert post.sample(4).text  # decodes
