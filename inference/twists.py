"""Twists for `SMC`: callables mapping prefixes to ``log ψ_t`` (SPEC §11).

A twist is any callable ``twist(prefixes) -> log_psi`` taking the prefix tokens ``[n, t]``
(long, ``t ≥ 1``, every row an incomplete prefix) and returning ``log ψ_t`` of each row,
shape ``[n]``, finite or ``-inf`` (ψ = 0: a prefix with no future mass). `optimal_twist`
computes the exact twist ψ*_t(s_{1:t}) = Σ_c a(c | s_{1:t}) L(s_{1:t} c) by enumeration, the
reference under which twisted SMC returns log Ẑ = log Z exactly for any number of particles.
A learned twist is a `PrefixTwist` module (`TableTwist` for table priors; on a `CausalLM`'s
hidden states `HiddenStateTwist`, one value per prefix, and `NextTokenTwist`, one per next
token), trained by `twist_learning.TwistLearning`; it declares the vocabulary and prefix length
it was built for, which `SMC` checks against the prior.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import ConfigError, InvalidFactorError, VocabularyMismatchError
from bayesalign.sequences import Sequences
from bayesalign.targets import NO_CONTEXT, Target

Twist = Callable[[torch.Tensor], torch.Tensor]


def optimal_twist(target: Target, context: Any = NO_CONTEXT) -> Twist:
    """ψ*_t(prefix) = E_a[L(s) | s starts with prefix], by enumerating the prior's support.

    ``log ψ*`` is ``log Σ_{s ⊐ prefix} a(s) L(s) − log Σ_{s ⊐ prefix} a(s)`` over the complete
    sequences ``s`` strictly extending the prefix; ``-inf`` for prefixes the prior never makes.
    A lookup table, so only for enumerable priors (tests, small worlds).
    """
    support = target.support(context)
    log_prior = support.log_q.double()
    log_score = target.log_score(support, context, log_prior=log_prior)
    future: dict[tuple[int, ...], float] = {}
    mass: dict[tuple[int, ...], float] = {}
    for tokens, log_a, log_p in zip(support.token_lists(), log_prior.tolist(), log_score.tolist()):
        for t in range(1, len(tokens)):
            key = tuple(tokens[:t])
            future[key] = _log_add(future.get(key, -math.inf), log_p)
            mass[key] = _log_add(mass.get(key, -math.inf), log_a)
    table = {key: future[key] - mass[key] for key in future if mass[key] > -math.inf}

    def twist(prefixes: torch.Tensor) -> torch.Tensor:
        values = [table.get(tuple(row), -math.inf) for row in prefixes.tolist()]
        return torch.tensor(values, dtype=torch.float64, device=prefixes.device)

    return twist


class PrefixTwist(torch.nn.Module):
    """A trainable twist: ``forward(prefixes [n, t]) -> log ψ_t [n]`` for one prior's tokens.

    ``vocabulary_id`` and ``max_prefix_length`` are the prior's (SMC refuses a twist built for
    another); ``history`` is the training run's, set by `TwistLearning.fit`.
    """

    recommended_optimizer: tuple[str, float] = ("adam", 1e-3)

    def __init__(self, prior: SequenceDistribution, max_prefix_length: int) -> None:
        super().__init__()
        self.vocabulary_id = tuple(prior.vocabulary_id)
        self.vocab_size = prior.vocab_size
        self.max_prefix_length = max_prefix_length
        self.history: list[dict[str, float]] = []

    def all_prefixes(self, tokens: torch.Tensor) -> torch.Tensor:
        """``log ψ_t(tokens[:, :t])`` for t = 1..T as ``[n, T]`` (CTL needs every t of a draw)."""
        return torch.stack([self(tokens[:, :t]) for t in range(1, tokens.shape[1] + 1)], -1)

    def check_prefixes(self, prefixes: torch.Tensor) -> None:
        """Refuse prefixes this twist was not built for: too long, or tokens outside its vocabulary."""
        t = prefixes.shape[-1]
        if not 1 <= t <= self.max_prefix_length:
            raise ConfigError(f"{type(self).__name__}: prefixes of length {t}; it covers lengths "
                              f"1 to {self.max_prefix_length}")
        if len(prefixes) and (int(prefixes.min()) < 0 or int(prefixes.max()) >= self.vocab_size):
            bad = int(((prefixes < 0) | (prefixes >= self.vocab_size)).any(-1).nonzero()[0])
            raise VocabularyMismatchError(
                f"{type(self).__name__}: prefix {bad} has token ids outside its vocabulary of "
                f"{self.vocab_size} ({prefixes[bad].tolist()})")


class TableTwist(PrefixTwist):
    """One free log ψ_t per prefix of a table prior (`TabularLM`, `PrefixTreeLM`): a table that
    can hold the optimal twist exactly, so CTL on a small world can be compared with it."""

    recommended_optimizer = ("adam", 0.05)

    def __init__(self, prior: SequenceDistribution) -> None:
        length = getattr(prior, "length", None)
        if not prior.has_enumerate_support or length is None:
            raise ConfigError(f"TableTwist: the prior is a {type(prior).__name__}; it needs a "
                              "table prior with a fixed length (TabularLM, PrefixTreeLM)")
        super().__init__(prior, length - 1)
        vocab = prior.vocab_size
        self.tables = torch.nn.ParameterList(
            torch.nn.Parameter(torch.zeros(vocab**t, dtype=torch.float64))
            for t in range(1, length))

    def forward(self, prefixes: torch.Tensor) -> torch.Tensor:
        self.check_prefixes(prefixes)
        index = torch.zeros(len(prefixes), dtype=torch.long, device=prefixes.device)
        for t in range(prefixes.shape[-1]):
            index = index * self.vocab_size + prefixes[:, t]
        return self.tables[prefixes.shape[-1] - 1][index]


class _PriorHeadTwist(PrefixTwist):
    """A head on an unconditional `CausalLM`'s frozen last hidden states (the LM head's input).

    The prior is held outside the module's parameters, so training and checkpoints touch the
    head only; its last layer starts at zero (ψ ≡ 1, SMC without a twist). `SMC` hands the head
    the hidden states of its own KV-cached forward passes when the twist reads its prior's model
    (``prior_module``), so a run costs no LM forward tokens beyond SMC's own; called on
    prefixes the head runs the prior over them once (no cache).
    """

    recommended_optimizer = ("adam", 1e-3)

    def __init__(self, prior: SequenceDistribution, outputs: int, width: int) -> None:
        if getattr(prior, "prompt", None) is not None or not hasattr(prior, "start_token_id"):
            raise ConfigError(f"{type(self).__name__}: the prior must be an unconditional "
                              f"CausalLM (no prompt), got {type(prior).__name__}")
        super().__init__(prior, prior.max_new_tokens - 1)
        self._prior = [prior]  # a list: not a submodule, so not trained nor checkpointed
        hidden = prior.module.config.hidden_size
        self.head = torch.nn.Sequential(torch.nn.Linear(hidden, width), torch.nn.Tanh(),
                                        torch.nn.Linear(width, outputs))
        torch.nn.init.zeros_(self.head[-1].weight)
        torch.nn.init.zeros_(self.head[-1].bias)

    @property
    def prior_module(self) -> torch.nn.Module:
        """The transformers model whose hidden states the head reads."""
        return self._prior[0].module

    def _hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """The prior's last-layer hidden states after the start token and after each token,
        ``[n, t + 1, hidden]``."""
        prior = self._prior[0]
        start = torch.full((len(tokens), 1), prior.start_token_id, dtype=torch.long)
        ids = torch.cat([start, tokens.cpu()], 1).to(prior.device)
        with torch.no_grad():
            out = prior.module(input_ids=ids, attention_mask=torch.ones_like(ids),
                               output_hidden_states=True)
        return out.hidden_states[-1].float().to(self.head[0].weight.device)


class HiddenStateTwist(_PriorHeadTwist):
    """log ψ_t = a small MLP on the prior's last hidden state after s_t.

    SMC feeds s_t at once to read that state (``from_hidden_states``); under
    ``proposal="twisted"`` every one-token extension would need its own forward pass, so there
    it is called on N·V prefixes: too slow on a real vocabulary (use `NextTokenTwist`).
    """

    def __init__(self, prior: SequenceDistribution, width: int = 64) -> None:
        super().__init__(prior, 1, width)

    def all_prefixes(self, tokens: torch.Tensor) -> torch.Tensor:
        self.check_prefixes(tokens[:, : self.max_prefix_length])
        return self.head(self._hidden(tokens)[:, 1:]).squeeze(-1)

    def forward(self, prefixes: torch.Tensor) -> torch.Tensor:
        self.check_prefixes(prefixes)
        return self.from_hidden_states(self._hidden(prefixes)[:, -1])

    def from_hidden_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """log ψ from the prior's last hidden state after each prefix, ``[n, H]`` → ``[n]``."""
        return self.head(hidden.float().to(self.head[0].weight.device)).squeeze(-1)


