"""Best-of-n: draw n samples, keep the one with the highest reward (SPEC §4.3).

On enumerable priors the exact law is ``π(y) = (F(v)^n − F⁻(v)^n) · q(y)/q(v)`` with
``v = r(y)``, ``F(v) = P_q(r ≤ v)`` and ``F⁻(v) = P_q(r < v)``; the division by ``q(v)`` (the
mass of reward level v) spreads a level's mass over the tied sequences, and reduces to
Beirami et al.'s formula when rewards are distinct. ``log n − (n−1)/n`` bounds KL(π‖q).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import ConfigError, require_positive
from bayesalign.evaluation import evaluate
from bayesalign.options import renamed_options
from bayesalign.posterior import Posterior
from bayesalign.seeding import seeded
from bayesalign.sequences import Sequences
from bayesalign.targets import NO_CONTEXT, Target

from .base import batches, one_context, resolve_proposal


def best_of_n_kl_bound(n: int) -> float:
    """``log n − (n−1)/n``: the usual KL(π_BoN‖q), an upper bound (Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


def best_of_n_log_law(rewards: torch.Tensor, log_q: torch.Tensor, n: int) -> torch.Tensor:
    """Exact log π_BoN over an enumerated support given each sequence's reward and log q."""
    q = log_q.double().exp()
    rewards = rewards.double()
    levels, level_of = torch.unique(rewards, return_inverse=True)
    level_mass = torch.zeros(len(levels), dtype=torch.float64).index_add_(0, level_of, q)
    below = torch.cumsum(level_mass, 0) - level_mass
    at_most = below + level_mass
    level_law = at_most.clamp(max=1.0) ** n - below.clamp(max=1.0) ** n
    return (level_law[level_of] * q / level_mass[level_of]).log()


@renamed_options(batch_size="chunk_size")
@dataclass
class BestOfN:
    """Best-of-n sampling on a reward: a named factor site's value, or the whole log-potential."""

    n: int = 4  # draws per returned sample
    reward: str | None = None  # factor site to maximise; None: the whole log-potential
    num_samples: int = 1000  # samples returned (n times as many proposals)
    proposal: SequenceDistribution | None = None  # q; the prior by default
    chunk_size: int = 4096  # proposals drawn and scored at once (whole groups of n)
    seed: int | None = 0  # seeds torch for the fit (None: the caller's RNG state)

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"BestOfN: n must be a positive integer, got {self.n}")
        require_positive("num_samples", self.num_samples)
        require_positive("chunk_size", self.chunk_size)

    def _rewards(self, target: Target, y: Sequences, context: Any) -> torch.Tensor:
        if self.reward is None:
            return target.log_potential(y, context)
        sites = target.factors(y, context)
        if self.reward not in sites:
            raise ConfigError(
                f"BestOfN: reward '{self.reward}' is not a factor site of '{target.name}'; "
                f"sites are {sorted(sites)}"
            )
        return sites[self.reward].value.double()

    def fit(self, target: Target, context: Any = NO_CONTEXT, *, contexts: Any = None) -> Posterior:
        one_context("BestOfN", contexts)
        _, proposal = resolve_proposal(target, self.proposal, context)
        groups_per_chunk = max(1, self.chunk_size // self.n)
        chosen: list[Sequences] = []
        with seeded(self.seed):
            for groups in batches(self.num_samples, groups_per_chunk, "BestOfN"):
                draws = proposal.sample_batch(groups * self.n)
                rewards = self._rewards(target, draws, context).reshape(groups, self.n)
                best = rewards.argmax(-1) + torch.arange(groups) * self.n
                chosen.append(draws[best])
        law = None
        if target.is_enumerable(context):
            support = target.support(context)
            log_q = proposal.log_prob(support).detach()
            log_law = best_of_n_log_law(self._rewards(target, support, context), log_q, self.n)
            table = dict(zip(support.keys(), log_law.tolist()))

            def law(y: Sequences) -> torch.Tensor:
                values = [table.get(k, -math.inf) for k in y.keys()]
                return torch.tensor(values, dtype=torch.float64)

        samples = Sequences.cat(chosen)
        diagnostics = replace(
            evaluate(target, samples, context=context, law=law,
                     num_proposed=self.num_samples * self.n),
            extras={"kl_bound": best_of_n_kl_bound(self.n), "win_rate_bound": self.n / (self.n + 1)},
        )
        return Posterior(samples, engine="BestOfN", diagnostics=diagnostics, target=target,
                         context=context, law=law,
                         config={"n": self.n, "reward": self.reward, "num_samples": self.num_samples})
