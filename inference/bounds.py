"""`log_z_bounds`: two-sided bounds on log Z and bracketed KLs for any proposal or policy q.

Draws K-sample replicates from q (any `SequenceDistribution` with exact log q: the prior, an
adapted prior, a trained policy) and takes exact target draws (`exact_reference`, or Rejection's
samples) for the upper bound; the maths is in `bayesalign.bounds` (SPEC §11). On a real LM this
is the honest distance of a policy to the target: KL(σ‖q) and KL(q‖σ) brackets whose width is
the log Z gap, not an on-policy estimate that cannot see the mass q misses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bayesalign.bounds import LogZBounds, bounds_from_replicates, iwae_bounds
from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import ConfigError, EmptySupportError, NoLogProbError
from bayesalign.reference import EXACT, Reference
from bayesalign.seeding import seeded
from bayesalign.sequences import Sequences
from bayesalign.targets import NO_CONTEXT, Target

from .base import batches, require_same_vocabulary
from .smc import SMC


def log_z_bounds(
    target: Target,
    q: SequenceDistribution | None = None,
    *,
    num_samples: int = 64,
    num_runs: int = 100,
    exact_samples: Reference | Sequences | None = None,
    context: Any = NO_CONTEXT,
    method: str = "iwae",
    smc: SMC | None = None,
    chunk_size: int = 4096,
    seed: int | None = 0,
) -> LogZBounds:
    """IWAE bounds on log Z with K = ``num_samples`` draws of ``q`` (the prior by default) and
    the KL(q‖σ), KL(σ‖q) brackets they give (SPEC §11).

    The lower bound averages ``num_runs`` replicates; the upper bound one replicate per exact
    target draw in ``exact_samples`` (an ``"exact samples"`` `Reference` from `exact_reference`,
    or `Sequences` drawn exactly from the target, e.g. ``Rejection(...).fit(target).samples``).

    ``method="smc"``: the lower bound is the log Ẑ of `SMC` runs with K particles and proposal
    q, the upper bound conditional SMC's log Ẑ with particle 0 clamped to each exact draw (its
    other particles resampled multinomially, the clamped lineage always kept; SPEC §11;
    twisted-smc-lm's ``smc_backward``). ``smc`` sets the other SMC options (``ess_threshold``,
    ``resampling``, ``twist``, ``prefix_factors``; its ``num_particles`` and ``seed`` are
    replaced, and its
    ``proposal`` by q unless it is ``"twisted"`` with q the prior: then both bounds come from
    twisted SMC, whose conditional run clamps particle 0 the same way).
    The ELBO and EUBO are the same as for IWAE: K fresh draws of q per run, and the exact draws.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"log_z_bounds: num_samples (K) must be an integer >= 1, got {num_samples!r}")
    if not isinstance(num_runs, int) or num_runs < 1:
        raise ConfigError(f"log_z_bounds: num_runs must be an integer >= 1, got {num_runs!r}")
    if method not in ("iwae", "smc"):
        raise ConfigError(f"log_z_bounds: method must be 'iwae' or 'smc', got {method!r}")
    if chunk_size < 1:
        raise ConfigError(f"log_z_bounds: chunk_size must be >= 1, got {chunk_size!r}")
    prior = target.prior(context)
    q = prior if q is None else q.given(context)
    require_same_vocabulary("q", q, prior)
    exact, log_score_exact = _exact_draws(target, exact_samples, context)
    log_q_exact = q.log_prob(exact).detach().double().cpu()
    k, n = num_samples, len(exact)
    if method == "smc":
        return _smc_bounds(target, q, prior, exact, log_score_exact - log_q_exact, k, num_runs,
                           smc, context, chunk_size, seed)
    rows = max(num_runs, n)
    with seeded(seed):
        log_w = _log_weights(target, prior, q, rows * k, context, chunk_size).reshape(rows, k)
    # Common random numbers: upper replicate i puts y*_i in place of lower replicate i's first
    # draw, so each bound's replicates stay independent and the measured gap varies little.
    return iwae_bounds(log_w[:num_runs], log_score_exact - log_q_exact, log_w[:n, 1:])


