"""`Importance`: self-normalised importance sampling from the prior or any proposal (SPEC §2.6, §9)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import require_positive
from bayesalign.evaluation import evaluate
from bayesalign.posterior import Posterior
from bayesalign.seeding import seeded
from bayesalign.sequences import Sequences
from bayesalign.targets import NO_CONTEXT, Target

from .base import batches, resolve_proposal, weighted_draws


@dataclass
class Importance:
    """SNIS: weights ``P/q`` of ``num_samples`` proposal draws; ``resample`` returns an equal-weight set."""

    num_samples: int = 1000
    proposal: SequenceDistribution | None = None
    resample: bool = False
    batch_size: int = 4096
    seed: int | None = 0

    def __post_init__(self) -> None:
        require_positive("num_samples", self.num_samples)
        require_positive("batch_size", self.batch_size)

    def fit(self, target: Target, context: Any = NO_CONTEXT) -> Posterior:
        prior, proposal = resolve_proposal(target, self.proposal, context)
        draws: list[Sequences] = []
        log_ws: list[torch.Tensor] = []
        with seeded(self.seed):
            for size in batches(self.num_samples, self.batch_size, "Importance"):
                y, log_w = weighted_draws(target, prior, proposal, size, context)
                draws.append(y)
                log_ws.append(log_w.cpu())
            samples, log_w = Sequences.cat(draws), torch.cat(log_ws)
            posterior = Posterior(
                samples, engine="Importance", target=target, context=context,
                log_weights=log_w, proposal_log_weights=log_w, num_proposed=len(log_w),
                config={"num_samples": self.num_samples, "resample": self.resample},
            )
            posterior.diagnostics = evaluate(target, posterior)
            if self.resample:
                resampled = posterior.sample(self.num_samples)
                posterior.samples, posterior.log_weights = resampled, None
        return posterior
