"""How a target is solved: engines sharing one protocol, ``fit(target, context) -> Posterior``."""

from .base import Engine
from .best_of_n import BestOfN, best_of_n_kl_bound, best_of_n_log_law
from .exact import Exact
from .importance import Importance
from .rejection import QRS, QRSCurves, Rejection, qrs_estimates

__all__ = [
    "QRS",
    "BestOfN",
    "Engine",
    "Exact",
    "Importance",
    "QRSCurves",
    "Rejection",
    "best_of_n_kl_bound",
    "best_of_n_log_law",
    "qrs_estimates",
]
