"""Two-sided bounds on log Z and bracketed KLs for any proposal q, from log-weights (SPEC §11).

With w = P/q, K draws y_k ~ q and one exact target draw y* ~ σ = P/Z (Grosse et al. 2015;
Zhao et al. 2024, ``iwae_backward``):

    E[log (1/K) Σ_k w(y_k)]                        ≤ log Z   (IWAE lower bound, Jensen)
    E[log (1/K)(w(y*) + Σ_{k=2..K} w(y_k))]        ≥ log Z   (IWAE upper bound)

both tightening as K grows. With F_q = E_q[log w] = log Z − KL(q‖σ) (the ELBO) and
G_q = E_σ[log w] = log Z + KL(σ‖q) (the EUBO), log Z ∈ [LB, UB] brackets both KLs:
KL(q‖σ) ∈ [LB − F_q, UB − F_q] and KL(σ‖q) ∈ [G_q − UB, G_q − LB]. Every number is a mean over
independent replicates, reported with its Monte-Carlo standard error. Maths only: the builder
that draws from q and from the target is ``bayesalign.inference.bounds.log_z_bounds``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class Interval:
    """``[low, high]`` with the Monte-Carlo standard error of each end."""

    low: float
    high: float
    low_se: float
    high_se: float

    def contains(self, value: float, num_se: float = 0.0) -> bool:
        """Whether ``value`` lies in the interval widened by ``num_se`` standard errors each side
        (an end equal to ``value`` contains it, also an infinite one)."""
        if value in (self.low, self.high):
            return True
        return self.low - num_se * self.low_se <= value <= self.high + num_se * self.high_se


@dataclass(frozen=True)
class LogZBounds:
    """Stochastic bounds on log Z and the KL brackets they give for one proposal q (SPEC §11).

    - ``log_z_lower`` ± ``_se``: mean over ``num_runs`` replicates of log Ẑ_K (IWAE from K =
      ``num_samples`` draws of q, or SMC with K particles; an estimate of a quantity ≤ log Z).
    - ``log_z_upper`` ± ``_se``: mean over ``num_exact`` replicates, one exact target draw each,
      of the IWAE upper bound or of conditional SMC's log Ẑ (an estimate of a quantity ≥ log Z).
    - ``elbo`` = E_q[log P − log q] ≤ log Z, ``eubo`` = E_σ[log P − log q] ≥ log Z, with se.
    - ``kl_q_target`` ⊇ KL(q‖σ) and ``kl_target_q`` ⊇ KL(σ‖q) in expectation: each end is an
      estimate with its se, so a bracket holds up to a few se.
    """

    log_z_lower: float
    log_z_lower_se: float
    log_z_upper: float
    log_z_upper_se: float
    elbo: float
    elbo_se: float
    eubo: float
    eubo_se: float
    kl_q_target: Interval
    kl_target_q: Interval
    num_samples: int
    num_runs: int
    num_exact: int
    method: str = "iwae"  # "iwae", or "smc" (SMC's log Ẑ and conditional SMC's)

    @property
    def gap(self) -> float:
        """``log_z_upper − log_z_lower``: how tightly log Z is pinned down (0 when q = σ)."""
        return self.log_z_upper - self.log_z_lower


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of independent replicates (se = inf if any is infinite, or n = 1)."""
    values = values.double()
    mean = float(values.mean())
    if not torch.isfinite(values).all() or len(values) < 2:
        return mean, math.inf
    return mean, float(values.std(unbiased=True) / math.sqrt(len(values)))


def _log_mean_exp_rows(log_w: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(log_w, -1) - math.log(log_w.shape[-1])


def iwae_bounds(
    log_w: torch.Tensor, log_w_exact: torch.Tensor, log_w_rest: torch.Tensor,
) -> LogZBounds:
    """IWAE bounds and KL brackets from log-weights ``log P − log q`` (float64):

    - ``log_w`` ``[R, K]``: R replicates of K draws from q (the lower bound and the ELBO);
    - ``log_w_exact`` ``[n]``: one exact target draw per upper-bound replicate (the EUBO);
    - ``log_w_rest`` ``[n, K − 1]``: the K − 1 draws from q joining each exact draw.
    """
    log_w, log_w_exact, log_w_rest = (torch.as_tensor(t).double() for t in
                                      (log_w, log_w_exact, log_w_rest))
    if log_w.dim() != 2 or log_w.shape[0] < 1 or log_w.shape[1] < 1:
        raise ConfigError(f"iwae_bounds: log_w must have shape [runs, K] with runs, K >= 1, got "
                          f"{tuple(log_w.shape)}")
    k = log_w.shape[1]
    if log_w_exact.dim() != 1 or len(log_w_exact) < 1 or log_w_rest.shape != (len(log_w_exact), k - 1):
        raise ConfigError(
            f"iwae_bounds: log_w_exact must have shape [n >= 1] and log_w_rest [n, K - 1] = "
            f"[n, {k - 1}], got {tuple(log_w_exact.shape)} and {tuple(log_w_rest.shape)}")
    upper = _log_mean_exp_rows(torch.cat([log_w_exact[:, None], log_w_rest], -1))
    return bounds_from_replicates(_log_mean_exp_rows(log_w), log_w.mean(-1), upper, log_w_exact,
                                  num_samples=k, method="iwae")


def bounds_from_replicates(
    lower: torch.Tensor, elbo: torch.Tensor, upper: torch.Tensor, eubo: torch.Tensor, *,
    num_samples: int, method: str,
) -> LogZBounds:
    """Means, se and KL brackets from independent replicates of each estimate:

    - ``lower`` ``[R]``: log Ẑ of R runs (IWAE or SMC), E ≤ log Z; ``elbo`` ``[R]``: one
      mean of log P − log q over K draws of q per run (paired with ``lower``);
    - ``upper`` ``[n]``: the upper-bound estimate of n runs, one exact target draw each
      (IWAE upper or conditional SMC), E ≥ log Z; ``eubo`` ``[n]``: log P − log q of that draw.

    Paired differences give the low ends their se; the high ends combine independent means.
    """
    lower, elbo, upper, eubo = (torch.as_tensor(t).double() for t in (lower, elbo, upper, eubo))
    # A draw of q with P = 0 (elbo = -inf) proves KL(q‖σ) = inf; an exact draw with q = 0
    # (log w = +inf) proves KL(σ‖q) = inf: keep those as inf rather than inf − inf = nan.
    kl_q_low = torch.where(elbo == -math.inf, math.inf, lower - elbo)
    kl_t_low = torch.where(eubo == math.inf, math.inf, eubo - upper)
    (lb, lb_se), (ub, ub_se) = mean_se(lower), mean_se(upper)
    (f, f_se), (g, g_se) = mean_se(elbo), mean_se(eubo)
    (kl_q, kl_q_se), (kl_t, kl_t_se) = mean_se(kl_q_low), mean_se(kl_t_low)
    kl_q_target = Interval(kl_q, ub - f, kl_q_se, math.hypot(ub_se, f_se))
    kl_target_q = Interval(kl_t, g - lb, kl_t_se, math.hypot(g_se, lb_se))
    return LogZBounds(lb, lb_se, ub, ub_se, f, f_se, g, g_se, kl_q_target, kl_target_q,
                      num_samples=num_samples, num_runs=len(lower), num_exact=len(upper),
                      method=method)
