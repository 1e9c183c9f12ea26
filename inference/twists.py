"""Twists for `SMC`: callables mapping prefixes to ``log ψ_t`` (SPEC §11).

A twist is any callable ``twist(prefixes) -> log_psi`` taking the prefix tokens ``[n, t]``
(long, ``t ≥ 1``, every row an incomplete prefix) and returning ``log ψ_t`` of each row,
shape ``[n]``, finite or ``-inf`` (ψ = 0: a prefix with no future mass). `optimal_twist`
computes the exact twist ψ*_t(s_{1:t}) = Σ_c a(c | s_{1:t}) L(s_{1:t} c) by enumeration, the
reference under which twisted SMC returns log Ẑ = log Z exactly for any number of particles.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from bayesalign.targets import NO_CONTEXT, Target

Twist = Callable[[torch.Tensor], torch.Tensor]


def optimal_twist(target: Target, context: Any = NO_CONTEXT) -> Twist:
    """ψ*_t(prefix) = E_a[L(s) | s starts with prefix], by enumerating the prior's support.

    ``log ψ*`` is ``log Σ_{s ⊐ prefix} a(s) L(s) − log Σ_{s ⊐ prefix} a(s)`` over the complete
    sequences ``s`` strictly extending the prefix; ``-inf`` for prefixes the prior never makes.
    A lookup table, so only for enumerable priors (tests, small worlds).
    """
    support = target.support(context)
    log_prior = support.log_q.double()
    log_score = target.log_score(support, context, log_prior=log_prior)
    future: dict[tuple[int, ...], float] = {}
    mass: dict[tuple[int, ...], float] = {}
    for tokens, log_a, log_p in zip(support.token_lists(), log_prior.tolist(), log_score.tolist()):
        for t in range(1, len(tokens)):
            key = tuple(tokens[:t])
            future[key] = _log_add(future.get(key, -math.inf), log_p)
            mass[key] = _log_add(mass.get(key, -math.inf), log_a)
    table = {key: future[key] - mass[key] for key in future if mass[key] > -math.inf}

    def twist(prefixes: torch.Tensor) -> torch.Tensor:
        values = [table.get(tuple(row), -math.inf) for row in prefixes.tolist()]
        return torch.tensor(values, dtype=torch.float64, device=prefixes.device)

    return twist


def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))
