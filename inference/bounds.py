"""`log_z_bounds`: two-sided bounds on log Z and bracketed KLs for any proposal or policy q.

Draws K-sample replicates from q (any `SequenceDistribution` with exact log q: the prior, an
adapted prior, a trained policy) and takes exact target draws (`exact_reference`, or Rejection's
samples) for the upper bound; the maths is in `bayesalign.bounds` (SPEC §11). On a real LM this
is the honest distance of a policy to the target: KL(σ‖q) and KL(q‖σ) brackets whose width is
the log Z gap, not an on-policy estimate that cannot see the mass q misses.
"""

from __future__ import annotations

from typing import Any

import torch

from bayesalign.bounds import LogZBounds, iwae_bounds
from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import ConfigError, EmptySupportError, NoLogProbError
from bayesalign.reference import EXACT, Reference
from bayesalign.seeding import seeded
from bayesalign.sequences import Sequences
from bayesalign.targets import NO_CONTEXT, Target

from .base import batches, require_same_vocabulary


def log_z_bounds(
    target: Target,
    q: SequenceDistribution | None = None,
    *,
    num_samples: int = 64,
    num_runs: int = 100,
    exact_samples: Reference | Sequences | None = None,
    context: Any = NO_CONTEXT,
    chunk_size: int = 4096,
    seed: int | None = 0,
) -> LogZBounds:
    """IWAE bounds on log Z with K = ``num_samples`` draws of ``q`` (the prior by default) and
    the KL(q‖σ), KL(σ‖q) brackets they give (SPEC §11).

    The lower bound averages ``num_runs`` replicates; the upper bound one replicate per exact
    target draw in ``exact_samples`` (an ``"exact samples"`` `Reference` from `exact_reference`,
    or `Sequences` drawn exactly from the target, e.g. ``Rejection(...).fit(target).samples``).
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"log_z_bounds: num_samples (K) must be an integer >= 1, got {num_samples!r}")
    if not isinstance(num_runs, int) or num_runs < 1:
        raise ConfigError(f"log_z_bounds: num_runs must be an integer >= 1, got {num_runs!r}")
    if chunk_size < 1:
        raise ConfigError(f"log_z_bounds: chunk_size must be >= 1, got {chunk_size!r}")
    prior = target.prior(context)
    q = prior if q is None else q.given(context)
    require_same_vocabulary("q", q, prior)
    exact, log_score_exact = _exact_draws(target, exact_samples, context)
    log_q_exact = q.log_prob(exact).detach().double().cpu()
    k, n = num_samples, len(exact)
    with seeded(seed):
        log_w = _log_weights(target, prior, q, num_runs * k + n * (k - 1), context, chunk_size)
    runs, rest = log_w[: num_runs * k], log_w[num_runs * k:]
    return iwae_bounds(runs.reshape(num_runs, k), log_score_exact - log_q_exact,
                       rest.reshape(n, k - 1))


def _exact_draws(
    target: Target, exact_samples: Reference | Sequences | None, context: Any,
) -> tuple[Sequences, torch.Tensor]:
    """The exact target draws and their log P, checked to be draws of this target."""
    if exact_samples is None:
        raise ConfigError(
            f"log_z_bounds(target '{target.name}'): the upper bound on log Z needs exact target "
            "draws: pass exact_samples=exact_reference(target, bound=M, num_samples=n, "
            "context=...) with M ≥ max P/q (bound=1 for a hard constraint, or a reward r ≤ 0, "
            "with the prior as proposal), or the samples of Rejection(bound=M).fit(target)"
        )
    if isinstance(exact_samples, Reference):
        exact_samples.require_for(target, context)
        if exact_samples.kind != EXACT:
            raise ConfigError(
                f"log_z_bounds: exact_samples is a {exact_samples.kind!r} Reference (weighted "
                "draws of a proposal, not target draws); the upper bound needs exact samples: "
                "build it with exact_reference(target, bound=M)"
            )
        return exact_samples.samples, exact_samples.log_score.double().cpu()
    if not isinstance(exact_samples, Sequences) or len(exact_samples) == 0:
        raise ConfigError("log_z_bounds: exact_samples must be a Reference or non-empty Sequences "
                          f"of exact target draws, got {type(exact_samples).__name__}")
    log_score = target.log_score(exact_samples, context).detach().double().cpu()
    bad = ~torch.isfinite(log_score)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise EmptySupportError(
            f"log_z_bounds: exact sample {i} has log P = {float(log_score[i])} under target "
            f"'{target.name}'; exact target draws have P > 0 (were they drawn for another "
            "target or context?)"
        )
    return exact_samples, log_score


def _log_weights(
    target: Target, prior: SequenceDistribution, q: SequenceDistribution, total: int,
    context: Any, chunk_size: int,
) -> torch.Tensor:
    """``log P − log q`` of ``total`` fresh draws from q, in chunks."""
    chunks = []
    for size in batches(total, chunk_size, "log_z_bounds"):
        draws = q.sample_batch(size)
        if draws.log_q is None:
            raise NoLogProbError(
                f"log_z_bounds: q ({type(q).__name__}) draws carry no log q; the bounds need "
                "a proposal with exact log-probabilities"
            )
        log_q = draws.log_q.detach().double()
        log_score = target.log_score(draws, context, log_prior=log_q if q is prior else None)
        chunks.append((log_score.detach().double() - log_q).cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.float64)
