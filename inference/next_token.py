"""Next-token laws for `SMC`: a prior's ``log a(· | s_{<t})`` for N particles, step by step.

A `NextToken` holds one row per particle: ``log_probs(rows)`` gives the next-token
log-probabilities ``[n, V]`` (float64, CPU) of the particles ``rows``; ``advance(rows, token)``
appends their token t; ``reorder(ancestors)`` follows resampling (SPEC §11). Table priors
(`TabularLM`, `PrefixTreeLM`) index a table per prefix; a `CausalLM` advances all N particles in
one forward pass per token with its KV cache, reordered on resampling (finished particles are
fed pad, so the batch never changes shape).
"""

from __future__ import annotations

from typing import Protocol

import torch

from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import ConfigError
from bayesalign.sequences import Sequences

from .lm_head import lm_head_input


class NextToken(Protocol):
    length: int  # tokens at most: the prior's length (tables) or max_new_tokens (CausalLM)

    def log_probs(self, rows: torch.Tensor) -> torch.Tensor: ...

    def advance(self, rows: torch.Tensor, token: torch.Tensor) -> None: ...

    def reorder(self, ancestors: torch.Tensor) -> None: ...

    def sequences(self, tokens: torch.Tensor, mask: torch.Tensor, owners: torch.Tensor) -> Sequences:
        """Rows of particles ``owners`` as `Sequences` the target's factors can read."""


class TableSteps:
    """Table t holds ``log a(x_t | prefix)`` for every prefix of length t, ``[V**t, V]``."""

    def __init__(self, tables: list[torch.Tensor], num: int) -> None:
        self.tables, self.length = tables, len(tables)
        self.vocab = tables[0].shape[-1]
        self.prefix = torch.zeros(num, dtype=torch.long)  # base-V index of each prefix
        self.t = 0

    def log_probs(self, rows: torch.Tensor) -> torch.Tensor:
        return self.tables[self.t][self.prefix[rows]]

    def advance(self, rows: torch.Tensor, token: torch.Tensor) -> None:
        self.prefix[rows] = self.prefix[rows] * self.vocab + token
        self.t += 1

    def reorder(self, ancestors: torch.Tensor) -> None:
        self.prefix = self.prefix[ancestors]

    def sequences(self, tokens: torch.Tensor, mask: torch.Tensor, owners: torch.Tensor) -> Sequences:
        return Sequences(tokens=tokens, mask=mask)


class CausalSteps:
    """A `CausalLM`'s next-token law for N particles: one forward pass per token, KV cache on
    (`CausalLM.start` / `step` / `reorder`); a token is fed lazily, on the next ``log_probs`` or
    ``hidden_states``, so a particle's last token costs no forward pass.

    Each forward pass also keeps the last hidden state of every row (the LM head's input), which
    a twist reading this model gets (``twist_reader``): ``hidden_states`` after the latest token
    (`HiddenStateTwist`; it feeds that token now) or ``context_hidden``, the state whose logits
    give the next token's law (`NextTokenTwist`). The twist then costs no forward pass."""

    def __init__(self, lm: SequenceDistribution, num: int) -> None:
        from bayesalign.models.decoding import tokenizer_decoder

        self.lm, self.length = lm, lm.max_new_tokens
        embeddings = getattr(lm.module, "get_output_embeddings", None)
        self.lm_head = embeddings() if embeddings is not None else None
        with lm_head_input(self.lm_head) as captured:
            self.state = lm.start(num)
        self.pending: torch.Tensor | None = None  # tokens fed on the next forward pass
        self.hidden = captured[-1][:, -1] if captured else None  # [N, H] after the last token fed
        self.decoder = tokenizer_decoder(lm.tokenizer, lm.eos_token_id, lm.hidden_tokens)

    def _feed(self) -> None:
        if self.pending is None:
            return
        with lm_head_input(self.lm_head) as captured:
            self.lm.step(self.state, self.pending)
        self.hidden = captured[-1][:, -1] if captured else None
        self.pending = None

    def log_probs(self, rows: torch.Tensor) -> torch.Tensor:
        self._feed()
        return self.lm.next_log_probs(self.state, rows).double().cpu()

    def twist_reader(self, twist: object) -> CausalSteps | None:
        """This law, when ``twist`` reads this LM's hidden states (its ``prior_module`` is this
        model); None for any other twist, which is called on prefixes."""
        return self if getattr(twist, "prior_module", None) is self.lm.module else None

    def hidden_states(self, rows: torch.Tensor) -> torch.Tensor:
        """The last hidden state ``[n, H]`` of ``rows`` after their latest token."""
        self._feed()
        return self.context_hidden(rows)

    def context_hidden(self, rows: torch.Tensor) -> torch.Tensor:
        """The hidden state ``[n, H]`` of ``rows`` whose logits gave their latest law: before a
        token drawn but not yet fed."""
        if self.hidden is None:
            raise ConfigError(
                f"SMC: {type(self.lm.module).__name__} computes its logits without calling its "
                "output embeddings, so its hidden states cannot be read; call the twist on "
                "prefixes instead (wrap it in a plain function)")
        return self.hidden[rows.to(self.hidden.device)]

    def advance(self, rows: torch.Tensor, token: torch.Tensor) -> None:
        self.pending = torch.full((len(self.state.contexts),), self.lm.pad_token_id,
                                  dtype=torch.long)
        self.pending[rows] = token

    def reorder(self, ancestors: torch.Tensor) -> None:
        self.lm.reorder(self.state, ancestors)
        if self.pending is not None:
            self.pending = self.pending[ancestors]
        if self.hidden is not None:
            self.hidden = self.hidden[ancestors.to(self.hidden.device)]

    def sequences(self, tokens: torch.Tensor, mask: torch.Tensor, owners: torch.Tensor) -> Sequences:
        contexts = None if self.lm.prompt is None \
            else [self.state.contexts[i] for i in owners.tolist()]
        return Sequences(tokens=tokens, mask=mask, decoder=self.decoder, context=contexts)


def next_token(distribution: SequenceDistribution, role: str, num: int) -> NextToken:
    """The step-by-step next-token law of ``distribution`` for ``num`` particles."""
    # Imported here: the models package loads transformers, which importing an engine must not.
    from bayesalign.models.adaptors import adapted_log_probs
    from bayesalign.models.causal_lm import CausalLM
    from bayesalign.models.prefix_tree import PrefixTreeLM
    from bayesalign.models.tabular import TabularLM

    with torch.no_grad():
        if isinstance(distribution, TabularLM):
            return TableSteps([t.double() for t in distribution.prefix_conditionals()], num)
        if isinstance(distribution, PrefixTreeLM):
            return TableSteps([adapted_log_probs(t.detach().double(), distribution.adaptors)
                               for t in distribution.logits.tables], num)
    if isinstance(distribution, CausalLM):
        return CausalSteps(distribution, num)
    raise ConfigError(
        f"SMC: the {role} is a {type(distribution).__name__}; SMC needs a prior whose next-token "
        "law is available step by step (TabularLM, PrefixTreeLM or CausalLM)"
    )
