"""`CausalLM`: cached log q equals one-pass log_prob, padding and EOS handling, loading."""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from types import SimpleNamespace

import pyro
import pytest
import torch
from transformers import GPT2LMHeadModel

from bayesalign.errors import ConfigError, VocabularyMismatchError
from bayesalign.models.adaptors import BanTokens
from bayesalign.models.causal_lm import CausalLM, draw
from bayesalign.models.tiny import stdlib_tokenizer, tiny_causal_lm, tiny_gpt2
from bayesalign.sequences import Sequences

PROMPTS = ["def f(x):", "import os\nimport sys\n\n", "x", "class Foo(object):\n    pass"]


@pytest.fixture(scope="module")
def lm() -> CausalLM:
    # A wide initialisation gives peaky next-token laws (entropy ≈ 4 nats of 6.2), so the
    # adaptors remove real mass instead of acting on a near-uniform distribution.
    return tiny_causal_lm(seed=0, initializer_range=0.3, max_new_tokens=12)


@contextmanager
def eos_probability(lm: CausalLM, p: float):
    """Make the model's EOS probability exactly ``p`` at every step (0 forbids EOS)."""
    eos = lm.eos_token_id

    def set_eos_logit(module, args, logits):
        others = logits.clone()
        others[..., eos] = float("-inf")
        logits = logits.clone()
        logits[..., eos] = others.logsumexp(-1) + math.log(p) - math.log1p(-p) if p else -math.inf
        return logits

    handle = lm.model.lm_head.register_forward_hook(set_eos_logit)
    try:
        yield
    finally:
        handle.remove()


ADAPTORS = {
    "none": {},
    "temperature": {"temperature": 0.7},
    "top_k": {"top_k": 5},
    "top_p": {"top_p": 0.9},
    "typical": {"typical_p": 0.9},
    "eta": {"eta": 0.01},
    "chain": {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "eta": 0.001},
}


@pytest.mark.parametrize("name", list(ADAPTORS))
def test_sampled_log_q_equals_log_prob(lm: CausalLM, name: str) -> None:
    torch.manual_seed(1)
    proposal = lm.adapted(**ADAPTORS[name]).given(PROMPTS)
    with eos_probability(lm, 0.15):
        samples = proposal.sample_batch(16)
        log_prob = proposal.log_prob(samples)
    assert samples.log_q.dtype in (torch.float32, torch.float64)
    assert torch.isfinite(samples.log_q).all()
    torch.testing.assert_close(log_prob, samples.log_q, atol=1e-4, rtol=0)


def test_adapted_keeps_token_bans(lm: CausalLM) -> None:
    banned = CausalLM(lm.model, lm.tokenizer, max_new_tokens=12,
                      adaptors=(BanTokens((lm.eos_token_id,)),))
    hot = banned.adapted(temperature=2.0, top_k=50)
    assert isinstance(hot.adaptors[0], BanTokens) and len(hot.adaptors) == 3
    torch.manual_seed(0)
    assert not (hot.sample_batch(32).tokens == lm.eos_token_id).any()


def test_adaptor_changes_the_law(lm: CausalLM) -> None:
    torch.manual_seed(2)
    samples = lm.adapted(top_k=5).sample_batch(8)
    unadapted = lm.log_prob(samples)
    assert (unadapted < samples.log_q - 1e-3).all()
    assert torch.isfinite(unadapted).all()
    # The un-adapted prior's samples mostly fall outside the top-5 support.
    prior_samples = lm.sample_batch(8)
    assert torch.isinf(lm.adapted(top_k=5).log_prob(prior_samples)).any()


