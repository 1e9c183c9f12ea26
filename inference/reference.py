"""Build a `Reference` pool once per (target, context) by Rejection (exact) or Importance (SNIS).

SPEC §12: with a known bound M ≥ max P/q (1 for a hard constraint or a reward r ≤ 0 on the
prior) Rejection gives exact target draws and log Ẑ from its proposal draws; without one, a
large SNIS sample from the prior is the fallback, trustworthy only as far as its ESS and k̂ say.
Pass the result to ``evaluate(..., reference=...)`` or ``evaluate_policy``.
"""

from __future__ import annotations

from typing import Any

from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import ConfigError, NoLogProbError
from bayesalign.reference import EXACT, SNIS, Reference
from bayesalign.targets import NO_CONTEXT, Target

from .importance import Importance
from .rejection import Rejection


def exact_reference(
    target: Target,
    *,
    bound: float | None = None,
    num_samples: int = 1000,
    proposal: SequenceDistribution | None = None,
    context: Any = NO_CONTEXT,
    chunk_size: int = 4096,
    max_proposals: int | None = None,
    seed: int | None = 0,
) -> Reference:
    """``num_samples`` exact draws from ``target`` given ``context`` by Rejection with envelope
    ``bound`` = M ≥ max P/q (q = ``proposal``, the prior by default), with log Ẑ from every
    proposal draw. Rejection refuses a draw whose P/q exceeds the bound."""
    if bound is None:
        given = "no proposal" if proposal is None else "a proposal"
        raise ConfigError(
            f"exact_reference(target '{target.name}') got no bound and {given}: pass bound=M "
            "with M ≥ max P/q (bound=1 for a hard constraint or a reward r ≤ 0 with the prior "
            "as proposal; max P/q for proposal=q), or, for a target with no known bound, "
            "build snis_reference(target, num_samples=...) and read its ESS and Pareto k̂"
        )
    engine = Rejection(num_samples=num_samples, proposal=proposal, bound=bound,
                       chunk_size=chunk_size, max_proposals=max_proposals, seed=seed)
    posterior = engine.fit(target, context)
    samples = posterior.samples
    if proposal is None and samples.log_q is not None:
        # The draws came from the prior: their cached log q is log a, so the prior is not run again.
        log_score = target.log_score(samples, context, log_prior=samples.log_q.double())
    else:
        log_score = target.log_score(samples, context)
    diagnostics = posterior.diagnostics
    where = "the prior" if proposal is None else type(proposal).__name__
    return Reference(
        samples=samples, log_score=log_score.detach().double().cpu(), log_z=diagnostics.log_z,
        log_z_se=diagnostics.log_z_se, kind=EXACT, target=target, context=context,
        method=f"Rejection(bound={bound}) from {where}: {len(samples)} accepted of "
               f"{diagnostics.num_proposed} proposals",
        num_proposed=diagnostics.num_proposed,
    )


def snis_reference(
    target: Target,
    *,
    num_samples: int = 100_000,
    proposal: SequenceDistribution | None = None,
    context: Any = NO_CONTEXT,
    chunk_size: int = 4096,
    seed: int | None = 0,
) -> Reference:
    """``num_samples`` draws from ``proposal`` (the prior by default) weighted by P/q, for a
    target with no known bound; its ``ess`` and ``pareto_k`` say when not to trust it."""
    engine = Importance(num_samples=num_samples, proposal=proposal, chunk_size=chunk_size,
                        seed=seed)
    posterior = engine.fit(target, context)
    samples, log_w = posterior.samples, posterior.log_weights
    if samples.log_q is None:
        raise NoLogProbError(
            f"snis_reference(target '{target.name}'): the proposal's draws carry no log q (a "
            "Corpus prior); the reference needs log P of each draw, so give a proposal= with "
            "log-probabilities"
        )
    log_score = (log_w.double().cpu() + samples.log_q.detach().double().cpu())
    where = "the prior" if proposal is None else type(proposal).__name__
    return Reference(
        samples=samples, log_score=log_score, log_z=posterior.diagnostics.log_z,
        log_z_se=posterior.diagnostics.log_z_se, kind=SNIS, target=target, context=context,
        method=f"Importance from {where}: {len(samples)} weighted draws",
        log_weights=log_w.double().cpu(), num_proposed=len(samples),
    )

