"""bayesalign: align language models with human preferences as Bayesian inference.

Declare a target ``p(y) ∝ a(y)·L(y)`` as a Pyro model with `target`, solve it with any engine in
`bayesalign.inference`, and read the same `Diagnostics` from every `Posterior`.
"""

from .diagnostics import Diagnostics
from .distribution import SequenceDistribution
from .errors import BayesAlignError
from .evaluation import evaluate
from .likelihood import (
    MomentLambdas,
    constraint,
    log_sigmoid_centered,
    moment,
    reference_reward,
    reward,
)
from .posterior import Posterior
from .sequences import Sequences
from .target import Target, target

__all__ = [
    "BayesAlignError",
    "Diagnostics",
    "MomentLambdas",
    "Posterior",
    "SequenceDistribution",
    "Sequences",
    "Target",
    "constraint",
    "evaluate",
    "log_sigmoid_centered",
    "moment",
    "reference_reward",
    "reward",
    "target",
]
