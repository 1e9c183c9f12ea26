"""Resampling schemes for SMC: normalised weights -> ancestor indices (SPEC §11 'Resampling').

Each scheme keeps E[offspring_i] = N·W_i (Douc, Cappé & Moulines 2005). Multinomial draws N
independent ancestors; stratified draws one uniform in each of N strata of [0, 1); systematic
shares one uniform across the strata; residual keeps ⌊N·W_i⌋ copies deterministically and draws
the remaining ones multinomially from the residual weights. Stratified, systematic and residual
have offspring-count variance no larger than multinomial's, and under systematic and residual a
particle with W_i ≥ 1/N always survives. All schemes are batched over leading dimensions and use
torch's global RNG (seed it with `bayesalign.seeding.seeded`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bayesalign.errors import ConfigError, InvalidDistributionError


def _checked(weights: torch.Tensor) -> torch.Tensor:
    """``weights`` as float64 rows summing to 1 (they may arrive unnormalised)."""
    weights = weights.double()
    if weights.dim() == 0 or weights.shape[-1] == 0:
        raise InvalidDistributionError("resampling needs at least one weight per row")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise InvalidDistributionError("resampling weights must be finite and non-negative")
    total = weights.sum(-1, keepdim=True)
    if (total <= 0).any():
        raise InvalidDistributionError("resampling weights sum to zero in some row")
    return weights / total


def _invert(weights: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Ancestors by inverting the cumulative weights at ``points`` in [0, 1) (one per particle)."""
    cumulative = torch.cumsum(weights, -1)
    index = torch.searchsorted(cumulative.contiguous(), points.contiguous(), right=True)
    # Rounding can leave the last cumulative weight just below 1.
    return index.clamp(max=weights.shape[-1] - 1)


def multinomial(weights: torch.Tensor) -> torch.Tensor:
    """N independent draws from the categorical law W."""
    flat = weights.reshape(-1, weights.shape[-1])
    index = torch.multinomial(flat, flat.shape[-1], replacement=True)
    return index.reshape(weights.shape)


def stratified(weights: torch.Tensor) -> torch.Tensor:
    """One uniform draw in each stratum [j/N, (j+1)/N)."""
    n = weights.shape[-1]
    u = torch.rand(weights.shape, dtype=weights.dtype, device=weights.device)
    return _invert(weights, (torch.arange(n, dtype=weights.dtype, device=weights.device) + u) / n)


def systematic(weights: torch.Tensor) -> torch.Tensor:
    """The grid (j + U)/N with one uniform U per row."""
    n = weights.shape[-1]
    u = torch.rand((*weights.shape[:-1], 1), dtype=weights.dtype, device=weights.device)
    return _invert(weights, (torch.arange(n, dtype=weights.dtype, device=weights.device) + u) / n)


def residual(weights: torch.Tensor) -> torch.Tensor:
    """⌊N·W_i⌋ copies of each particle, the remaining R draws multinomial on N·W_i − ⌊N·W_i⌋."""
    n = weights.shape[-1]
    flat = weights.reshape(-1, n)
    scaled = n * flat
    counts = torch.floor(scaled)
    remainder = scaled - counts
    # Rows whose copies already fill N draw nothing from their (all-zero) remainder.
    remainder = torch.where(remainder.sum(-1, keepdim=True) > 0, remainder, torch.ones_like(flat))
    remaining = (n - counts.sum(-1).long()).clamp(min=0)
    draws = torch.multinomial(remainder, n, replacement=True)
    used = torch.arange(n, device=flat.device) < remaining[:, None]
    counts = counts.long()
    counts.scatter_add_(-1, draws, used.long())
    # Particle j's ancestor is the first i whose cumulative count exceeds j.
    positions = torch.arange(n, device=flat.device).expand_as(counts)
    index = torch.searchsorted(torch.cumsum(counts, -1), positions.contiguous(), right=True)
    return index.clamp(max=n - 1).reshape(weights.shape)


SCHEMES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}


def check_scheme(scheme: str) -> None:
    """A `ConfigError` naming an unknown scheme and the known ones."""
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown resampling scheme {scheme!r}; choose one of {sorted(SCHEMES)}")


def resample(weights: torch.Tensor, scheme: str = "systematic") -> torch.Tensor:
    """Ancestor indices ``[..., N]`` for weights ``[..., N]`` (normalised per row if they are not)."""
    check_scheme(scheme)
    return SCHEMES[scheme](_checked(weights))