def _smc_bounds(
    target: Target, q: SequenceDistribution, prior: SequenceDistribution, exact: Sequences,
    log_w_exact: torch.Tensor, k: int, num_runs: int, smc: SMC | None, context: Any,
    chunk_size: int, seed: int | None,
) -> LogZBounds:
    """SMC's log Ẑ (lower) and conditional SMC's (upper) over independent seeded runs."""
    if k < 2:
        raise ConfigError(f"log_z_bounds(method='smc'): num_samples is SMC's number of "
                          f"particles and must be >= 2, got {k}")
    options = {} if smc is None else {
        "ess_threshold": smc.ess_threshold, "resampling": smc.resampling, "twist": smc.twist,
        "prefix_factors": smc.prefix_factors}
    proposal = None if q is prior else q
    if smc is not None and smc.proposal == "twisted":
        if proposal is not None:
            raise ConfigError("log_z_bounds(method='smc'): smc.proposal='twisted' draws from "
                              "a·ψ, not from q; give q=None (the prior, whose ELBO and EUBO "
                              "are reported) or an SMC with no proposal")
        proposal = "twisted"
    base = 0 if seed is None else seed
    lower = []
    for r in range(num_runs):
        engine = SMC(num_particles=k, proposal=proposal, seed=base + r, **options)
        lower.append(_smc_log_z(engine, target, prior, context))
    tokens = torch.zeros(len(exact), _length(prior, exact), dtype=torch.long)
    tokens[:, : exact.tokens.shape[1]] = torch.where(exact.mask, exact.tokens, 0)
    upper = []
    for i in range(len(exact)):
        engine = _ConditionalSMC(num_particles=k, proposal=proposal, seed=base + num_runs + i,
                                 reference_path=tokens[i], **options)
        upper.append(_smc_log_z(engine, target, prior, context))
    with seeded(seed):
        log_w = _log_weights(target, prior, q, num_runs * k, context, chunk_size)
    return bounds_from_replicates(torch.tensor(lower), log_w.reshape(num_runs, k).mean(-1),
                                  torch.tensor(upper), log_w_exact, num_samples=k, method="smc")


def _length(prior: SequenceDistribution, exact: Sequences) -> int:
    """The prior's length in tokens (the longest sequence it makes), as SMC steps it."""
    length = getattr(prior, "length", None) or getattr(prior, "max_new_tokens", None)
    if length is None or exact.tokens.shape[1] > length:
        raise ConfigError(
            f"log_z_bounds(method='smc'): exact draws of {exact.tokens.shape[1]} tokens do not "
            f"fit the prior's length {length}")
    return length


def _smc_log_z(engine: SMC, target: Target, prior: SequenceDistribution, context: Any) -> float:
    """log Ẑ of one SMC run, without the posterior's diagnostics."""
    if isinstance(engine.proposal, SequenceDistribution):
        require_same_vocabulary("q", engine.proposal, prior)
    with seeded(engine.seed):
        particles = engine._start(prior, context)
        log_z, _ = engine._run(particles, target, context, prior)
    return log_z


@dataclass
class _ConditionalSMC(SMC):
    """Conditional SMC: particle 0 follows ``reference_path`` (an exact target draw) token by
    token and its lineage survives every resampling; the others are resampled multinomially
    from all N weights. E[log Ẑ] ≥ log Z when the path is drawn from σ (SPEC §11)."""

    reference_path: torch.Tensor | None = None  # [length] tokens, 0 past the draw's end

    def _ancestors(self, weights: torch.Tensor) -> torch.Tensor:
        others = torch.multinomial(weights, self.num_particles - 1, replacement=True)
        return torch.cat([torch.zeros(1, dtype=torch.long), others])

    def _draw(self, step_q: torch.Tensor, rows: torch.Tensor, t: int) -> torch.Tensor:
        token = super()._draw(step_q, rows, t)
        return torch.where(rows == 0, self.reference_path[t], token)


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
