"""Reward models from transformers: a tiny classifier trained here, loaded by path, as a factor."""

from __future__ import annotations

import json
import random

import pyro
import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

import bayesalign as ba
from bayesalign.errors import ConfigError
from bayesalign.inference import Importance
from bayesalign.models import SequenceClassifierReward
from bayesalign.models.comparisons import build_comparisons
from bayesalign.models.preference import PreferenceModel, train_preference_model
from bayesalign.models.tiny import stdlib_tokenizer, tiny_causal_lm, tiny_gpt2
from bayesalign.seeding import seeded
from bayesalign.sequences import Sequences

NAMES = "alpha beta total count value item".split()
LABELS = {0: "plain", 1: "code"}


def toy_texts(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Short strings; every other one is a ``def`` line (label 1), the rest assignments (0)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        name, arg = rng.choice(NAMES), rng.choice(NAMES)
        texts.append(f"def {name}({arg}):" if i % 2 else f"{name} = {arg}")
        labels.append(i % 2)
    return texts, labels


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to 1e-5: float32 forward passes over batches padded differently."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def encode(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    return tokenizer(texts, padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory) -> str:
    """A 1-layer GPT-2 classifier trained 40 steps to tell ``def`` lines from assignments."""
    tokenizer = stdlib_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=2,
        id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    with seeded(0):
        model = GPT2ForSequenceClassification(config)
    texts, labels = toy_texts(64, seed=0)
    batch, target = encode(tokenizer, texts), torch.tensor(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("classifier") / "def-classifier"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def direct_logits(path: str, texts: list[str]) -> torch.Tensor:
    """The classifier called by hand, one text at a time (no padding to get wrong)."""
    model = GPT2ForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
    tokenizer = stdlib_tokenizer()
    with torch.no_grad():
        return torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in texts]).double()


def test_a_trained_classifier_loaded_by_path_scores_what_it_learned(classifier_path):
    rm = SequenceClassifierReward.from_pretrained(classifier_path, label="code")
    texts, labels = toy_texts(40, seed=1)  # held out
    scores = rm(texts)
    assert scores.dtype == torch.float64 and scores.shape == (40,) and not scores.requires_grad
    is_code = torch.tensor(labels, dtype=torch.bool)
    assert scores[is_code].min() > scores[~is_code].max()  # every def line above every assignment
    close(scores, direct_logits(classifier_path, texts)[:, 1])
    # Label by index is the same label; the other label is another column.
    by_index = SequenceClassifierReward.from_pretrained(classifier_path, label=1)
    torch.testing.assert_close(by_index(texts), scores)
    plain = SequenceClassifierReward.from_pretrained(classifier_path, label="plain")(texts)
    assert (plain[is_code] < scores[is_code]).all()


def test_log_prob_batches_and_sequences_input(classifier_path):
    texts, _ = toy_texts(7, seed=2)
    logits = direct_logits(classifier_path, texts)
    load = SequenceClassifierReward.from_pretrained
    rm = load(classifier_path, label="code", score="log_prob", batch_size=3)
    close(rm(texts), torch.log_softmax(logits, -1)[:, 1])
    assert (rm(texts) < 0).all()
    one = load(classifier_path, label="code", score="log_prob", batch_size=1)
    close(one(texts), rm(texts))  # padding in a batch changes nothing
    tokenizer = stdlib_tokenizer()
    encoded = encode(tokenizer, texts)
    y = Sequences(encoded["input_ids"], encoded["attention_mask"].bool(), decoder=tokenizer.batch_decode)
    torch.testing.assert_close(rm(y), rm(texts))
    assert rm([]).shape == (0,)
    torch.testing.assert_close(rm.score(texts), rm(texts))  # the PreferenceModel spelling


def test_a_loaded_model_and_a_tokenizer_object(classifier_path):
    model = GPT2ForSequenceClassification.from_pretrained(classifier_path, local_files_only=True)
    rm = SequenceClassifierReward.from_pretrained(model, stdlib_tokenizer(), label="code")
    texts, _ = toy_texts(5, seed=3)
    close(rm(texts), direct_logits(classifier_path, texts)[:, 1])
    model.train()
    rm(texts)
    assert model.training  # scored in eval mode, handed back as it came
    wide = SequenceClassifierReward.from_pretrained(classifier_path, label="code", dtype=torch.float64,
                                                    device="cpu")
    assert next(wide.model.parameters()).dtype == torch.float64
    close(wide(texts), rm(texts))
    with pytest.raises(ConfigError, match="needs tokenizer="):
        SequenceClassifierReward.from_pretrained(model)


