"""`Prompted`: a causal LM read with a fixed prompt C before every context, a(y | C ⊕ x).

A prompt is evidence (SPEC §13): the prompted model is the target p(y | x) = a(y | C ⊕ x) of
context distillation, and the policy that learns it is the same LM without the prompt. Samples
carry their context x, not C ⊕ x, so the unprompted policy can score them and every engine's
weights a(y | C ⊕ x) / π(y | x) read as usual.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import ConfigError
from bayesalign.sequences import Sequences

from .adaptors import adapted_log_probs
from .causal_lm import CausalLM


class Prompted(SequenceDistribution):
    """``a(y | prompt ⊕ x)`` for the contexts x of ``lm`` (one string, or one per row).

    The prompt is prepended as text, so ``prompt + x`` is tokenised as one string, exactly as
    ``lm.given(prompt + x)`` would read it. ``trainable_copy`` is the *unprompted* LM's: the
    student of context distillation starts as the model without the prompt.
    """

    def __init__(self, lm: CausalLM, prompt: str) -> None:
        super().__init__()
        if not isinstance(lm, CausalLM):
            raise ConfigError(f"Prompted needs a CausalLM, got {type(lm).__name__}")
        if not isinstance(prompt, str) or not prompt:
            raise ConfigError(f"Prompted prompt must be a non-empty string, got {prompt!r}")
        self.lm = lm
        self.prompt = prompt
        self.vocab_size = lm.vocab_size
        self.eos_token_id = lm.eos_token_id
        self.recommended_optimizer = lm.recommended_optimizer

    def __repr__(self) -> str:
        return f"Prompted({self.prompt!r}, context={self.lm.prompt!r})"

    @property
    def vocabulary_id(self) -> tuple:
        return self.lm.vocabulary_id

    def conditioned(self, context: str | list[str]) -> Prompted:
        return Prompted(self.lm.given(context), self.prompt)

    def _prompted(self, contexts: list[str | None]) -> list[str]:
        return [self.prompt + (context or "") for context in contexts]

    def _contexts(self, value: Sequences) -> list[str | None]:
        if value.context is not None:
            return list(value.context)
        return self.lm._contexts(len(value))

    def sample_batch(self, num_samples: int) -> Sequences:
        """Draws of the prompted LM, labelled with their unprompted contexts."""
        contexts = self.lm._contexts(num_samples)
        drawn = self.lm.given(self._prompted(contexts)).sample_batch(num_samples)
        return replace(drawn, context=None if self.lm.prompt is None else contexts)

    def token_log_probs(self, value: Sequences) -> torch.Tensor:
        prompted = replace(value, context=self._prompted(self._contexts(value)))
        return self.lm.token_log_probs(prompted)

    def log_prob(self, value: Sequences) -> torch.Tensor:
        with torch.no_grad():
            return self.token_log_probs(value).sum(-1)

    def trainable_copy(self) -> CausalLM:
        """The student: the unprompted LM with its own trainable weights."""
        return self.lm.trainable_copy()


def next_token_log_probs(
    lm: CausalLM, prefixes: list[str | None], texts: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole next-token distribution ``log lm(· | prefix ⊕ text_{<t})`` at positions
    t = 2…T of each text (teacher forcing), ``[batch, T − 1, vocab]``, and the mask of real
    positions. A prefix of None is no prefix: the text's own first token is its context, as
    for ``lm.given(text)``; the first token is never predicted, so both sides align.

    Follows torch's grad mode (the student needs gradients, the teacher does not).
    """
    if not texts or any(len(t) < 2 for t in texts):
        raise ConfigError("next_token_log_probs needs texts of at least 2 tokens, one per row")
    length = max(len(t) for t in texts)
    device = lm.device
    tokens = torch.full((len(texts), length), lm.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(texts), length), dtype=torch.bool)
    for i, ids in enumerate(texts):
        tokens[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, :len(ids)] = True
    tokens, mask = tokens.to(device), mask.to(device)
    input_ids, attention = tokens[:, :-1], mask[:, :-1].long()
    if any(p is not None for p in prefixes):
        if any(p is None for p in prefixes):
            raise ConfigError("next_token_log_probs: give every row a prefix, or none")
        context_ids, context_attention = lm._encode_contexts(prefixes)
        input_ids = torch.cat([context_ids, input_ids], dim=1)
        attention = torch.cat([context_attention, attention], dim=1)
    # As CausalLM counts it: the prefix and the text's first token are the context, the
    # other length − 1 tokens the continuation.
    lm._check_length(input_ids.shape[1] - (length - 1) + 1, length - 1)
    logits, _ = lm._forward(input_ids, attention, keep=length - 1)
    return adapted_log_probs(logits, lm.adaptors), mask[:, 1:]
