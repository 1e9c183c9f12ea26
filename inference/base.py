"""What every engine shares: the `Engine` protocol, proposals drawn in chunks, log-weights,
vocabulary checks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import ConfigError, VocabularyMismatchError
from bayesalign.posterior import Posterior
from bayesalign.sequences import Sequences
from bayesalign.targets import NO_CONTEXT, Target


class Engine(Protocol):
    """Construct with hyperparameters; ``fit`` returns a `Posterior`, built complete.

    ``context`` is the one context to solve (NO_CONTEXT: an unconditional target);
    ``contexts`` several, which policy engines train amortised over (CDPG) and sampling
    engines refuse (they solve one context per fit). Giving both is a `ConfigError`.
    """

    def fit(
        self, target: Target, context: Any = NO_CONTEXT, *, contexts: Any = None
    ) -> Posterior: ...


def one_context(engine: str, contexts: Any) -> None:
    """Sampling engines solve one context per fit: refuse ``contexts=``."""
    if contexts is not None:
        raise ConfigError(
            f"{engine}: contexts= is for policy engines; sampling engines solve one context "
            f"per fit: call fit(target, context) once for each context"
        )


def resolve_proposal(
    target: Target, proposal: SequenceDistribution | None, context: Any
) -> tuple[SequenceDistribution, SequenceDistribution]:
    """The prior and the proposal (the prior by default), checked to share a vocabulary."""
    prior = target.prior(context)
    if proposal is None:
        return prior, prior
    require_same_vocabulary("proposal", proposal, prior)
    return prior, proposal


def require_same_vocabulary(
    role: str, distribution: SequenceDistribution, prior: SequenceDistribution
) -> None:
    """A proposal or policy must share the prior's tokens: log-ratios across tokenizers mean nothing."""
    if distribution.vocabulary_id != prior.vocabulary_id:
        raise VocabularyMismatchError(
            f"{role} vocabulary {distribution.vocabulary_id} differs from the prior's "
            f"{prior.vocabulary_id}; log-ratios across tokenizers are meaningless"
        )


def weighted_draws(
    target: Target,
    prior: SequenceDistribution,
    proposal: SequenceDistribution,
    num_samples: int,
    context: Any,
) -> tuple[Sequences, torch.Tensor]:
    """``num_samples`` draws from the proposal and their log-weights ``log P − log q``."""
    draws = proposal.sample_batch(num_samples)
    if draws.log_q is None and proposal is prior:
        # A prior without log-probabilities (a `Corpus`): P/q = a·L/a = L needs no log a.
        return draws, target.log_potential(draws, context)
    log_q = draws.log_q.double()
    log_prior = log_q if proposal is prior else None
    log_score = target.log_score(draws, context, log_prior=log_prior)
    return draws, log_score - log_q


def batches(total: int, chunk_size: int, description: str) -> Iterator[int]:
    """Chunk sizes (at most ``chunk_size``) summing to ``total``, with a progress bar on
    interactive terminals."""
    with tqdm(total=total, desc=description, disable=None, leave=False) as bar:
        done = 0
        while done < total:
            size = min(chunk_size, total - done)
            yield size
            done += size
            bar.update(size)
