"""`Exact`: enumerate the support and normalise — the oracle every other engine is tested against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bayesalign.errors import EmptySupportError
from bayesalign.evaluation import evaluate
from bayesalign.posterior import Posterior
from bayesalign.targets import NO_CONTEXT, Target

from .base import one_context


@dataclass
class Exact:
    """Exact posterior ``p = P/Z`` over an enumerable prior's support (float64)."""

    def fit(self, target: Target, context: Any = NO_CONTEXT, *, contexts: Any = None) -> Posterior:
        one_context("Exact", contexts)
        support = target.support(context)
        log_score = target.log_score(support, context, log_prior=support.log_q.double())
        log_z = torch.logsumexp(log_score, 0)
        if not torch.isfinite(log_z):
            raise EmptySupportError(
                f"target '{target.name}' has zero mass on all {len(support)} sequences of the "
                "support (every sequence violates a constraint)"
            )
        log_z = float(log_z)

        def law(y):
            return target.log_score(y, context) - log_z

        diagnostics = evaluate(target, support, context=context, log_weights=log_score,
                               law=law, exact_log_z=log_z)
        return Posterior(support, engine="Exact", diagnostics=diagnostics, target=target,
                         context=context, log_weights=log_score, law=law)
