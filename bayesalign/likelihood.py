"""Likelihood helpers: the factor sites a target multiplies into its prior (SPEC §1, §6).

Each helper is a `pyro.factor` with metadata in ``infer["bayesalign"]`` so engines and
diagnostics can read what a site means (a reward and its ``kl_coef``, a hard constraint, a
moment feature and its target mean) from the trace alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.poutine.messenger import Messenger

from .errors import ConfigError

if TYPE_CHECKING:
    from .sequences import Sequences

METADATA = "bayesalign"


def _factor(name: str, log_factor: torch.Tensor, **metadata: object) -> torch.Tensor:
    log_factor = torch.as_tensor(log_factor)
    unit = dist.Unit(log_factor, validate_args=False)
    pyro.sample(
        name,
        unit,
        obs=unit.sample(),
        infer={"is_auxiliary": True, METADATA: metadata},
    )
    return log_factor


def reward(name: str, r: torch.Tensor, kl_coef: float = 1.0) -> torch.Tensor:
    """Factor ``r(y)/kl_coef``: the Gibbs posterior ``a·exp(r/β)`` of KL-regularised RL (SPEC §1.1)."""
    if not kl_coef > 0:
        raise ConfigError(f"reward '{name}': kl_coef must be > 0, got {kl_coef}")
    r = torch.as_tensor(r)
    return _factor(name, r / kl_coef, kind="reward", reward=r, kl_coef=kl_coef)


def constraint(name: str, mask: torch.Tensor) -> torch.Tensor:
    """Factor ``log 1[b(y)]``: 0 where the constraint holds, −inf where it fails (SPEC §1.2)."""
    return _constraint(name, mask)


def prefix_constraint(
    name: str, y: Sequences, holds: Callable[[Sequences], torch.Tensor]
) -> torch.Tensor:
    """`constraint` ``log 1[b(y)]`` for a condition checkable on a prefix (SPEC §11).

    ``holds(s)`` gives one bool per row of ``s``: on complete sequences it is b(y), the factor
    every engine sees; `SMC` also calls it on prefixes, as the twist ψ_t = 1[prefix ok]. So it
    must fail on every extension of a prefix where it fails (a banned token or word, a length
    budget); then pruning a prefix loses no target mass and the weights still telescope to P/q.

    >>> ba.prefix_constraint("no_two", y, lambda s: ~((s.tokens == 2) & s.mask).any(-1))
    """
    if not callable(holds):
        raise ConfigError(f"prefix_constraint '{name}': holds must be a callable of Sequences")
    return _constraint(name, holds(y), prefix_check=holds)


def _constraint(name: str, mask: torch.Tensor, **metadata: object) -> torch.Tensor:
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool:
        if not ((mask == 0) | (mask == 1)).all():
            raise ConfigError(f"constraint '{name}': mask must be boolean or 0/1")
        mask = mask.bool()
    zeros = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device)
    return _factor(name, zeros.masked_fill(~mask, float("-inf")), kind="constraint", value=mask,
                   **metadata)


def moment(name: str, phi: torch.Tensor, mean: float | torch.Tensor) -> torch.Tensor:
    """Declare ``E_p[φ] = μ̄``: factor ``λ·φ(y)`` with λ fitted by the dual (SPEC §1.3).

    Until λ is given (``Target.with_lambdas``, `MomentLambdas`) the factor is 0: the site
    leaves the prior unchanged. ``phi`` is ``[batch]`` for one feature or ``[batch, k]`` for ``k``.
    """
    phi = torch.as_tensor(phi, dtype=torch.float64)
    mean = torch.as_tensor(mean, dtype=torch.float64)
    if phi.dim() == 2 and mean.shape != phi.shape[-1:]:
        raise ConfigError(f"moment '{name}': mean has shape {tuple(mean.shape)}, phi [B, k]")
    log_factor = torch.zeros(phi.shape[:1], dtype=torch.float64, device=phi.device)
    return _factor(name, log_factor, kind="moment", phi=phi, mean=mean)


def log_sigmoid_centered(r: torch.Tensor, ref: float | torch.Tensor) -> torch.Tensor:
    """LSC utility ``log σ(r − r_ref)`` = log P(good): a sum of them is a logical AND (SPEC §6)."""
    r = torch.as_tensor(r)
    return F.logsigmoid(r - torch.as_tensor(ref, dtype=r.dtype, device=r.device))


def reference_reward(
    rewards: torch.Tensor, quantile: float = 0.85, method: str = "empirical"
) -> torch.Tensor:
    """LSC's ``r_ref``: a quantile of the prior's rewards, per context (SPEC §6).

    ``rewards`` is ``[n]`` (one context) or ``[contexts, n]`` (rewards of n prior samples per
    context). ``method="empirical"`` takes the sample quantile; ``"gaussian"`` takes
    ``mean + std·Φ⁻¹(quantile)``, as the PAR reimplementation does. 0.85 is the paper's believed
    default [recall].
    """
    if not 0 < quantile < 1:
        raise ConfigError(f"reference quantile must be in (0, 1), got {quantile}")
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    if rewards.shape[-1] < 2 or not torch.isfinite(rewards).all():
        raise ConfigError("reference rewards need at least 2 finite prior samples per context")
    if method == "empirical":
        return torch.quantile(rewards, quantile, dim=-1)
    if method == "gaussian":
        z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(quantile, dtype=torch.float64))
        return rewards.mean(-1) + rewards.std(-1) * z
    raise ConfigError(f"method must be 'empirical' or 'gaussian', got {method!r}")


class MomentLambdas(Messenger):
    """Effect handler giving each `moment` site its factor ``λ·φ(y)``, like ``poutine.condition``.

    >>> with MomentLambdas({"has_two": torch.tensor(0.136)}):
    ...     trace = poutine.trace(model).get_trace()   # site "has_two" now adds 0.136·φ
    """

    def __init__(self, lambdas: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.lambdas = lambdas

    def _process_message(self, msg: dict) -> None:
        meta = (msg.get("infer") or {}).get(METADATA, {})
        if meta.get("kind") != "moment" or msg["name"] not in self.lambdas:
            return
        phi = meta["phi"]
        lam = torch.as_tensor(self.lambdas[msg["name"]], dtype=phi.dtype, device=phi.device)
        log_factor = phi * lam if phi.dim() == 1 else phi @ lam
        msg["fn"] = dist.Unit(log_factor, validate_args=False)
