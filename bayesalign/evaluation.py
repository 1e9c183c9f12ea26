"""`evaluate`: the one function that fills a `Posterior`'s diagnostics, for every engine.

Distances (KL(p‖π), TVD, KL(π‖a)) and reward/moment expectations are computed exactly by
enumeration when the prior is enumerable and the posterior's law is known, and estimated by
importance sampling otherwise (SPEC §2.6, §9).
"""

from __future__ import annotations

import math

import torch

from . import diagnostics as dx
from .diagnostics import Diagnostics
from .posterior import Posterior
from .sequences import Sequences
from .targets import FactorSite, Target

EVALUATION_SAMPLES = 4096


def evaluate(
    target: Target, posterior: Posterior, num_samples: int = EVALUATION_SAMPLES
) -> Diagnostics:
    """Diagnostics of ``posterior`` as an approximation of ``target`` (for its context)."""
    context = posterior.context
    result = Diagnostics(num_samples=len(posterior.samples), num_proposed=posterior.num_proposed)
    log_w = posterior.proposal_log_weights
    policy_draws = None
    if log_w is None and posterior.policy is not None:
        policy_draws = posterior.sample(num_samples)
        log_w = target.log_score(policy_draws, context) - policy_draws.log_q.double()
        result.num_proposed = num_samples
    if log_w is not None:
        _fill_weight_stats(result, log_w)
    if posterior.exact_log_z is not None:
        result.log_z, result.log_z_se = posterior.exact_log_z, 0.0
    if posterior.num_accepted is not None:
        rate = posterior.num_accepted / posterior.num_proposed
        result.acceptance_rate = rate
        result.acceptance_rate_se = math.sqrt(rate * (1 - rate) / posterior.num_proposed)
    if target.is_enumerable(context) and (posterior.law is not None or posterior.log_weights is not None):
        _fill_exact(result, target, posterior)
    else:
        _fill_estimated(result, target, posterior, policy_draws, log_w)
    for name, value in posterior.estimates.items():
        if getattr(result, name, None) is None:
            setattr(result, name, value)
    result.check_pareto_k()
    return result


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


def _fill_exact(result: Diagnostics, target: Target, posterior: Posterior) -> None:
    context = posterior.context
    support = target.support(context)
    log_prior = support.log_q.double()
    log_score = target.log_score(support, context, log_prior=log_prior)
    log_p = log_score - torch.logsumexp(log_score, 0)
    log_pi = posterior.log_prob(support).detach().double().cpu()
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
    posterior: Posterior,
    policy_draws: Sequences | None,
    log_w: torch.Tensor | None,
) -> None:
    context = posterior.context
    if policy_draws is not None and log_w is not None:
        log_pi = policy_draws.log_q.double()
        log_score = log_w + log_pi
        result.kl_target_policy = dx.is_kl_target_policy(log_score, log_pi, log_pi)
        result.tvd = dx.is_tvd(log_score, log_pi, log_pi)
        log_prior = target.prior(context).log_prob(policy_draws).double()
        result.kl_policy_prior = float((log_pi - log_prior).mean())
        result.elbo = float(log_w.mean())
        samples, weights = policy_draws, torch.full_like(log_pi, 1 / len(log_pi))
    else:
        samples, weights = posterior.samples, posterior.normalised_weights
    _expectations(result, target.factors(samples, context), weights)
