"""`Reference`: a pool of target draws to measure any posterior against, and its estimator (SPEC §12).

On a non-enumerable prior a policy's own estimate of KL(p‖π) (importance weights P/π on π's
draws) cannot see target mass π does not sample. A reference pool can: built once per
(target, context) and reused for every engine and every checkpoint, it holds

- ``"exact samples"``: y_i ~ p exactly (Rejection with a valid bound), with log Ẑ and its se
  from the proposal draws; then ``KL(p‖π) ≈ mean_i(log P(y_i) − log π(y_i)) − log Ẑ``, the first
  term's se its sample std/√n and log Ẑ's se added in quadrature;
- ``"snis"``: y_i ~ q (the prior by default) with weights ``w_i = P/q``; the SPEC §2.6 estimates,
  trustworthy only when the weights are (its ESS and Pareto k̂ say when, SPEC §9).

The builders that run an engine live in ``bayesalign.inference.reference``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from . import diagnostics as dx
from .errors import ConfigError, EmptySupportError
from .sequences import Sequences
from .targets import Target

EXACT = "exact samples"
SNIS = "snis"
MIN_REFERENCE_ESS = 100  # below it an SNIS pool's estimates rest on a handful of draws


@dataclass(frozen=True, eq=False)  # a pool is compared by identity, as the target it is for
class Reference:
    """A pool of draws for one (target, context), with everything the estimator needs cached.

    - ``samples``: the pool; ``log_score``: log P(y_i) of each draw (float64), computed once so
      evaluating many policies never runs the prior or the scorers again.
    - ``kind``: ``"exact samples"`` (y_i ~ p) or ``"snis"`` (y_i ~ q, weighted by ``log_weights``
      = log P − log q).
    - ``log_z``, ``log_z_se``: log Ẑ and its standard error (exact: from the proposal draws
      that produced the pool; snis: from the pool's own weights).
    - ``target``, ``context``: what the pool was built for; evaluating another is refused.
    - ``method``: how it was built, in words (engine, bound, proposal, number of proposals).
    - ``num_proposed``: proposal draws spent on it.
    """

    samples: Sequences
    log_score: torch.Tensor
    log_z: float
    log_z_se: float
    kind: str
    target: Target
    context: Any = None
    method: str = ""
    log_weights: torch.Tensor | None = None
    num_proposed: int | None = None

    def __post_init__(self) -> None:
        if len(self.samples) == 0:
            raise EmptySupportError(
                f"Reference for target '{self.target.name}' has an empty pool: it needs at "
                "least one draw (build it with more num_samples)"
            )
        if self.kind not in (EXACT, SNIS):
            raise ConfigError(f"Reference kind must be {EXACT!r} or {SNIS!r}, got {self.kind!r}")
        if self.log_score.shape != (len(self.samples),):
            raise ConfigError(
                f"Reference log_score has shape {tuple(self.log_score.shape)}; it needs one "
                f"log P per pooled draw, shape ({len(self.samples)},)"
            )
        if self.kind == SNIS and (self.log_weights is None
                                  or self.log_weights.shape != self.log_score.shape):
            raise ConfigError("a 'snis' Reference needs log_weights (log P − log q), one per draw")
        if self.kind == EXACT:
            bad = ~torch.isfinite(self.log_score)
            if bad.any():
                i = int(bad.nonzero()[0])
                raise EmptySupportError(
                    f"Reference for target '{self.target.name}': exact draw {i} has log P = "
                    f"{float(self.log_score[i])}; exact target draws have P > 0"
                )
        if not math.isfinite(self.log_z):
            raise EmptySupportError(
                f"Reference for target '{self.target.name}' has log Ẑ = {self.log_z}: no "
                "proposal draw had target mass"
            )

    def __repr__(self) -> str:
        return (f"Reference({self.kind}, target={self.target.name}, context={self.context!r}, "
                f"n={len(self.samples)}, log_z={self.log_z:.4g}±{self.log_z_se:.2g})")

    @functools.cached_property
    def ess(self) -> float | None:
        """Kish ESS of an SNIS pool's weights (None for exact samples, whose ESS is n)."""
        return None if self.log_weights is None else dx.ess(self.log_weights)

    @functools.cached_property
    def pareto_k(self) -> float | None:
        """PSIS k̂ of an SNIS pool's weights (SPEC §9); above ``pareto_k_threshold``, distrust it."""
        return None if self.log_weights is None else dx.pareto_k(self.log_weights)

    @property
    def pareto_k_threshold(self) -> float:
        return dx.khat_threshold(len(self.samples))

    def untrusted(self) -> str | None:
        """Why an SNIS pool's estimates should not be trusted (SPEC §9), or None if they may be:
        k̂ above ``pareto_k_threshold`` or an ESS below ``MIN_REFERENCE_ESS``."""
        if self.kind != SNIS:
            return None
        reasons = []
        if self.pareto_k > self.pareto_k_threshold:
            reasons.append(f"Pareto k̂ = {self.pareto_k:.2f} exceeds {self.pareto_k_threshold:.2f}")
        if self.ess < MIN_REFERENCE_ESS:
            reasons.append(f"ESS = {self.ess:.1f} is below {MIN_REFERENCE_ESS}")
        if not reasons:
            return None
        return (
            f"the SNIS reference for target '{self.target.name}' ({len(self.samples)} draws) is "
            f"unreliable: {' and '.join(reasons)}; its KL(p‖π) and TVD may be far off. Use a "
            "larger pool, a proposal closer to the target, or exact_reference if the target "
            "has a known bound"
        )

    def require_for(self, target: Target, context: Any) -> None:
        """Refuse to measure a posterior of another target or context than the pool's."""
        if target is not self.target:
            raise ConfigError(
                f"reference= was built for target '{self.target.name}', not for the target "
                f"'{target.name}' being evaluated (another Target object); build a reference "
                "for this target"
            )
        if context != self.context:
            raise ConfigError(
                f"reference= was built for context {self.context!r}, not for context "
                f"{context!r}; build one reference per context"
            )


@dataclass(frozen=True)
class ReferenceDistances:
    """KL(p‖π) and TVD(p, π) estimated on a `Reference` pool, with standard errors."""

    kl_target_policy: float
    kl_target_policy_se: float
    tvd: float
    tvd_se: float
    kind: str
    num_samples: int
    ess: float | None = None
    pareto_k: float | None = None


@dataclass(frozen=True)
class ReverseDistance:
    """KL(π‖p) from π's own draws and a pool's log Ẑ (SPEC §12), with standard errors.

    A draw where P = 0 makes KL(π‖p) infinite (π has mass p has not: a broken hard constraint),
    so beside it stand ``outside_support``, π's mass where P = 0 (the draws' share), and
    ``kl_policy_target_in_support``, KL(π_S‖p) of π conditioned on p's support S: how far the
    part of π that meets the target is from p (a mode-seeking collapse shows here; the forward
    KL(p‖π) shows the mass π misses); None when no draw lies in S."""

    kl_policy_target: float
    kl_policy_target_se: float
    kl_policy_target_in_support: float | None
    kl_policy_target_in_support_se: float | None
    outside_support: float
    outside_support_se: float


def reverse_distance(reference: Reference, log_score: torch.Tensor,
                     log_pi: torch.Tensor) -> ReverseDistance:
    """KL(π‖p) = E_π[log π − log P] + log Z on π's draws (``log_score`` = log P and ``log_pi``
    = log π of each), with log Z the pool's log Ẑ, and its in-support part (`ReverseDistance`).

    With S = {P > 0}, s = the share of draws in S and d_i = log π_i − log P_i on them:
    KL(π_S‖p) = E_{π_S}[d] − log π(S) + log Z ≈ mean_S d − log s + log Ẑ,
    se² = var_S(d)/n_S + (1 − s)/(s n) + se(log Ẑ)² (delta method for log s)."""
    log_score = torch.as_tensor(log_score).detach().double().cpu().reshape(-1)
    log_pi = torch.as_tensor(log_pi).detach().double().cpu().reshape(-1)
    if log_pi.shape != log_score.shape:
        raise ConfigError(f"reverse_distance got {log_pi.numel()} values of log π for "
                          f"{log_score.numel()} of log P; it needs one of each per policy draw")
    n = log_pi.numel()
    if n == 0:
        raise ConfigError("reverse_distance needs at least one policy draw")
    inside = torch.isfinite(log_score)
    n_in = int(inside.sum())
    share = n_in / n
    outside, outside_se = 1 - share, math.sqrt(share * (1 - share) / n)
    kl_in = kl_in_se = None
    if n_in:
        d = log_pi[inside] - log_score[inside]
        kl_in = float(d.mean()) - math.log(share) + reference.log_z
        kl_in_se = math.sqrt(_std_error(d) ** 2 + (1 - share) / (share * n)
                             + reference.log_z_se ** 2)
    if n_in < n:  # certain, not estimated: a drawn y has π(y) > 0 = p(y)
        return ReverseDistance(math.inf, 0.0, kl_in, kl_in_se, outside, outside_se)
    return ReverseDistance(kl_in, kl_in_se, kl_in, kl_in_se, outside, outside_se)


def distances(reference: Reference, log_pi: torch.Tensor) -> ReferenceDistances:
    """KL(p‖π) and TVD(p, π) of a policy with log-probabilities ``log_pi`` on the pool (SPEC §12).

    Exact pool (y_i ~ p, d_i = log P_i − log π_i, r_i = π_i Ẑ / P_i = π/p):
    ``KL ≈ mean d − log Ẑ``, se² = var(d)/n + se(log Ẑ)²; ``TVD ≈ mean (1 − r)₊``, its se with
    the log Ẑ term's (delta method) added in quadrature. A draw with π = 0 makes KL infinite.
    SNIS pool (y_i ~ q, w_i = P_i/q_i): ``KL ≈ Σ w̃ d − log Ẑ`` and ``TVD ≈ mean (w/Ẑ − π/q)₊``;
    both terms come from the same draws, so their se is the delta method on both.

    TVD = Σ_y (p − π)₊ = E_p (1 − π/p)₊: each term lies in [0, 1], where SPEC §12's
    ½ E_p |1 − π/p| (equal when π lives on p's support) has terms up to π/p, unbounded on
    sequences π favours and p does not (a collapsed policy's modes), and leaves out the mass π
    puts where p is 0 (a policy that breaks a hard constraint).
    """
    log_pi = torch.as_tensor(log_pi).detach().double().cpu().reshape(-1)
    n = len(reference.samples)
    if log_pi.shape != (n,):
        raise ConfigError(f"log π has {log_pi.numel()} values for a pool of {n} draws")
    log_score = reference.log_score.double().cpu()
    if reference.kind == EXACT:
        kl, kl_se, tvd, tvd_se = _exact_pool(log_score, log_pi, reference.log_z,
                                             reference.log_z_se)
    else:
        kl, kl_se, tvd, tvd_se = _snis_pool(log_score, reference.log_weights.double().cpu(),
                                            log_pi)
    return ReferenceDistances(kl, kl_se, tvd, tvd_se, reference.kind, n,
                              reference.ess, reference.pareto_k)


def _std_error(values: torch.Tensor) -> float:
    if not torch.isfinite(values).all():
        return math.inf
    return float(values.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 else math.inf


def _exact_pool(log_score, log_pi, log_z, log_z_se):
    d = log_score - log_pi
    kl = float(d.mean()) - log_z
    kl_se = math.hypot(_std_error(d), log_z_se)
    ratio = torch.exp(log_pi + log_z - log_score)  # π/p
    terms = (1 - ratio).clamp(min=0)
    slope = float(-(ratio * (ratio < 1)).mean())  # ∂TVD/∂log Z
    tvd_se = math.hypot(_std_error(terms), slope * log_z_se)
    return kl, kl_se, float(terms.mean()), tvd_se


def _snis_pool(log_score, log_w, log_pi):
    log_z = dx.log_mean_exp(log_w)
    w = torch.exp(log_w - log_z)  # w_i / Ẑ, mean 1
    d = torch.where(w > 0, log_score - log_pi, torch.zeros_like(log_w))
    mean_d = float((w * d).mean())
    kl = mean_d - log_z
    # Delta method on KL = A/B − log B with A = mean(w d), B = mean(w): influence (w/B)(d − μ − 1).
    kl_se = _std_error(w * (d - mean_d - 1))
    pi_over_q = torch.exp(log_pi - (log_score - log_w))
    terms = (w - pi_over_q).clamp(min=0)
    # ∂/∂B of (w/B − π/q)₊ is −(w/B²)·1[w/B > π/q]: each draw adds −w·mean(ŵ·1[·])/B.
    slope = float((w * (w > pi_over_q)).mean())
    tvd_se = _std_error(terms - slope * w)
    return kl, kl_se, float(terms.mean()), tvd_se
