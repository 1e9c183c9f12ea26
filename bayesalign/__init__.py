"""bayesalign: align language models with human preferences as Bayesian inference.

Declare a target ``p(y) ∝ a(y)·L(y)`` as a Pyro model with `target`, solve it with any engine in
`bayesalign.inference`, and read the same `Diagnostics` from every `Posterior`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names resolve on first use (PEP 562), so ``bayesalign --help`` and ``import bayesalign`` do not
# wait for torch and Pyro; static type checkers read the imports below.
_EXPORTS = {
    "BayesAlignError": "errors",
    "Diagnostics": "diagnostics",
    "MomentLambdas": "likelihood",
    "Posterior": "posterior",
    "Reference": "reference",
    "SequenceDistribution": "distribution",
    "Sequences": "sequences",
    "Target": "targets",
    "constraint": "likelihood",
    "evaluate": "evaluation",
    "evaluate_policy": "evaluation",
    "log_sigmoid_centered": "likelihood",
    "moment": "likelihood",
    "prefix_constraint": "likelihood",
    "reference_reward": "likelihood",
    "reward": "likelihood",
    "target": "targets",
}

if TYPE_CHECKING:
    from .diagnostics import Diagnostics
    from .distribution import SequenceDistribution
    from .errors import BayesAlignError
    from .evaluation import evaluate, evaluate_policy
    from .likelihood import (
        MomentLambdas,
        constraint,
        log_sigmoid_centered,
        moment,
        prefix_constraint,
        reference_reward,
        reward,
    )
    from .posterior import Posterior
    from .reference import Reference
    from .sequences import Sequences
    from .targets import Target, target


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bayesalign' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "BayesAlignError",
    "Diagnostics",
    "MomentLambdas",
    "Posterior",
    "Reference",
    "SequenceDistribution",
    "Sequences",
    "Target",
    "constraint",
    "evaluate",
    "evaluate_policy",
    "log_sigmoid_centered",
    "moment",
    "prefix_constraint",
    "reference_reward",
    "reward",
    "target",
]
