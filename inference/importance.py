"""`Importance`: self-normalised importance sampling from the prior or any proposal (SPEC §2.6, §9)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import require_positive
from bayesalign.evaluation import evaluate, normalised_weights
from bayesalign.options import renamed_options
from bayesalign.posterior import Posterior
from bayesalign.seeding import seeded
from bayesalign.sequences import Sequences
from bayesalign.targets import NO_CONTEXT, Target

from .base import batches, one_context, resolve_proposal, weighted_draws


@renamed_options(batch_size="chunk_size")
@dataclass
class Importance:
    """SNIS: weights ``P/q`` of ``num_samples`` proposal draws; ``resample`` returns an equal-weight set."""

    num_samples: int = 1000  # proposal draws (and, resampled, draws returned)
    proposal: SequenceDistribution | None = None  # q; the prior by default
    resample: bool = False  # multinomial resample to equal weights (diagnostics: before it)
    chunk_size: int = 4096  # proposals drawn and scored at once
    seed: int | None = 0  # seeds torch for the fit (None: the caller's RNG state)

    def __post_init__(self) -> None:
        require_positive("num_samples", self.num_samples)
        require_positive("chunk_size", self.chunk_size)

    def fit(self, target: Target, context: Any = NO_CONTEXT, *, contexts: Any = None) -> Posterior:
        one_context("Importance", contexts)
        prior, proposal = resolve_proposal(target, self.proposal, context)
        draws: list[Sequences] = []
        log_ws: list[torch.Tensor] = []
        with seeded(self.seed):
            for size in batches(self.num_samples, self.chunk_size, "Importance"):
                y, log_w = weighted_draws(target, prior, proposal, size, context)
                draws.append(y)
                log_ws.append(log_w.cpu())
            samples, log_w = Sequences.cat(draws), torch.cat(log_ws)
            diagnostics = evaluate(target, samples, context=context, log_weights=log_w,
                                   proposal_log_weights=log_w)
            log_weights = log_w
            if self.resample:
                # An equal-weight set; the diagnostics stay those of the weighted draws.
                index = torch.multinomial(normalised_weights(log_w, len(samples)),
                                          self.num_samples, replacement=True)
                samples, log_weights = samples[index], None
        return Posterior(samples, engine="Importance", diagnostics=diagnostics, target=target,
                         context=context, log_weights=log_weights, proposal_log_weights=log_w,
                         config={"num_samples": self.num_samples, "resample": self.resample})
