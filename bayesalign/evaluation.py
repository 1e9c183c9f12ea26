"""`evaluate`: the one function that computes the `Diagnostics` of every engine's output.

It is a function of what an engine produced (draws, their weights, the law they follow where
it is known, the proposal's weights), not of a `Posterior`: engines call it and then build
their `Posterior` complete. Distances (KL(p‖π), TVD, KL(π‖a)) and reward/moment expectations
are computed by enumeration when the prior is enumerable and the law (or the weighted
empirical law) is known, and estimated from fresh policy draws or averaged over the samples
otherwise (SPEC §2.6, §9); ``Diagnostics.distances_from`` says which. Given a `Reference`
pool, it also measures the law against it (``Diagnostics.reference_*``, SPEC §12): the honest
distance off enumerable worlds, where the on-policy estimate cannot see the mass π misses.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import diagnostics as dx
from .diagnostics import Diagnostics
from .distribution import SequenceDistribution
from .errors import ConfigError
from .reference import (
    Reference,
    ReferenceDistances,
    ReverseDistance,
    distances,
    reverse_distance,
)
from .sequences import Sequences
from .targets import NO_CONTEXT, FactorSite, Target

EVALUATION_SAMPLES = 4096

LogProb = Callable[[Sequences], torch.Tensor]


def evaluate(
    target: Target,
    samples: Sequences,
    *,
    context: Any = NO_CONTEXT,
    log_weights: torch.Tensor | None = None,
    law: LogProb | None = None,
    proposal_log_weights: torch.Tensor | None = None,
    num_proposed: int | None = None,
    num_accepted: int | None = None,
    exact_log_z: float | None = None,
    policy: SequenceDistribution | None = None,
    eval_samples: int = EVALUATION_SAMPLES,
    reference: Reference | None = None,
) -> Diagnostics:
    """Diagnostics of ``samples`` as an approximation of ``target`` given ``context``.

    - ``log_weights``: the samples' unnormalised log-weights (SNIS, Exact); None when they are
      equally weighted.
    - ``law``: log-probability of the distribution the engine declares its samples follow,
      where it is known exactly (Exact, Rejection: p; QRS: p_β; BestOfN: π_BoN; a policy: π).
      On enumerable worlds the distances are those of this law (``distances_from="law"``);
      without it, those of the weighted empirical law of ``samples``.
    - ``proposal_log_weights``: ``log P − log q`` of every proposal draw, for log Ẑ, ESS and
      k̂; ``num_proposed`` proposal draws (default: their number), of which ``num_accepted``
      were accepted (Rejection, QRS).
    - ``exact_log_z``: log Z when the engine computed it exactly (reported with se 0).
    - ``policy``: a policy to draw ``eval_samples`` fresh sequences from when no proposal
      weights are given: their weights give log Ẑ, ESS, k̂ and, off enumerable worlds,
      importance-sampling distances. The draws use torch's global RNG.
    - ``reference``: a `Reference` pool built for this target and context (refused otherwise);
      ``law`` (or ``policy.log_prob``) is evaluated on its draws for ``reference_*`` KL(p‖π)
      and TVD with standard errors, and, where fresh ``policy`` draws were made, the reverse
      KL(π‖p) from them and the pool's log Ẑ. No draws are made for it.

    Reads no `Posterior` and changes none of its arguments.
    """
    if reference is not None:
        reference.require_for(target, context)
        if law is None and policy is None:
            raise ConfigError(
                "evaluate(reference=...) needs the law the samples follow (law= or policy=): "
                "the reference measures a distribution by its log-probability on the pool"
            )
    if num_proposed is None and proposal_log_weights is not None:
        num_proposed = len(proposal_log_weights)
    result = Diagnostics(num_samples=len(samples), num_proposed=num_proposed)
    log_w = proposal_log_weights
    policy_draws = None
    if log_w is None and policy is not None:
        with torch.no_grad():
            policy_draws = policy.sample_batch(eval_samples)
        log_w = target.log_score(policy_draws, context) - policy_draws.log_q.double()
        result.num_proposed = eval_samples
    if log_w is not None:
        _fill_weight_stats(result, log_w)
    if exact_log_z is not None:
        result.log_z, result.log_z_se = exact_log_z, 0.0
    if num_accepted is not None:
        rate = num_accepted / num_proposed
        result.acceptance_rate = rate
        result.acceptance_rate_se = math.sqrt(rate * (1 - rate) / num_proposed)
    if target.is_enumerable(context) and (law is not None or log_weights is not None):
        result.distances_from = "weighted samples" if law is None else "law"
        if law is None:
            law = functools.partial(empirical_log_prob, samples, log_weights)
        _fill_exact(result, target, context, law)
    else:
        _fill_estimated(result, target, context, samples, log_weights, policy_draws, log_w)
    result.check_pareto_k()
    if reference is not None:
        _fill_reference(result, reference, law or policy.log_prob)
        if policy_draws is not None:
            _fill_reverse(result, reference, log_w + policy_draws.log_q.double(),
                          policy_draws.log_q.double())
    return result


def evaluate_policy(
    target: Target,
    policy: SequenceDistribution,
    reference: Reference | None = None,
    *,
    context: Any = NO_CONTEXT,
    eval_samples: int = EVALUATION_SAMPLES,
) -> Diagnostics:
    """Diagnostics of a policy for ``target`` given ``context``, as a policy engine reports them.

    For any trained policy without refitting: a fit's ``posterior.policy``, a checkpoint's
    weights loaded into a policy. With ``reference`` the one pool measures them all
    (``reference_*``) next to the on-policy estimates from ``eval_samples`` fresh draws
    (``kl_target_policy`` with ``distances_from="policy draws"`` off enumerable worlds).
    The draws use torch's global RNG.
    """
    conditional = policy.given(context)
    with torch.no_grad():
        samples = conditional.sample_batch(eval_samples)
    return evaluate(target, samples, context=context, law=conditional.log_prob,
                    policy=conditional, eval_samples=eval_samples, reference=reference)


def normalised_weights(log_weights: torch.Tensor | None, num_samples: int) -> torch.Tensor:
    """Self-normalised weights (float64); uniform over ``num_samples`` when unweighted."""
    if log_weights is None:
        return torch.full((num_samples,), 1 / num_samples, dtype=torch.float64)
    return torch.softmax(log_weights.double(), 0)


def empirical_log_prob(
    samples: Sequences, log_weights: torch.Tensor | None, y: Sequences
) -> torch.Tensor:
    """Log-probability of ``y`` under the weighted empirical law of ``samples`` (−inf off them)."""
    mass: dict[tuple, float] = {}
    for key, w in zip(samples.keys(), normalised_weights(log_weights, len(samples)).tolist()):
        mass[key] = mass.get(key, 0.0) + w
    return torch.tensor([mass.get(k, 0.0) for k in y.keys()], dtype=torch.float64).log()


def _fill_reference(result: Diagnostics, reference: Reference, law: LogProb) -> None:
    with torch.no_grad():
        log_pi = law(reference.samples)
    _set_reference_fields(result, distances(reference, log_pi))
    message = reference.untrusted()
    if message is not None:
        result.warnings.append(message)
        warnings.warn(message, stacklevel=3)


def _fill_reverse(result: Diagnostics, reference: Reference, log_score: torch.Tensor,
                  log_pi: torch.Tensor) -> None:
    _set_reference_fields(result, reverse_distance(reference, log_score, log_pi))


def _set_reference_fields(result: Diagnostics,
                          measured: ReferenceDistances | ReverseDistance) -> None:
    """Each of the measurement's fields as the Diagnostics field ``reference_<name>``."""
    for item in dataclasses.fields(measured):
        setattr(result, f"reference_{item.name}", getattr(measured, item.name))


