"""`TabularLM`: an exactly enumerable n-gram LM, the oracle prior and trainable policy for small worlds.

``initial`` is the joint law of the first ``k`` tokens (shape ``[V]*k``) and ``transition`` the
law of the next token given the previous ``k`` (shape ``[V]*(k+1)``), so a bigram has
``initial`` of shape ``[V]``. With an EOS token a sequence ends at its first EOS; sequences that
reach ``length`` without one are scored as truncated prefixes, so the support has total mass 1.
"""

from __future__ import annotations

import torch

from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import ConfigError, InvalidDistributionError
from bayesalign.sequences import Sequences, mask_through_eos

from .adaptors import Adaptor, adapted_log_probs, make_adaptors
from .enumeration import enumerate_sequences
from .prefix_tree import PrefixTreeLM


def _check_table(name: str, table: torch.Tensor, atol: float = 1e-6) -> None:
    if not torch.isfinite(table).all() or (table < 0).any():
        raise InvalidDistributionError(f"{name} must hold finite non-negative probabilities")
    sums = table.sum(-1)
    bad = (sums - 1).abs() > atol
    if bad.any():
        where = tuple(bad.nonzero()[0].tolist())
        raise InvalidDistributionError(
            f"{name} rows must sum to 1; row {where} sums to {sums[where].item():.6g}"
        )


class TabularLogits(torch.nn.Module):
    """The log-probability tables of a `TabularLM` (frozen: policies are `PrefixTreeLM`s)."""

    def __init__(self, initial_logits: torch.Tensor, transition_logits: torch.Tensor) -> None:
        super().__init__()
        self.initial_logits = torch.nn.Parameter(initial_logits.clone(), requires_grad=False)
        self.transition_logits = torch.nn.Parameter(transition_logits.clone(), requires_grad=False)