def test_samples_follow_their_log_q(lm: CausalLM) -> None:
    """Empirical next-token frequencies match exp(log q): log q describes the sampler."""
    torch.manual_seed(3)
    one_step = CausalLM(lm.model, lm.tokenizer, max_new_tokens=1, prompt="def f(x):")
    one_step = one_step.adapted(top_k=4)
    samples = one_step.sample_batch(4000)
    tokens, inverse = samples.tokens[:, 0].unique(return_inverse=True)
    assert len(tokens) == 4
    first = torch.stack([(inverse == i).nonzero()[0, 0] for i in range(len(tokens))])
    expected = samples.log_q[first].exp()
    observed = torch.bincount(inverse).double() / len(samples)
    torch.testing.assert_close(expected.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(observed, expected, atol=0.03, rtol=0)


def test_padded_batch_matches_single_unpadded_rows(lm: CausalLM) -> None:
    torch.manual_seed(4)
    batched = lm.given(PROMPTS)
    with eos_probability(lm, 0.15):
        samples = batched.sample_batch(8)
        lengths = samples.lengths
        assert lengths.min() < samples.tokens.shape[1], "some row should stop at EOS"
        batch_log_prob = batched.log_prob(samples)
        single = []
        for i in range(len(samples)):
            row = Sequences(tokens=samples.tokens[i : i + 1, : int(lengths[i])])
            single.append(lm.given(samples.context[i]).log_prob(row))
    single = torch.cat(single)
    torch.testing.assert_close(single, samples.log_q, atol=1e-4, rtol=0)
    torch.testing.assert_close(batch_log_prob, single, atol=1e-4, rtol=0)
    assert samples.context == [p for p in PROMPTS for _ in range(2)]



class PastKeyValuesLM(torch.nn.Module):
    """The same GPT-2 behind a forward that calls its KV cache ``past_key_values`` and keeps
    every position's logits, as transformers < 5 and remote-code models do."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.config = model, model.config

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None,
                use_cache=False):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=past_key_values, use_cache=use_cache)
        return SimpleNamespace(logits=out.logits, past_key_values=out.cache)


@pytest.mark.skipif(
    "cache" not in inspect.signature(GPT2LMHeadModel.forward).parameters,
    reason="this transformers (< 5) calls GPT-2's cache past_key_values: every test covers that",
)
def test_a_model_naming_its_cache_past_key_values_samples_the_same(lm: CausalLM) -> None:
    legacy = CausalLM(PastKeyValuesLM(lm.model), lm.tokenizer, max_new_tokens=lm.max_new_tokens)
    assert (lm._cache_name, legacy._cache_name) == ("cache", "past_key_values")
    draws = []
    for prior in (lm, legacy):
        proposal = prior.given(PROMPTS).adapted(top_p=0.9)
        torch.manual_seed(14)
        with eos_probability(lm, 0.15):
            draws.append(proposal.sample_batch(8))
            # The cache was carried between steps: log q equals one pass over all the logits.
            torch.testing.assert_close(proposal.log_prob(draws[-1]), draws[-1].log_q,
                                       atol=1e-4, rtol=0)
    cached, legacy_cached = draws
    assert cached.lengths.min() < cached.tokens.shape[1], "some row should stop at EOS"
    assert torch.equal(legacy_cached.tokens, cached.tokens)
    assert torch.equal(legacy_cached.log_q, cached.log_q)


def test_text_leaves_out_hidden_tokens_and_the_closing_eos(lm: CausalLM) -> None:
    torch.manual_seed(15)
    with eos_probability(lm, 0.3):
        plain = lm.sample_batch(8)
    longest = int(plain.lengths.argmax())
    hidden = int(plain.tokens[longest, 0])
    assert hidden != lm.eos_token_id
    tagged_lm = CausalLM(lm.model, lm.tokenizer, max_new_tokens=lm.max_new_tokens,
                         hidden_tokens=(hidden,))
    torch.manual_seed(15)
    with eos_probability(lm, 0.3):
        tagged = tagged_lm.sample_batch(8)
    # Hidden tokens are sampled and scored like any other: the draws are the same.
    assert torch.equal(tagged.tokens, plain.tokens) and torch.equal(tagged.log_q, plain.log_q)
    rows = plain.token_lists()
    assert any(r[-1] == lm.eos_token_id for r in rows), "some row should end with EOS"
    visible = [[t for t in (r[:-1] if r[-1] == lm.eos_token_id else r) if t != hidden]
               for r in rows]
    assert tagged.text == lm.tokenizer.batch_decode(visible)
    assert tagged.text[longest] != plain.text[longest]

def test_context_in_value_overrides_prompt(lm: CausalLM) -> None:
    torch.manual_seed(5)
    samples = lm.given("def f(x):").sample_batch(3)
    torch.testing.assert_close(lm.log_prob(samples), samples.log_q, atol=1e-4, rtol=0)
    bare = Sequences(tokens=samples.tokens, mask=samples.mask)
    assert not torch.allclose(lm.log_prob(bare), samples.log_q)


def test_unconditional_samples_have_no_context(lm: CausalLM) -> None:
    torch.manual_seed(6)
    samples = lm.sample_batch(5)
    assert samples.context is None
    assert samples.tokens.shape == (5, lm.max_new_tokens)
    assert len(samples.text) == 5


def test_nothing_after_eos_inside_mask(lm: CausalLM) -> None:
    torch.manual_seed(7)
    with eos_probability(lm, 0.6):
        samples = lm.sample_batch(64)
    eos = lm.eos_token_id
    is_eos = samples.tokens == eos
    assert is_eos.any(dim=1).all(), "P(EOS) = 0.6 per step should end every row within 12 steps"
    assert samples.tokens.shape[1] < lm.max_new_tokens, "the loop stops once all rows end"
    first_eos = is_eos.long().argmax(dim=1)
    positions = torch.arange(samples.tokens.shape[1])
    torch.testing.assert_close(samples.mask, positions[None] <= first_eos[:, None])
    # pad == EOS here: a mask built by `tokens != pad` would drop the EOS itself.
    assert lm.pad_token_id == eos
    after = positions[None] > first_eos[:, None]
    assert (samples.tokens[after] == lm.pad_token_id).all()
    assert (samples.tokens[samples.mask] == eos).sum() == len(samples)
    assert all(not t.endswith("<|endoftext|>") for t in samples.text)


def test_sample_without_eos_has_full_length(lm: CausalLM) -> None:
    torch.manual_seed(8)
    with eos_probability(lm, 0.0):
        samples = lm.sample_batch(4)
    assert samples.tokens.shape == (4, lm.max_new_tokens)
    assert samples.mask.all()
    assert (samples.lengths == lm.max_new_tokens).all()


def test_truncated_prefix_is_scored_as_prefix(lm: CausalLM) -> None:
    torch.manual_seed(9)
    with eos_probability(lm, 0.0):
        samples = lm.sample_batch(2)
    prefix = Sequences(tokens=samples.tokens[:, :5])
    full = lm.log_prob(samples)
    assert (lm.log_prob(prefix) > full).all()


def test_prompts_must_divide_the_batch(lm: CausalLM) -> None:
    with pytest.raises(ConfigError, match="multiple"):
        lm.given(PROMPTS).sample_batch(6)
    with pytest.raises(ConfigError):
        lm.given([])


def test_too_long_for_the_positions(lm: CausalLM) -> None:
    with pytest.raises(ConfigError, match="max_new_tokens"):
        CausalLM(lm.model, lm.tokenizer, max_new_tokens=300).sample_batch(1)


def test_gradient_variant(lm: CausalLM) -> None:
    torch.manual_seed(10)
    samples = lm.given("x = ").sample_batch(4)
    log_probs = lm.given("x = ").token_log_probs(samples).sum(-1)
    assert log_probs.requires_grad
    log_probs.sum().backward()
    grad = lm.model.transformer.h[0].attn.c_attn.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    lm.model.zero_grad(set_to_none=True)
    assert not lm.log_prob(samples).requires_grad


def test_bf16_model_scores_in_float32() -> None:
    lm = tiny_causal_lm(seed=1, initializer_range=0.3, max_new_tokens=8)
    lm.model.to(torch.bfloat16)
    torch.manual_seed(11)
    samples = lm.sample_batch(4)
    assert samples.log_q.dtype == torch.float64
    # Cached and one-pass bf16 activations differ by rounding; only loosely equal.
    torch.testing.assert_close(lm.log_prob(samples), samples.log_q, atol=0.5, rtol=0)


def test_pyro_sample_site(lm: CausalLM) -> None:
    torch.manual_seed(12)

    def model() -> None:
        pyro.sample("y", lm.given("def "))

    trace = pyro.poutine.trace(model).get_trace()
    site = trace.nodes["y"]
    assert isinstance(site["value"], Sequences)
    torch.testing.assert_close(
        site["fn"].log_prob(site["value"]), site["value"].log_q, atol=1e-4, rtol=0
    )


def test_from_pretrained_round_trip(lm: CausalLM, tmp_path) -> None:
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    loaded = CausalLM.from_pretrained(tmp_path, max_new_tokens=lm.max_new_tokens)
    assert loaded.vocabulary_id == lm.vocabulary_id
    torch.manual_seed(13)
    samples = lm.given(PROMPTS).sample_batch(4)
    torch.testing.assert_close(loaded.log_prob(samples), lm.log_prob(samples), atol=1e-5, rtol=0)
    half = CausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.model.dtype == torch.bfloat16


def test_unknown_bundled_name_and_missing_directory(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no bundled model named 'nope'"):
        CausalLM.from_pretrained("bundled:nope")
    with pytest.raises(ConfigError, match="not a local directory"):
        CausalLM.from_pretrained(tmp_path / "missing")


def test_vocabulary_mismatch() -> None:
    tokenizer = stdlib_tokenizer(512)
    small = tiny_gpt2(stdlib_tokenizer(300))
    with pytest.raises(VocabularyMismatchError, match="512"):
        CausalLM(small, tokenizer)


def test_tokenizer_of_another_model_is_refused() -> None:
    tokenizer = stdlib_tokenizer(512)
    model = tiny_gpt2(tokenizer)
    model.config.eos_token_id = tokenizer.eos_token_id + 1  # as a foreign model's config would
    with pytest.raises(VocabularyMismatchError, match="EOS id is"):
        CausalLM(model, tokenizer)
    model.config.eos_token_id = [tokenizer.eos_token_id + 1, tokenizer.eos_token_id]
    assert CausalLM(model, tokenizer).eos_token_id == tokenizer.eos_token_id


def test_vocabulary_properties(lm: CausalLM) -> None:
    assert lm.vocab_size == 512
    assert lm.eos_token_id == lm.tokenizer.eos_token_id
    assert lm.module is lm.model
    assert lm.adapted(top_k=3).module is lm.model
    assert lm.adapted(top_k=3).vocabulary_id == lm.vocabulary_id
    other = tiny_causal_lm(vocab_size=300)
    assert other.vocabulary_id != lm.vocabulary_id


def test_draw_follows_the_law_and_never_picks_a_removed_token() -> None:
    """Inverse-CDF draws: frequencies match exp(log p) within 4 se, -inf entries (an adaptor's
    removals, first and last included) are never drawn."""
    torch.manual_seed(16)
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.25, 0.05, 0.0])
    log_probs = probs.log().expand(40_000, -1)
    tokens = draw(log_probs)
    observed = torch.bincount(tokens, minlength=len(probs)).double() / len(tokens)
    assert (observed[probs == 0] == 0).all()
    se = (probs * (1 - probs) / len(tokens)).sqrt().double()
    assert ((observed - probs.double()).abs() <= 4 * se + 1e-12).all()


def test_stepping_api_follows_reordering_and_runs_past_max_new_tokens(lm: CausalLM) -> None:
    """start/step/reorder (SMC's particles): after resampling rows and stepping beyond
    max_new_tokens (the preallocated cache grows), each row's next-token law equals one
    uncached forward pass over its own prompt and tokens."""
    torch.manual_seed(17)
    prompted = lm.given(PROMPTS)
    state = prompted.start(4)
    fed: list[list[int]] = [[] for _ in range(4)]
    steps = lm.max_new_tokens + 3
    for t in range(steps):
        token = draw(prompted.next_log_probs(state))
        prompted.step(state, token)
        fed = [row + [int(x)] for row, x in zip(fed, token)]
        if t == 2:
            index = torch.tensor([2, 2, 0, 3])
            prompted.reorder(state, index)
            fed = [list(fed[i]) for i in index.tolist()]
    assert state.contexts == [PROMPTS[i] for i in (2, 2, 0, 3)]
    for i, (context, row) in enumerate(zip(state.contexts, fed)):
        ids = torch.tensor(list(lm.tokenizer(context)["input_ids"]) + row)[None]
        logits = lm.model(input_ids=ids).logits[0, -1]
        torch.testing.assert_close(prompted.next_log_probs(state, torch.tensor([i]))[0],
                                   torch.log_softmax(logits, -1), atol=1e-4, rtol=0)