def _fill_weight_stats(result: Diagnostics, log_w: torch.Tensor) -> None:
    result.log_z, result.log_z_se = dx.log_z_estimate(log_w)
    result.ess = dx.ess(log_w)
    result.ess_fraction = result.ess / log_w.numel()
    result.pareto_k = dx.pareto_k(log_w)
    result.pareto_k_threshold = dx.khat_threshold(log_w.numel())


def _expectations(
    result: Diagnostics, sites: dict[str, FactorSite], weights: torch.Tensor
) -> None:
    """E_π of each reward/factor value, constraint indicator and moment feature."""
    for name, site in sites.items():
        if site.kind == "moment":
            phi = site.metadata["phi"].double().cpu()
            mean = (weights.unsqueeze(-1) * phi.reshape(len(weights), -1)).sum(0)
            result.moments[name] = mean.tolist()
        elif site.kind == "constraint":
            result.moments[name] = [float((weights * site.metadata["value"].double().cpu()).sum())]
        else:
            values = site.value.double().cpu()
            keep = weights > 0
            result.rewards[name] = float((weights[keep] * values[keep]).sum())


def _fill_exact(result: Diagnostics, target: Target, context: Any, law: LogProb) -> None:
    support = target.support(context)
    log_prior = support.log_q.double()
    log_score = target.log_score(support, context, log_prior=log_prior)
    log_p = log_score - torch.logsumexp(log_score, 0)
    log_pi = law(support).detach().double().cpu()
    pi = log_pi.exp()
    result.elbo = float(torch.where(pi > 0, pi * (log_score - log_pi), 0.0).sum())
    result.kl_target_policy = dx.kl(log_p, log_pi)
    result.tvd = dx.tvd(log_p, log_pi)
    result.kl_policy_prior = dx.kl(log_pi, log_prior)
    _expectations(result, target.factors(support, context), log_pi.exp())
    result.exact = True


def _fill_estimated(
    result: Diagnostics,
    target: Target,
    context: Any,
    samples: Sequences,
    log_weights: torch.Tensor | None,
    policy_draws: Sequences | None,
    log_w: torch.Tensor | None,
) -> None:
    if policy_draws is not None and log_w is not None:
        log_pi = policy_draws.log_q.double()
        log_score = log_w + log_pi
        result.kl_target_policy = dx.is_kl_target_policy(log_score, log_pi, log_pi)
        result.tvd = dx.is_tvd(log_score, log_pi, log_pi)
        result.distances_from = "policy draws"
        log_prior = target.prior(context).log_prob(policy_draws).double()
        result.kl_policy_prior = float((log_pi - log_prior).mean())
        result.elbo = float(log_w.mean())
        samples, weights = policy_draws, torch.full_like(log_pi, 1 / len(log_pi))
    else:
        weights = normalised_weights(log_weights, len(samples))
    _expectations(result, target.factors(samples, context), weights)