class NextTokenTwist(_PriorHeadTwist):
    """log ψ_t(s_{<t} v) = head(h_{t−1})[v]: one value per next token v, from the prior's hidden
    state before it (the state whose logits give a(v | s_{<t})), as Zhao et al. (2024)
    parametrise twists on LMs.

    So the twisted proposal q ∝ a(v | s_{<t}) ψ_t(s_{<t} v) over the whole vocabulary costs one
    head call per particle and step (``next_token_log_psi``), no forward pass of its own.
    """

    def __init__(self, prior: SequenceDistribution, width: int = 64) -> None:
        super().__init__(prior, prior.vocab_size, width)

    def all_prefixes(self, tokens: torch.Tensor) -> torch.Tensor:
        self.check_prefixes(tokens[:, : self.max_prefix_length])
        table = self.head(self._hidden(tokens[:, :-1]))  # [n, T, V]: before each token
        return table.gather(-1, tokens.to(table.device)[..., None]).squeeze(-1)

    def forward(self, prefixes: torch.Tensor) -> torch.Tensor:
        self.check_prefixes(prefixes)
        table = self.next_token_log_psi(self._hidden(prefixes[:, :-1])[:, -1])
        return table.gather(-1, prefixes[:, -1:].to(table.device)).squeeze(-1)

    def next_token_log_psi(self, hidden: torch.Tensor) -> torch.Tensor:
        """log ψ of every one-token extension, ``[n, V]``, from the hidden state ``[n, H]``
        before the next token."""
        return self.head(hidden.float().to(self.head[0].weight.device))


