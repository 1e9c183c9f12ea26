"""Preference models (SPEC §7): losses, padding, comparison data, objectives, PMP, use in a target."""

from __future__ import annotations

import math
import random

import pyro
import pytest
import torch

import bayesalign as ba
from bayesalign.errors import ConfigError
from bayesalign.inference import Importance
from bayesalign.models import comparisons
from bayesalign.models.causal_lm import CausalLM
from bayesalign.models.comparisons import Comparisons, build_comparisons
from bayesalign.models.preference import (
    PreferenceModel,
    binary_loss,
    imitation_loss,
    pairwise_accuracy,
    pmp,
    ranked_loss,
    train_preference_model,
)
from bayesalign.models.tiny import stdlib_tokenizer, tiny_causal_lm, tiny_gpt2
from bayesalign.sequences import Sequences

WORDS = "alpha beta gamma delta epsilon zeta theta kappa sigma omega".split()
TEXTS = ["x = 1", "def f(a, b):\n    return a+b\n", "import os", "", "class A:\n    pass"]


def length(texts) -> torch.Tensor:
    return torch.tensor([float(len(t)) for t in texts])


def marker_texts(n: int, seed: int) -> list[str]:
    """Random word strings; every other one holds the marker word ``yes`` somewhere."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
        if i % 2 == 0:
            words.insert(rng.randrange(len(words) + 1), "yes")
        texts.append(" ".join(words))
    return texts


def has_marker(texts) -> torch.Tensor:
    return torch.tensor([float("yes" in t.split()) for t in texts])


def new_pm(seed: int = 0, **kw) -> PreferenceModel:
    tokenizer = stdlib_tokenizer()
    return PreferenceModel(tiny_gpt2(tokenizer, seed=seed), tokenizer, seed=seed, **kw)


def test_losses_match_hand_computed_values():
    r_chosen, r_rejected = torch.tensor([1.0, 2.0]), torch.tensor([0.0, -1.0])

    def softplus_neg(x: float) -> float:  # −log σ(x) = log(1 + e^{−x})
        return math.log1p(math.exp(-x))

    # Ranked: −log σ(r_chosen − r_rejected) for margins 1 and 3.
    ranked = (softplus_neg(1.0) + softplus_neg(3.0)) / 2
    assert float(ranked_loss(r_chosen, r_rejected)) == pytest.approx(ranked)
    # Chosen: −log σ(1), −log σ(2); rejected: −log(1 − σ(r)) = −log σ(−r) for r = 0, −1.
    expected = (softplus_neg(1.0) + softplus_neg(2.0) + softplus_neg(0.0) + softplus_neg(1.0)) / 4
    assert float(binary_loss(r_chosen, r_rejected)) == pytest.approx(expected)
    log_probs = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert float(imitation_loss(log_probs, mask)) == pytest.approx(2.0)  # (1 + 2 + 3) / 3


def test_left_and_right_padding_give_the_same_rewards():
    right = new_pm(padding_side="right")
    left = PreferenceModel(right.backbone, right.tokenizer, padding_side="left")
    left.head.load_state_dict(right.head.state_dict())
    batched = right.score(TEXTS)
    assert batched.dtype == torch.float64 and batched.shape == (len(TEXTS),)
    torch.testing.assert_close(left.score(TEXTS), batched, atol=1e-5, rtol=0)
    one_by_one = torch.cat([right.score([t]) for t in TEXTS])
    torch.testing.assert_close(one_by_one, batched, atol=1e-5, rtol=0)
    with_context = right.score(["b", "b"], context=["a = 1\n", "x"])
    assert with_context[0] != with_context[1]


def test_ranked_model_learns_a_marker_preference():
    train = build_comparisons(marker_texts(300, seed=0), has_marker, 200, seed=0)
    test = build_comparisons(marker_texts(100, seed=1), has_marker, 200, seed=1)
    model, history = train_preference_model(
        new_pm(), train, "ranked", steps=30, batch_size=16, learning_rate=3e-3, seed=0
    )
    assert pairwise_accuracy(model, test) > 0.9
    assert history[-1]["loss"] < history[0]["loss"]
    assert {"step", "loss", "batch_accuracy", "reward_margin"} <= set(history[0])


def test_imitation_compares_by_log_likelihood_in_total_or_per_token():
    model = new_pm(scoring="log_likelihood")
    texts = ["x", "def f(a, b):\n    return a + b\n"]
    total = model.score(texts)
    # Independent reference: CausalLM's log-prob of the tokens + EOS after the start token.
    tokenizer = model.tokenizer
    rows = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    for row, value in zip(rows, total):
        expected = CausalLM(model.backbone, tokenizer).log_prob(Sequences(torch.tensor([row])))
        assert float(value) == pytest.approx(float(expected), abs=1e-6)
    model.normalise = "per_token"
    per_token = model.score(texts)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.float64)
    torch.testing.assert_close(per_token, total / lengths)
    assert not torch.allclose(per_token, total)
    # The short text wins in total (fewer tokens to pay for), not per token.
    assert total[0] > total[1]


def test_imitation_training_switches_scoring_and_needs_an_lm_head():
    pairs = build_comparisons(marker_texts(40, seed=0), has_marker, 20, seed=0)
    model, history = train_preference_model(new_pm(), pairs, "imitation", steps=2, batch_size=4)
    assert model.scoring == "log_likelihood" and len(history) == 2
    chosen, rejected = model.score(pairs.chosen), model.score(pairs.rejected)
    assert pairwise_accuracy(model, pairs) == pytest.approx(float((chosen > rejected).double().mean()))
    body = tiny_gpt2(stdlib_tokenizer()).transformer  # AutoModel-like: no LM head
    reward_only = PreferenceModel(body, stdlib_tokenizer())
    assert reward_only.score(["x = 1"]).shape == (1,)
    with pytest.raises(ConfigError, match="LM head"):
        train_preference_model(reward_only, pairs, "imitation", steps=1)


def test_label_noise_flips_the_expected_fraction():
    texts = [" " * n for n in range(300)]  # all scores distinct
    for noise in (0.0, 0.2):
        pairs = build_comparisons(texts, length, 4000, label_noise=noise, seed=3)
        flipped = float((length(pairs.chosen) < length(pairs.rejected)).double().mean())
        assert flipped == pytest.approx(noise, abs=0.025)  # 4 binomial standard deviations
        assert len({(c, r) for c, r in zip(pairs.chosen, pairs.rejected)}) == 4000  # no repeats


def test_comparisons_drop_ties_and_pair_within_a_context():
    texts = ["a", "b", "cc", "dd", "eee"]
    pairs = build_comparisons(texts, length, 8, seed=0)  # 10 pairs, 2 of them ties
    assert all(len(c) > len(r) for c, r in zip(pairs.chosen, pairs.rejected))
    with pytest.raises(ConfigError, match="only 8 untied pairs"):
        build_comparisons(texts, length, 9)
    values = Sequences(torch.tensor([[1], [2], [3], [4]]), context=["x", "x", "y", "y"],
                       decoder=lambda rows: [str(r[0]) for r in rows])
    by_token = build_comparisons(values, lambda y: y.tokens[:, 0].double(), 2, seed=0)
    assert sorted(zip(by_token.context, by_token.chosen, by_token.rejected)) == [
        ("x", "2", "1"), ("y", "4", "3")]


def test_sampled_pairs_on_large_corpora(monkeypatch):
    monkeypatch.setattr(comparisons, "_ENUMERATED_PAIRS", 0)
    texts = [str(i % 7) for i in range(50)]
    score = lambda ts: torch.tensor([float(t) for t in ts])  # noqa: E731
    pairs = build_comparisons(texts, score, 100, seed=1)
    assert all(float(c) > float(r) for c, r in zip(pairs.chosen, pairs.rejected))
    assert pairs == build_comparisons(texts, score, 100, seed=1)


def test_comparison_errors_name_the_problem():
    texts = ["x = 1", "y = 2", "z = 3"]
    with pytest.raises(ConfigError, match="tie"):
        build_comparisons(texts, lambda ts: torch.zeros(len(ts)), 1)
    with pytest.raises(ConfigError, match="single class"):
        build_comparisons(texts, lambda ts: torch.ones(len(ts), dtype=torch.bool), 1)
    for noise in (-0.1, 0.5, 0.7):
        with pytest.raises(ConfigError, match="label_noise"):
            build_comparisons(texts, length, 1, label_noise=noise)
    with pytest.raises(ConfigError, match="shape"):
        build_comparisons(texts, lambda ts: torch.zeros(2), 1)
    with pytest.raises(ConfigError, match="as many chosen"):
        Comparisons(["a"], [])
    with pytest.raises(ConfigError, match="objective"):
        train_preference_model(new_pm(), Comparisons(["a"], ["b"]), "pairwise")


def test_training_is_seeded_and_leaves_the_callers_rng_alone():
    pairs = build_comparisons(marker_texts(40, seed=0), has_marker, 30, seed=0)
    torch.manual_seed(123)
    expected_draw = torch.rand(1)
    torch.manual_seed(123)
    runs = [train_preference_model(new_pm(), pairs, "binary", steps=3, batch_size=8, seed=5)
            for _ in range(2)]
    assert torch.rand(1) == expected_draw
    assert runs[0][1] == runs[1][1]
    torch.testing.assert_close(runs[0][0].score(TEXTS), runs[1][0].score(TEXTS))


def test_pmp_is_pretraining_then_finetuning():
    large = build_comparisons(marker_texts(60, seed=0), has_marker, 50, label_noise=0.2, seed=0)
    small = build_comparisons(marker_texts(20, seed=1), has_marker, 10, seed=1)
    model, stages = pmp(new_pm(), large, small, "ranked", pretrain_objective="binary",
                        pretrain_steps=2, finetune_steps=2, batch_size=8, seed=0)
    assert [len(stages["pretrain"]), len(stages["finetune"])] == [2, 2]
    reference, _ = train_preference_model(new_pm(), large, "binary", steps=2, batch_size=8)
    reference, _ = train_preference_model(reference, small, "ranked", steps=2, batch_size=8)
    torch.testing.assert_close(model.score(TEXTS), reference.score(TEXTS))


def test_preference_model_as_a_factor_in_a_target():
    prior = tiny_causal_lm(seed=0, max_new_tokens=6)
    rm = PreferenceModel.from_causal_lm(prior, seed=1)
    kl_coef = 0.5

    @ba.target
    def preferred():
        y = pyro.sample("y", prior)
        pyro.factor("pm", rm(y) / kl_coef)

    posterior = Importance(num_samples=24, chunk_size=24, seed=0).fit(preferred)
    torch.testing.assert_close(posterior.log_weights, rm(posterior.samples) / kl_coef)
    assert posterior.diagnostics.ess > 1

    reference = ba.reference_reward(rm(prior.sample_batch(16)), 0.85)

    @ba.target
    def probably_good():
        y = pyro.sample("y", prior)
        ba.reward("good", ba.log_sigmoid_centered(rm(y), reference), kl_coef=kl_coef)

    log_w = Importance(num_samples=24, chunk_size=24, seed=0).fit(probably_good).log_weights
    assert torch.isfinite(log_w).all() and (log_w < 0).all()  # log σ(·) / β < 0
