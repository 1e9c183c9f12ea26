"""Rejection sampling (exact, SPEC §4.1) and quasi-rejection sampling (QRS, SPEC §4.2).

Both draw ``x ∼ q`` and accept with probability ``min(1, P(x)/(M q(x)))``; with ``M`` at least
``max P/q`` the accepted draws follow ``p`` exactly (Rejection, which checks the bound), and
below it they follow ``p_β ∝ min(P, β_q q)`` (QRS, whose distance to p shrinks as β_q grows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import ConfigError, EmptySupportError, require_positive
from bayesalign.evaluation import evaluate
from bayesalign.options import renamed_options
from bayesalign.posterior import Posterior
from bayesalign.seeding import seeded
from bayesalign.sequences import Sequences
from bayesalign.targets import NO_CONTEXT, Target

from .base import batches, one_context, resolve_proposal, weighted_draws


@dataclass
class _AcceptReject:
    """Shared loop: draw from q, accept with ``min(1, w/M)``, until enough are accepted."""

    num_samples: int = 1000  # accepted draws returned
    proposal: SequenceDistribution | None = None  # q; the prior by default
    chunk_size: int = 4096  # proposals drawn and scored at once
    max_proposals: int | None = None  # error after this many proposals (None: 1000 × num_samples)
    seed: int | None = 0  # seeds torch for the fit (None: the caller's RNG state)
    name: str = field(init=False, default="")

    def __post_init__(self) -> None:
        require_positive("num_samples", self.num_samples)
        require_positive("chunk_size", self.chunk_size)
        if self.max_proposals is not None:
            require_positive("max_proposals", self.max_proposals)

    def _log_envelope(self) -> float:
        raise NotImplementedError

    def _check(self, draws: Sequences, log_w: torch.Tensor, offset: int) -> None:
        """Engine-specific check of each chunk of log-weights (Rejection checks its bound)."""

    def _run(
        self, target: Target, context: Any
    ) -> tuple[Sequences, torch.Tensor, int, SequenceDistribution]:
        """The first ``num_samples`` accepted draws, the log-weights of every proposal, the
        number accepted and the proposal."""
        prior, proposal = resolve_proposal(target, self.proposal, context)
        log_m = self._log_envelope()
        limit = self.max_proposals or 1000 * self.num_samples
        accepted: list[Sequences] = []
        all_log_w: list[torch.Tensor] = []
        num_accepted = proposed = 0
        with seeded(self.seed):
            for size in batches(limit, self.chunk_size, self.name):
                draws, log_w = weighted_draws(target, prior, proposal, size, context)
                self._check(draws, log_w, proposed)
                accept = torch.rand(size, dtype=torch.float64).log() < (log_w - log_m).cpu()
                proposed += size
                all_log_w.append(log_w.cpu())
                if accept.any():
                    accepted.append(draws[accept.nonzero().squeeze(-1)])
                    num_accepted += int(accept.sum())
                if num_accepted >= self.num_samples:
                    break
        if num_accepted == 0:
            raise EmptySupportError(
                f"{self.name}: no sample accepted out of {proposed} proposals for target "
                f"'{target.name}' (zero target mass on every draw, or an acceptance rate far "
                "below 1/proposals); check the constraints or raise max_proposals"
            )
        samples = Sequences.cat(accepted)[: self.num_samples]
        return samples, torch.cat(all_log_w), num_accepted, proposal

    def _exact_law(self, target: Target, context: Any, proposal: SequenceDistribution):
        """``log min(P, M q) − log Z_M`` on enumerable worlds (= log p when M ≥ max P/q).

        The law the engine declares, a theorem about the sampler: the diagnostics' distances
        come from it (``distances_from="law"``), so they say nothing about the draws; the
        tests compare the draws with it (χ²).
        """
        if not target.is_enumerable(context):
            return None
        support = target.support(context)
        log_m = self._log_envelope()

        def log_clipped(y: Sequences) -> torch.Tensor:
            log_q = proposal.log_prob(y).detach().double()
            return torch.minimum(target.log_score(y, context), log_q + log_m)

        log_z_m = float(torch.logsumexp(log_clipped(support), 0))
        return lambda y: log_clipped(y) - log_z_m


@renamed_options(batch_size="chunk_size")
@dataclass
class Rejection(_AcceptReject):
    """Exact rejection sampling with envelope ``bound`` = M ≥ max P/q; errors if a draw exceeds it."""

    bound: float = 1.0  # M ≥ max P/q (1 for a hard constraint or a reward r ≤ 0 on the prior)

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("bound", self.bound)
        self.name = "Rejection"

    def _log_envelope(self) -> float:
        return math.log(self.bound)

    def _check(self, draws: Sequences, log_w: torch.Tensor, offset: int) -> None:
        over = log_w > self._log_envelope() + 1e-9
        if over.any():
            i = int(over.nonzero()[0])
            raise ConfigError(
                f"Rejection: sample {offset + i} has P/q = {math.exp(float(log_w[i])):.6g} > "
                f"bound {self.bound}; the samples would not follow the target. Raise the bound "
                "(acceptance rate = Z/bound) or use QRS, which allows it"
            )

    def fit(self, target: Target, context: Any = NO_CONTEXT, *, contexts: Any = None) -> Posterior:
        one_context(self.name, contexts)
        _, proposal = resolve_proposal(target, self.proposal, context)
        if target.is_enumerable(context):
            support = target.support(context)
            self._check(support, target.log_score(support, context)
                        - proposal.log_prob(support).detach().double(), 0)
        samples, log_w, accepted, proposal = self._run(target, context)
        law = self._exact_law(target, context, proposal)
        diagnostics = evaluate(target, samples, context=context, law=law,
                               proposal_log_weights=log_w, num_accepted=accepted)
        return Posterior(samples, engine=self.name, diagnostics=diagnostics, target=target,
                         context=context, proposal_log_weights=log_w, law=law,
                         config={"bound": self.bound, "num_samples": self.num_samples})


@renamed_options(batch_size="chunk_size")
@dataclass
class QRS(_AcceptReject):
    """Quasi-rejection sampling: accept with ``min(1, P/(β_q q))``; exact as β_q → max P/q."""

    qrs_beta: float = 1.0  # β_q: acceptance min(1, P/(β_q q)); larger is more exact, slower

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("qrs_beta", self.qrs_beta)
        self.name = "QRS"

    def _log_envelope(self) -> float:
        return math.log(self.qrs_beta)

    def fit(self, target: Target, context: Any = NO_CONTEXT, *, contexts: Any = None) -> Posterior:
        one_context(self.name, contexts)
        samples, log_w, accepted, proposal = self._run(target, context)
        law = self._exact_law(target, context, proposal)
        diagnostics = evaluate(target, samples, context=context, law=law,
                               proposal_log_weights=log_w, num_accepted=accepted)
        if diagnostics.tvd is None:
            # No law to enumerate: the distances are SPEC §4.2's estimates of TVD(p, p_β) and
            # KL(p‖p_β) from the proposal draws.
            curve = qrs_estimates(log_w, [self.qrs_beta])
            diagnostics = replace(diagnostics, tvd=curve.tvd[0], kl_target_policy=curve.kl[0],
                                  distances_from="proposal draws")
        return Posterior(samples, engine=self.name, diagnostics=diagnostics, target=target,
                         context=context, proposal_log_weights=log_w, law=law,
                         config={"qrs_beta": self.qrs_beta, "num_samples": self.num_samples})

    def sweep(
        self, target: Target, qrs_betas: list[float], context: Any = NO_CONTEXT,
        num_bootstrap: int = 200,
    ) -> QRSCurves:
        """Acceptance, TVD(p,p_β) and KL(p‖p_β) for every β_q from one proposal sample (SPEC §4.2)."""
        for b in qrs_betas:
            require_positive("qrs_beta", b)
        prior, proposal = resolve_proposal(target, self.proposal, context)
        with seeded(self.seed):
            _, log_w = weighted_draws(target, prior, proposal, self.num_samples, context)
            log_w = log_w.cpu()
            curves = qrs_estimates(log_w, qrs_betas)
            index = torch.randint(len(log_w), (num_bootstrap, len(log_w)))
        # Chunks of bootstrap rows bound the memory: rows × len(β) × N float64 temporaries.
        chunks = [_qrs_estimates_batched(log_w[rows], qrs_betas) for rows in index.split(16)]
        boot = (torch.cat([c[i] for c in chunks]) for i in range(3))
        curves.acceptance_rate_se, curves.tvd_se, curves.kl_se = (b.std(0).tolist() for b in boot)
        return curves


@dataclass
class QRSCurves:
    """IS estimates of QRS's trade-off at each β_q, with bootstrap standard errors."""

    qrs_beta: list[float]
    acceptance_rate: list[float]
    tvd: list[float]
    kl: list[float]
    acceptance_rate_se: list[float] | None = None
    tvd_se: list[float] | None = None
    kl_se: list[float] | None = None


