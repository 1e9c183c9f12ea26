"""Importance-sampling and distance estimators shared by every engine (SPEC §2.6, §4.2, §9).

All inputs are log-scores (``log P`` unnormalised target, ``log q`` proposal, ``log π`` policy)
as float64 tensors; every normalisation uses ``logsumexp``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .errors import EmptySupportError


def _finite_mass(log_w: torch.Tensor, what: str) -> torch.Tensor:
    log_w = torch.as_tensor(log_w, dtype=torch.float64)
    if log_w.numel() == 0 or not torch.isfinite(torch.logsumexp(log_w, 0)):
        raise EmptySupportError(
            f"{what}: all {log_w.numel()} importance weights are zero (every sample has "
            "log P = -inf, e.g. violates a hard constraint); draw more samples or use a "
            "proposal closer to the target"
        )
    return log_w


def ess(log_w: torch.Tensor) -> float:
    """Kish effective sample size ``(Σw)²/Σw²`` ∈ [1, N]."""
    log_w = _finite_mass(log_w, "ESS")
    return float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))


def log_mean_exp(log_w: torch.Tensor) -> float:
    return float(torch.logsumexp(log_w, 0) - math.log(log_w.numel()))


def log_z_estimate(log_w: torch.Tensor) -> tuple[float, float]:
    """``log Ẑ = log mean w`` and its delta-method standard error ``sd(w)/(√N·Ẑ)``."""
    log_w = _finite_mass(log_w, "log Z")
    log_z = log_mean_exp(log_w)
    ratio = torch.exp(log_w - log_z)
    se = float(ratio.std(unbiased=True) / math.sqrt(log_w.numel())) if log_w.numel() > 1 else math.inf
    return log_z, se


def khat_threshold(num_samples: int) -> float:
    """PSIS reliability threshold ``min(1 − 1/log10 S, 0.7)`` (SPEC §9, current version)."""
    return min(1 - 1 / math.log10(num_samples), 0.7) if num_samples > 10 else 0.0


def pareto_k(log_w: torch.Tensor) -> float:
    """PSIS Pareto k̂ of importance weights (Vehtari et al. 2024) via ``arviz.psislw``."""
    import arviz as az

    log_w = _finite_mass(log_w, "Pareto k̂").cpu().numpy()
    finite = np.sort(log_w[np.isfinite(log_w)])
    tail = math.ceil(min(0.2 * finite.size, 3 * math.sqrt(finite.size)))
    if finite.size < 5 or np.unique(finite[-tail:]).size < tail / 2:
        # The upper tail is made of a few repeated values (an atom at the largest weight, or the
        # finitely many weights of a small discrete world): the weights are bounded, there is no
        # heavy tail, and a generalised Pareto fit to tied values is meaningless.
        return -math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, k = az.psislw(finite.copy(), reff=1.0)
    return float(k)


def _normalise(log_w: torch.Tensor) -> torch.Tensor:
    return log_w - torch.logsumexp(log_w, 0)


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """Exact ``KL(p‖q)`` over an enumerated support; terms with p = 0 contribute 0."""
    log_p, log_q = log_p.double(), log_q.double()
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return float(terms.sum())


def tvd(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """Exact total variation ``½ Σ |p − q|`` over an enumerated support."""
    return float(0.5 * (log_p.double().exp() - log_q.double().exp()).abs().sum())


def is_kl_target_policy(log_P: torch.Tensor, log_q: torch.Tensor, log_pi: torch.Tensor) -> float:
    """``KL(p‖π) ≈ −log Ẑ + (1/(ẐN)) Σ w (log P − log π)``, samples from q (SPEC §2.6)."""
    log_w = _finite_mass(log_P - log_q, "KL(p‖π)")
    w_tilde = _normalise(log_w).exp()
    log_z = log_mean_exp(log_w)
    diff = torch.where(w_tilde > 0, log_P - log_pi, torch.zeros_like(log_P))
    return float(-log_z + (w_tilde * diff).sum())


def is_tvd(log_P: torch.Tensor, log_q: torch.Tensor, log_pi: torch.Tensor) -> float:
    """``TVD(p,π) ≈ ½ mean |π/q − w/Ẑ|``, samples from q (SPEC §2.6)."""
    log_w = _finite_mass(log_P - log_q, "TVD")
    log_z = log_mean_exp(log_w)
    return float(0.5 * (torch.exp(log_pi - log_q) - torch.exp(log_w - log_z)).abs().mean())


@dataclass
class Diagnostics:
    """What every `Posterior` reports; a field is None where it does not apply.

    Where the numbers come from (name every estimate by what it is computed from, DESIGN.md):

    - ``log_z``, ``ess``, ``pareto_k``: from the importance weights ``log P − log q`` of the
      engine's proposal draws (or of fresh policy draws); ``log_z_se = 0`` when ``log_z`` is
      exact (Exact's enumeration).
    - ``kl_target_policy``, ``tvd``: named by ``distances_from``:
      ``"law"`` — the law the engine declares (`Posterior.law`), enumerated over the support.
      For Exact, Rejection, QRS and BestOfN that law is a theorem about the sampler
      (p, p, p_β, π_BoN), so these numbers do not test the draws (tests compare the draws
      with the law: a χ² goodness-of-fit); for a trained policy it is π itself.
      ``"weighted samples"`` — the samples' weighted empirical law (SNIS), enumerated.
      ``"policy draws"`` — importance-sampling estimates from ``num_proposed`` fresh policy
      draws (SPEC §2.6). ``"proposal draws"`` — the engine's own importance-sampling estimates
      from its proposal draws (QRS: KL(p‖p_β) and TVD(p, p_β), SPEC §4.2). None: not known.
      Off enumerable worlds a policy's ``kl_target_policy`` is thus the on-policy estimate
      (self-normalised, from π's own draws): it cannot see target mass π does not sample and
      is small exactly when π has collapsed; the ``reference_*`` fields are the honest one.
    - ``reference_*``: from a `Reference` pool built once for the target and context
      (``evaluate(..., reference=...)``, SPEC §12): ``reference_kl_target_policy`` ± ``_se``
      and ``reference_tvd`` ± ``_se`` estimated on the pool's ``reference_num_samples`` draws;
      ``reference_kind`` says what the pool is: ``"exact samples"`` (y ~ p by Rejection; the
      se includes log Ẑ's) or ``"snis"`` (weighted prior draws, whose ``reference_ess`` and
      ``reference_pareto_k`` say when not to trust it: k̂ above SPEC §9's threshold for the
      pool's size, or an ESS below ``reference.MIN_REFERENCE_ESS``; ``warnings`` says so).
      Where fresh policy draws were made, ``reference_kl_policy_target`` ± ``_se`` is the
      reverse KL(π‖p) from them and the pool's log Ẑ (+inf, certainly, when a draw has P = 0),
      ``reference_outside_support`` ± ``_se`` π's mass where P = 0, and
      ``reference_kl_policy_target_in_support`` ± ``_se`` KL(π_S‖p) of π conditioned on p's
      support (`reference.ReverseDistance`): forward and reverse together tell a policy that
      misses p's mass from one that puts mass where p has little.
    - ``exact``: True when ``kl_target_policy``, ``tvd``, ``kl_policy_prior``, ``elbo``,
      ``rewards`` and ``moments`` were computed by enumerating the support (no Monte Carlo
      error in the computation) under the law ``distances_from`` names; False when they are
      estimates or averages over draws.
    - ``elbo`` is ``E_π[log P − log π] = E_π[log L] − KL(π‖a) ≤ log Z``: the KL-regularised RL
      objective divided by kl_coef (SPEC §1.1), equal to log Z exactly when π = p.
    - ``log_z_lower``, ``log_z_upper``: stochastic bounds on log Z where an engine has them
      (SPEC §11): values whose expectation over seeds is ≤ (resp. ≥) log Z, so one run may fall
      on either side by its Monte-Carlo error. SMC's ``log_z_lower`` is its log Ẑ (Ẑ unbiased, so
      E log Ẑ ≤ log Z by Jensen); ``inference.bounds.log_z_bounds`` gives both, with se, for any q.
    - ``extras``: numbers only some engines have (BestOfN's KL and win-rate bounds, DPG's
      running log Ẑ per context, per-context values of an amortised fit).
    """

    log_z: float | None = None
    log_z_se: float | None = None
    log_z_lower: float | None = None
    log_z_upper: float | None = None
    ess: float | None = None
    ess_fraction: float | None = None
    pareto_k: float | None = None
    pareto_k_threshold: float | None = None
    acceptance_rate: float | None = None
    acceptance_rate_se: float | None = None
    kl_target_policy: float | None = None
    kl_policy_prior: float | None = None
    tvd: float | None = None
    elbo: float | None = None
    rewards: dict[str, float] = field(default_factory=dict)
    moments: dict[str, list[float]] = field(default_factory=dict)
    num_proposed: int | None = None
    num_samples: int | None = None
    exact: bool = False
    distances_from: str | None = None
    reference_kl_target_policy: float | None = None
    reference_kl_target_policy_se: float | None = None
    reference_tvd: float | None = None
    reference_tvd_se: float | None = None
    reference_kind: str | None = None
    reference_num_samples: int | None = None
    reference_ess: float | None = None
    reference_pareto_k: float | None = None
    reference_kl_policy_target: float | None = None
    reference_kl_policy_target_se: float | None = None
    reference_kl_policy_target_in_support: float | None = None
    reference_kl_policy_target_in_support_se: float | None = None
    reference_outside_support: float | None = None
    reference_outside_support_se: float | None = None
    extras: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def check_pareto_k(self) -> None:
        """Warn when k̂ exceeds the SPEC §9 threshold: log Ẑ and IS estimates are unreliable."""
        if self.pareto_k is None or self.pareto_k_threshold is None:
            return
        if self.pareto_k > self.pareto_k_threshold:
            message = (
                f"Pareto k̂ = {self.pareto_k:.2f} exceeds {self.pareto_k_threshold:.2f} "
                f"for {self.num_proposed} draws: importance-sampling estimates (log Z, KL, "
                f"ESS) are unreliable; about {_min_samples(self.pareto_k)} draws would be needed"
            )
            self.warnings.append(message)
            warnings.warn(message, stacklevel=3)


def _min_samples(k: float) -> str:
    return f"{10 ** (1 / (1 - k)):.3g}" if k < 1 else "infinitely many"