class TabularLM(SequenceDistribution):
    """n-gram LM over a small vocabulary with exact sampling, log-probabilities and support."""

    has_enumerate_support = True

    def __init__(
        self,
        initial: torch.Tensor,
        transition: torch.Tensor,
        length: int,
        eos_token_id: int | None = None,
        *,
        adaptors: tuple[Adaptor, ...] = (),
        logits: TabularLogits | None = None,
    ) -> None:
        super().__init__()
        if logits is None:
            initial = torch.as_tensor(initial, dtype=torch.float64)
            transition = torch.as_tensor(transition, dtype=torch.float64)
            _check_table("initial", initial.reshape(-1))
            _check_table("transition", transition)
            logits = TabularLogits(initial.log(), transition.log())
        order = logits.transition_logits.dim() - 1
        vocab = logits.transition_logits.shape[-1]
        if logits.initial_logits.dim() != order or any(
            s != vocab for s in (*logits.initial_logits.shape, *logits.transition_logits.shape)
        ):
            raise InvalidDistributionError(
                f"initial must have shape [V]*k and transition [V]*(k+1) with one V; got "
                f"{tuple(logits.initial_logits.shape)} and {tuple(logits.transition_logits.shape)}"
            )
        if length < order:
            raise ConfigError(f"length must be >= the n-gram context {order}, got {length}")
        if eos_token_id is not None and order > 1:
            raise ConfigError("an EOS token needs a bigram table (k = 1): the joint initial "
                              "table cannot end a sequence inside its first k tokens")
        if eos_token_id is not None and not 0 <= eos_token_id < vocab:
            raise ConfigError(f"eos_token_id {eos_token_id} is outside the vocabulary of {vocab}")
        self.logits = logits
        self.order = order
        self.vocab_size = vocab
        self.length = length
        self.eos_token_id = eos_token_id
        self.adaptors = tuple(adaptors)

    @property
    def module(self) -> TabularLogits:
        return self.logits

    def trainable_copy(self) -> PrefixTreeLM:
        """A policy with one logit row per prefix, initialised at this LM: it can represent
        any distribution on this support, so a policy engine can reach p exactly (SPEC §10)."""
        return PrefixTreeLM.from_conditionals(self.prefix_conditionals(), self.eos_token_id)

    def prefix_conditionals(self) -> list[torch.Tensor]:
        """``log a(x_t | prefix)`` for every prefix: table t is ``[V**t, V]`` (base-V index)."""
        vocab, order = self.vocab_size, self.order
        with torch.no_grad():
            joint = self._initial_log_probs()
            trans = self._transition_log_probs().reshape(vocab**order, vocab)
            tables, marginal = [], torch.zeros(1, dtype=joint.dtype)
            for t in range(self.length):
                if t < order:
                    next_marginal = torch.logsumexp(joint.reshape(vocab ** (t + 1), -1), -1)
                    tables.append(next_marginal.reshape(vocab**t, vocab) - marginal[:, None])
                    marginal = next_marginal
                else:
                    # The last `order` tokens of a prefix index the transition table.
                    last = torch.arange(vocab**t) % vocab**order
                    tables.append(trans[last])
        return tables

    def conditioned(self, context: object) -> TabularLM:
        """A `TabularLM` is unconditional: as a policy for a conditional target it is shared
        by every context (the amortised fit of CDPG's context average)."""
        return self

    def adapted(self, **adaptor_options: float | int | None) -> TabularLM:
        """This LM under a sampling adaptor chain (`make_adaptors` options), as a proposal."""
        chain = make_adaptors(**adaptor_options)
        return TabularLM(
            None, None, self.length, self.eos_token_id, adaptors=chain, logits=self.logits
        )

    def _initial_log_probs(self) -> torch.Tensor:
        """Log-probabilities of the first ``order`` tokens, flattened to ``[V**order]``."""
        flat = self.logits.initial_logits.reshape(-1)
        if self.order == 1:
            return adapted_log_probs(flat, self.adaptors)
        # Adaptors act per step: apply them to each conditional of the joint initial table.
        joint = torch.log_softmax(flat, -1).reshape(self.logits.initial_logits.shape)
        log_probs = torch.zeros_like(joint)
        for t in range(self.order):
            later = tuple(range(t + 1, self.order))
            marginal = torch.logsumexp(joint, dim=later) if later else joint
            prefix = torch.logsumexp(marginal, -1, keepdim=True)
            step = adapted_log_probs(marginal - prefix, self.adaptors)
            log_probs = log_probs + step.reshape(step.shape + (1,) * (self.order - t - 1))
        return log_probs.reshape(-1)

    def _transition_log_probs(self) -> torch.Tensor:
        return adapted_log_probs(self.logits.transition_logits, self.adaptors)

    def sample_batch(self, num_samples: int) -> Sequences:
        with torch.no_grad():
            init = self._initial_log_probs()
            trans = self._transition_log_probs()
            vocab, order = self.vocab_size, self.order
            first = torch.multinomial(init.exp(), num_samples, replacement=True)
            columns = [(first // vocab ** (order - 1 - i)) % vocab for i in range(order)]
            for _ in range(order, self.length):
                history = trans[tuple(columns[-order:])]
                columns.append(torch.multinomial(history.exp(), 1).squeeze(-1))
            tokens = torch.stack(columns, dim=-1)
            mask = mask_through_eos(tokens, self.eos_token_id)
            tokens = tokens.masked_fill(~mask, 0)
            sequences = Sequences(tokens=tokens, mask=mask)
            return sequences.with_log_q(self._log_prob_of(sequences, init, trans))

    def log_prob(self, value: Sequences) -> torch.Tensor:
        """Exact log-probability (float64); differentiable in the logits for training."""
        return self.token_log_probs(value).sum(-1)

    def token_log_probs(self, value: Sequences) -> torch.Tensor:
        """Per-position log-probabilities ``[batch, length]``, 0 outside the mask.

        The first ``order`` tokens are scored jointly by the initial table, so their joint
        log-probability sits at position ``order − 1``.
        """
        return self._token_log_probs(
            value, self._initial_log_probs(), self._transition_log_probs()
        )

    def _log_prob_of(
        self, value: Sequences, init: torch.Tensor, trans: torch.Tensor
    ) -> torch.Tensor:
        return self._token_log_probs(value, init, trans).sum(-1)

    def _token_log_probs(
        self, value: Sequences, init: torch.Tensor, trans: torch.Tensor
    ) -> torch.Tensor:
        tokens, mask = value.tokens.to(init.device), value.mask.to(init.device)
        if tokens.shape[1] > self.length or (tokens.shape[1] < self.length and mask[:, -1].any()):
            raise ConfigError(f"sequences longer than this TabularLM's length {self.length}")
        if tokens.shape[1] < self.order:
            raise ConfigError(f"sequences shorter than the n-gram context {self.order}")
        vocab, order = self.vocab_size, self.order
        first_index = sum(tokens[:, i] * vocab ** (order - 1 - i) for i in range(order))
        columns = [torch.zeros_like(init[first_index])] * (order - 1) + [init[first_index]]
        for t in range(order, tokens.shape[1]):
            history = tuple(tokens[:, t - order + i] for i in range(order))
            step = trans[history + (tokens[:, t],)]
            columns.append(torch.where(mask[:, t], step, torch.zeros_like(step)))
        return torch.stack(columns, dim=-1)

    def enumerate_support(self, expand: bool = False) -> Sequences:
        """Every sequence with non-zero mass under this (possibly adapted) LM, with exact ``log_q``."""
        return enumerate_sequences(self, self.length)

