"""`fit_moments`: fit the natural parameters λ of GDC moment constraints by the convex dual (SPEC §1.3).

A target's ``ba.moment`` sites declare ``E_p[φ] = μ̄``; the I-projection of the rest of the target
onto those constraints is ``p_λ ∝ a · b · exp(λ·φ)`` (SPEC §1.2: ``b`` = the other factor sites,
so a hard constraint plus moments is the hybrid EBM). λ minimises the convex dual

    L(λ) = log Z(λ) − λ·μ̄,   ∇L = μ(λ) − μ̄,   ∇²L = Cov_{p_λ}(φ) ⪰ 0,

which we minimise by damped Newton in float64: exactly over an enumerable support, or by SNIS on
one fixed sample ``x_i ∼ q`` with weights ``w_i(λ) = a(x_i) b(x_i) exp(λ·φ(x_i)) / q(x_i)``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from bayesalign.diagnostics import ess
from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import (
    ConfigError,
    EmptySupportError,
    InvalidFactorError,
    NotEnumerableError,
    require_positive,
)
from bayesalign.seeding import seeded
from bayesalign.sequences import Sequences
from bayesalign.targets import NO_CONTEXT, Target

from .base import batches, resolve_proposal

# A tilt exp(λ·φ) spanning more than e^700 over the sample overflows float64: λ is diverging.
MAX_LOG_TILT = 700.0
# Armijo constant and the rounding slack (in ulps of L) below which a step cannot be judged.
ARMIJO = 1e-4
ROUNDING_SLACK = 16 * torch.finfo(torch.float64).eps
MIN_STEP = 2.0**-60


@dataclass
class MomentFit:
    """Fitted λ per moment site and what the fit achieved.

    ``moments`` are the achieved ``E_{p_λ}[φ]`` (exact, or SNIS on the fit's sample), ``mean``
    the declared μ̄, ``log_z`` the log-normaliser of the fitted target (log Ẑ under SNIS);
    ``ess``/``ess_fraction`` describe the final SNIS weights (None when exact) and
    ``dual_history`` holds L(λ) at the start and after each Newton step.
    """

    lambdas: dict[str, torch.Tensor]
    target: Target
    moments: dict[str, torch.Tensor]
    mean: dict[str, torch.Tensor]
    log_z: float
    ess: float | None
    ess_fraction: float | None
    dual_history: list[float] = field(default_factory=list)
    exact: bool = True
    iterations: int = 0


@dataclass
class _Features:
    """The fixed sample the dual is computed on: stacked features and base log-weights."""

    phi: torch.Tensor  # [N, K]: every moment site's features, side by side
    mean: torch.Tensor  # [K]
    log_base: torch.Tensor  # [N]: log a + other factors (− log q under SNIS)
    sites: dict[str, tuple[slice, torch.Size]]  # site -> its columns and the shape of its μ̄
    num_draws: int  # N for SNIS (Ẑ is a mean), 0 when exact (Z is a sum)

    def coordinate(self, j: int) -> str:
        for name, (cols, shape) in self.sites.items():
            if cols.start <= j < cols.stop:
                return f"moment '{name}'" + (f"[{j - cols.start}]" if len(shape) else "")
        raise IndexError(j)

    def per_site(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: flat[cols].reshape(shape).clone() for name, (cols, shape) in self.sites.items()}


def fit_moments(
    target: Target,
    *,
    context: Any = NO_CONTEXT,
    num_samples: int | None = None,
    proposal: SequenceDistribution | None = None,
    seed: int | None = 0,
    tolerance: float = 1e-10,
    max_iterations: int = 200,
    chunk_size: int | None = None,
    batch_size: int | None = None,
) -> MomentFit:
    """Fit λ jointly for every ``ba.moment`` site of ``target`` so that ``E_p[φ] = μ̄`` (SPEC §1.3).

    Exact by enumeration when ``num_samples`` is None (the prior must be enumerable); otherwise
    SNIS on ``num_samples`` draws from ``proposal`` (the prior by default). Stops when
    ``max |μ(λ) − μ̄| < tolerance``; the other factor sites stay in the weights, so λ fits the
    full target ``a · b · exp(λ·φ)``. Returns the fitted target in ``MomentFit.target``.
    ``chunk_size`` draws are scored at a time (default 4096; ``batch_size`` is its old name).
    """
    chunk_size = _chunk_size(chunk_size, batch_size)
    require_positive("tolerance", tolerance)
    require_positive("max_iterations", max_iterations)
    exact = num_samples is None
    if exact:
        if proposal is not None:
            raise ConfigError("fit_moments: a proposal is only used with num_samples (SNIS)")
        if not target.is_enumerable(context):
            raise NotEnumerableError(
                f"fit_moments: the prior of target '{target.name}' cannot be enumerated; pass "
                "num_samples to fit λ by SNIS on draws from the prior or a proposal"
            )
        features = _enumerated_features(target, context)
        where = f"the {len(features.log_base)} sequences of the support with non-zero target mass"
    else:
        require_positive("num_samples", num_samples)
        require_positive("chunk_size", chunk_size)
        with seeded(seed):
            features = _sampled_features(target, context, num_samples, proposal, chunk_size)
        where = f"the {len(features.log_base)} of {num_samples} draws with non-zero weight"
    active = _check_feasible(features, where)
    lam, history = _newton(features, _initial_lambdas(target, features), active, tolerance,
                           max_iterations, where)
    log_w = features.log_base + features.phi @ lam
    log_z = float(torch.logsumexp(log_w, 0)) - (math.log(features.num_draws) if not exact else 0.0)
    lambdas = features.per_site(lam)
    sample_ess = None if exact else ess(log_w)
    return MomentFit(
        lambdas=lambdas,
        target=target.with_lambdas(lambdas),
        moments=features.per_site(_moments(features, lam)),
        mean=features.per_site(features.mean),
        log_z=log_z,
        ess=sample_ess,
        ess_fraction=None if exact else sample_ess / features.num_draws,
        dual_history=history,
        exact=exact,
        iterations=len(history) - 1,
    )


def _chunk_size(chunk_size: int | None, batch_size: int | None) -> int:
    """``chunk_size``, or for one release its old name ``batch_size`` (with a DeprecationWarning)."""
    if batch_size is None:
        return 4096 if chunk_size is None else chunk_size
    if chunk_size is not None:
        raise ConfigError("fit_moments: batch_size= is the old name of chunk_size=; give chunk_size= only")
    warnings.warn("fit_moments(batch_size=...) is deprecated and will be removed in the next release; "
                  "use chunk_size=", DeprecationWarning, stacklevel=3)
    return batch_size


def _enumerated_features(target: Target, context: Any) -> _Features:
    support = target.support(context)
    phi, mean, log_other, sites = _split_factors(target, support, context)
    return _live(target, phi, mean, support.log_q.double().cpu() + log_other, sites, 0)


def _sampled_features(target: Target, context: Any, num_samples: int,
                      proposal: SequenceDistribution | None, chunk_size: int) -> _Features:
    prior, proposal = resolve_proposal(target, proposal, context)
    phis, log_bases = [], []
    for size in batches(num_samples, chunk_size, "fit_moments"):
        draws = proposal.sample_batch(size)
        log_q = draws.log_q.double().cpu()
        log_prior = log_q if proposal is prior else prior.log_prob(draws).detach().double().cpu()
        phi, mean, log_other, sites = _split_factors(target, draws, context)
        phis.append(phi)
        log_bases.append(log_prior + log_other - log_q)
    return _live(target, torch.cat(phis), mean, torch.cat(log_bases), sites, num_samples)


def _split_factors(
    target: Target, y: Sequences, context: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, tuple[slice, torch.Size]]]:
    """Moment features ``[N, K]`` with their μ̄, and the summed log-factor of the other sites."""
    columns, means, sites = [], [], {}
    log_other = torch.zeros(len(y), dtype=torch.float64)
    for name, site in target.factors(y, context).items():
        if site.kind != "moment":
            log_other = log_other + site.log_factor.detach().double().cpu()
            continue
        phi = site.metadata["phi"].detach().double().cpu().reshape(len(y), -1)
        mean = torch.as_tensor(site.metadata["mean"], dtype=torch.float64).cpu()
        if mean.numel() != phi.shape[1]:
            raise ConfigError(
                f"moment '{name}': mean has {mean.numel()} values for {phi.shape[1]} feature(s)"
            )
        if torch.isnan(mean).any() or torch.isinf(mean).any():
            raise ConfigError(f"moment '{name}': mean must be finite, got {mean.tolist()}")
        bad = ~torch.isfinite(phi).all(-1)
        if bad.any():
            index = int(bad.nonzero()[0])
            raise InvalidFactorError(
                f"moment '{name}': φ is {phi[index].tolist()} for sample {index} "
                f"({int(bad.sum())} of {len(y)} samples); features must be finite"
            )
        start = sum(c.shape[1] for c in columns)
        sites[name] = (slice(start, start + phi.shape[1]), mean.shape)
        columns.append(phi)
        means.append(mean.reshape(-1))
    if not sites:
        raise ConfigError(
            f"fit_moments: target '{target.name}' has no moment sites; declare one with "
            "ba.moment(name, phi, mean)"
        )
    return torch.cat(columns, 1), torch.cat(means), log_other, sites


def _live(target: Target, phi: torch.Tensor, mean: torch.Tensor, log_base: torch.Tensor,
          sites: dict[str, tuple[slice, torch.Size]], num_draws: int) -> _Features:
    """Keep the rows with non-zero base mass: the others carry no weight for any λ."""
    live = torch.isfinite(log_base)
    if not live.any():
        raise EmptySupportError(
            f"fit_moments: all {len(log_base)} sequences have zero mass under the other factor "
            f"sites of target '{target.name}' (e.g. every one violates a hard constraint)"
        )
    return _Features(phi[live], mean, log_base[live], sites, num_draws)


def _check_feasible(features: _Features, where: str) -> torch.Tensor:
    """μ̄ strictly inside the range of each feature coordinate; returns the non-constant coordinates.

    A coordinate that is constant on the support is fitted only if μ̄ equals it (λ stays 0).
    """
    low, high = features.phi.min(0).values, features.phi.max(0).values
    for j, (lo, hi, target_mean) in enumerate(zip(low.tolist(), high.tolist(), features.mean.tolist())):
        if lo < target_mean < hi or lo == target_mean == hi:
            continue
        raise ConfigError(
            f"{features.coordinate(j)}: μ̄ = {target_mean:.6g} is not strictly inside the range "
            f"[{lo:.6g}, {hi:.6g}] of φ over {where}, so λ would be infinite. Choose μ̄ strictly "
            "between the least and greatest value φ takes (for a binary feature 0 < μ̄ < 1; "
            "μ̄ = 1 is a hard constraint: use ba.constraint); under SNIS every feature value must "
            "occur in the sample (SPEC §1.3): draw more samples or use a proposal that produces it"
        )
    return high > low


def _initial_lambdas(target: Target, features: _Features) -> torch.Tensor:
    """Start from the target's current λ where it has them (a warm restart), else from 0."""
    lam = torch.zeros_like(features.mean)
    for name, (cols, _) in features.sites.items():
        if target.lambdas.get(name) is not None:
            lam[cols] = torch.as_tensor(target.lambdas[name], dtype=torch.float64).reshape(-1)
    return lam


def _dual(features: _Features, lam: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``L(λ) = log Z(λ) − λ·μ̄`` and the normalised weights of ``p_λ`` on the sample.

    Computed as ``log Σ b_i exp(λ·(φ_i − μ̄))`` so log Z and λ·μ̄ never cancel in float64.
    """
    log_w = features.log_base + (features.phi - features.mean) @ lam
    log_norm = torch.logsumexp(log_w, 0)
    log_n = math.log(features.num_draws) if features.num_draws else 0.0
    return float(log_norm) - log_n, torch.exp(log_w - log_norm)


def _moments(features: _Features, lam: torch.Tensor) -> torch.Tensor:
    return _dual(features, lam)[1] @ features.phi


def _newton(features: _Features, lam: torch.Tensor, active: torch.Tensor, tolerance: float,
            max_iterations: int, where: str) -> tuple[torch.Tensor, list[float]]:
    """Damped Newton on the dual with Armijo backtracking; L(λ) never increases beyond rounding."""
    lam = torch.where(active, lam, torch.zeros_like(lam))
    phi = features.phi[:, active]
    spread = (features.phi.max(0).values - features.phi.min(0).values)[active]
    loss, p = _dual(features, lam)
    history = [loss]
    for _ in range(max_iterations):
        mu = p @ phi
        gradient = mu - features.mean[active]
        if gradient.abs().max() < tolerance:
            return lam, history
        centred = phi - mu
        hessian = (p[:, None] * centred).T @ centred
        # A ridge keeps the step defined when features are affinely dependent; along such a null
        # direction a μ̄ off the hull's affine span sends λ to infinity, caught below.
        ridge = 1e-12 * float(hessian.diagonal().max()) + 1e-300
        direction = -torch.linalg.solve(hessian + ridge * torch.eye(len(mu), dtype=mu.dtype), gradient)
        slope = float(gradient @ direction)
        step = 1.0
        while True:
            candidate = lam.clone()
            candidate[active] = lam[active] + step * direction
            new_loss, new_p = _dual(features, candidate)
            if new_loss <= loss + ARMIJO * step * slope + ROUNDING_SLACK * max(1.0, abs(loss)):
                break
            step /= 2
            if step < MIN_STEP:
                raise ConfigError(_stalled(features, lam, gradient, active, tolerance, where))
        lam, loss, p = candidate, new_loss, new_p
        history.append(loss)
        tilt = lam[active].abs() * spread
        if (tilt > MAX_LOG_TILT).any():
            raise ConfigError(_diverged(features, lam, p @ features.phi, active, tilt, where))
    gradient = p @ phi - features.mean[active]
    if gradient.abs().max() < tolerance:
        return lam, history
    raise ConfigError(
        f"fit_moments did not converge in {max_iterations} Newton steps: "
        + _residual(features, gradient, active, tolerance)
        + f". λ = {lam.tolist()}; if λ keeps growing, μ̄ lies on or outside the boundary of the "
        f"convex hull of φ over {where}; otherwise raise max_iterations or tolerance"
    )


def _residual(features: _Features, gradient: torch.Tensor, active: torch.Tensor, tolerance: float) -> str:
    worst = int(gradient.abs().argmax())
    j = int(active.nonzero()[worst])
    return (
        f"max |μ(λ) − μ̄| = {float(gradient.abs().max()):.3g} at {features.coordinate(j)} "
        f"(tolerance {tolerance:g})"
    )


def _stalled(features: _Features, lam: torch.Tensor, gradient: torch.Tensor,
             active: torch.Tensor, tolerance: float, where: str) -> str:
    return (
        "fit_moments stalled: no Newton step decreases the dual, "
        + _residual(features, gradient, active, tolerance)
        + f", λ = {lam.tolist()}. The tolerance is below what float64 resolves on {where}, or "
        "μ̄ lies on the boundary of the convex hull of φ"
    )


def _diverged(features: _Features, lam: torch.Tensor, moments: torch.Tensor,
              active: torch.Tensor, tilt: torch.Tensor, where: str) -> str:
    coordinates = [features.coordinate(int(j)) for j in active.nonzero()[tilt > MAX_LOG_TILT]]
    return (
        f"{', '.join(coordinates)}: λ diverges (λ = {lam.tolist()}): μ̄ = "
        f"{features.mean.tolist()} is not strictly inside the convex hull of φ over {where}, "
        "although each coordinate is within its own range (the features are jointly "
        f"infeasible, e.g. linearly dependent); the moments reached are {moments.tolist()}"
    )