def require_twist_fits(twist: Twist | None, prior: SequenceDistribution, length: int) -> None:
    """A twist that declares its vocabulary (a learned twist) must share the prior's, and one
    that declares its length must cover every prefix the prior makes."""
    if twist is None:
        return
    vocabulary = getattr(twist, "vocabulary_id", None)
    if vocabulary is not None and tuple(vocabulary) != tuple(prior.vocabulary_id):
        raise VocabularyMismatchError(
            f"SMC: the twist's vocabulary {tuple(vocabulary)} differs from the prior's "
            f"{tuple(prior.vocabulary_id)}; train the twist on this prior")
    covers = getattr(twist, "max_prefix_length", None)
    if covers is not None and covers < length - 1:
        raise ConfigError(
            f"SMC: the twist covers prefixes up to length {covers} but the prior makes incomplete "
            f"prefixes up to length {length - 1}; build the twist for this prior's length")


def prefix_checks(target: Target, sequences: Sequences, context: Any = NO_CONTEXT
                  ) -> dict[str, Callable[[Sequences], torch.Tensor]]:
    """The ``holds`` of each ``ba.prefix_constraint`` site of ``target``, read from one trace of
    ``sequences`` (a row or more): the conditions a prefix can be pruned by."""
    sites = target.factors(sequences, context)
    return {name: site.metadata["prefix_check"] for name, site in sites.items()
            if "prefix_check" in site.metadata}


def log_prefix_factor(checks: dict[str, Callable[[Sequences], torch.Tensor]],
                      prefixes: Sequences, where: str) -> torch.Tensor:
    """``Σ log 1[holds(prefix)]`` over ``checks``, float64 ``[n]`` (0 or −inf); a check that does
    not give one bool (or 0/1) per prefix is an `InvalidFactorError` naming it and ``where``."""
    log_factor = torch.zeros(len(prefixes), dtype=torch.float64)
    for name, holds in checks.items():
        ok = torch.as_tensor(holds(prefixes)).cpu()
        if ok.shape != (len(prefixes),) or not (ok.dtype == torch.bool
                                                or ((ok == 0) | (ok == 1)).all()):
            raise InvalidFactorError(
                f"prefix constraint '{name}' gave {tuple(ok.shape)} {ok.dtype} values {where} "
                f"for {len(prefixes)} prefixes; it must give one bool (or 0/1) per prefix")
        log_factor = log_factor.masked_fill(~ok.bool(), -math.inf)
    return log_factor


def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))