def test_classifier_reward_in_a_target_under_importance(classifier_path):
    prior = tiny_causal_lm(seed=0, max_new_tokens=6)
    rm = SequenceClassifierReward.from_pretrained(classifier_path, label="code", batch_size=5)
    kl_coef = 4.0

    @ba.target
    def code_like():
        y = pyro.sample("y", prior)
        ba.reward("code", rm(y), kl_coef=kl_coef)

    posterior = Importance(num_samples=24, chunk_size=24, seed=0).fit(code_like)
    texts = posterior.samples.text
    # Empty samples have no tokens for a GPT-2 tokenizer without special tokens; none here.
    assert all(texts)
    expected = direct_logits(classifier_path, texts)[:, 1] / kl_coef
    close(posterior.log_weights, expected)


def test_bad_paths_and_labels_are_named(classifier_path, tmp_path):
    lm_path = tmp_path / "causal-lm"
    tiny_gpt2(stdlib_tokenizer()).save_pretrained(lm_path)
    stdlib_tokenizer().save_pretrained(lm_path)
    with pytest.raises(ConfigError, match=r"causal-lm.*GPT2LMHeadModel, not a sequence classifier"):
        SequenceClassifierReward.from_pretrained(lm_path)
    config = json.loads((lm_path / "config.json").read_text())
    del config["architectures"]  # now only the missing head weights say it is no classifier
    (lm_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"causal-lm.*weights missing.*score.weight"):
        SequenceClassifierReward.from_pretrained(lm_path)
    with pytest.raises(ConfigError, match=r"nowhere.*not a transformers model folder"):
        SequenceClassifierReward.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"no label 'toxic'; its labels are \{0: 'plain', 1: 'code'\}"):
        SequenceClassifierReward.from_pretrained(classifier_path, label="toxic")
    with pytest.raises(ConfigError, match=r"def-classifier' has no label 2"):
        SequenceClassifierReward.from_pretrained(classifier_path, label=2)
    with pytest.raises(ConfigError, match="score must be one of"):
        SequenceClassifierReward.from_pretrained(classifier_path, score="prob")
    with pytest.raises(ConfigError, match="GPT2LMHeadModel is not a sequence classifier"):
        SequenceClassifierReward(tiny_gpt2(stdlib_tokenizer()), stdlib_tokenizer())
    with pytest.raises(ConfigError, match="encodes to no tokens"):
        SequenceClassifierReward.from_pretrained(classifier_path)([""])


def trained_pm() -> PreferenceModel:
    tokenizer = stdlib_tokenizer()
    pm = PreferenceModel(tiny_gpt2(tokenizer, seed=0), tokenizer, seed=0)
    texts, _ = toy_texts(32, seed=4)
    comparisons = build_comparisons(texts, lambda t: torch.tensor([float("def" in s) for s in t]), 32)
    pm, _ = train_preference_model(pm, comparisons, "ranked", steps=3, batch_size=8)
    return pm


def test_a_saved_preference_model_is_a_reward_by_path(tmp_path):
    pm = trained_pm()
    with torch.no_grad():  # the ranked loss leaves the bias where it starts, at 0; it must travel too
        pm.head.bias.fill_(0.25)
    pm.save_pretrained(tmp_path / "pm")
    rm = SequenceClassifierReward.from_pretrained(tmp_path / "pm", label="reward", batch_size=3)
    texts = ["x = 1", "def f(a, b):\n    return a+b\n", "import os", "", "class A:\n    pass"]
    close(rm(texts), pm.score(texts))
    too_long = ["x = 1\n" * 150, "import os"]  # over 256 tokens: both keep the start and EOS
    assert len(pm.tokenizer(too_long[0])["input_ids"]) > pm.max_length
    close(rm(too_long), pm.score(too_long))
    contexts = ["# a", None, "# b", "# a", None]
    close(rm(texts, contexts), pm.score(texts, contexts))
    prior = tiny_causal_lm(seed=0, max_new_tokens=6)
    y = prior.sample_batch(8)
    close(rm(y), pm(y))


def test_a_preference_model_scoring_by_likelihood_does_not_save_as_a_classifier(tmp_path):
    tokenizer = stdlib_tokenizer()
    pm = PreferenceModel(tiny_gpt2(tokenizer), tokenizer, scoring="log_likelihood")
    with pytest.raises(ConfigError, match="log-likelihood"):
        pm.save_pretrained(tmp_path / "pm")