def qrs_estimates(log_w: torch.Tensor, qrs_betas: list[float]) -> QRSCurves:
    """SPEC §4.2 estimators from ``log w = log P − log q`` of draws from q."""
    ar, tvd, kl = _qrs_estimates_batched(log_w.double().unsqueeze(0), qrs_betas)
    return QRSCurves(list(qrs_betas), ar[0].tolist(), tvd[0].tolist(), kl[0].tolist())


def _qrs_estimates_batched(
    log_w: torch.Tensor, qrs_betas: list[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AR, TVD and KL for each row of ``log_w`` [rows, N] and each β_q: ``[rows, len(β)]``."""
    n = log_w.shape[-1]
    log_z = torch.logsumexp(log_w, -1, keepdim=True) - math.log(n)
    w_over_z = torch.exp(log_w - log_z).unsqueeze(1)
    log_betas = torch.tensor([math.log(b) for b in qrs_betas], dtype=log_w.dtype)
    log_clip = torch.minimum(log_w.unsqueeze(1), log_betas[:, None])
    log_z_beta = torch.logsumexp(log_clip, -1, keepdim=True) - math.log(n)
    ar = torch.exp(log_z_beta.squeeze(-1) - log_betas)
    tvd = 0.5 * (w_over_z - torch.exp(log_clip - log_z_beta)).abs().mean(-1)
    # KL(p‖p_β) = −log Ẑ + mean[(w/Ẑ)(log w − log min(w, β_q) + log Ẑ_β)]
    terms = torch.where(
        w_over_z > 0, w_over_z * (log_w.unsqueeze(1) - log_clip + log_z_beta), 0.0
    )
    kl = terms.mean(-1) - log_z
    return ar, tvd, kl
