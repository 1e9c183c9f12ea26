"""How a target is solved: engines sharing one protocol, ``fit(target, context) -> Posterior``."""

from bayesalign.history import history_to_arviz, history_to_csv
from bayesalign.training import TrainingConfig, TrainingError

from .base import Engine
from .best_of_n import BestOfN, best_of_n_kl_bound, best_of_n_log_law
from .dpg import DPG
from .exact import Exact
from .importance import Importance
from .klrl import KLRL
from .moments import MomentFit, fit_moments
from .pretraining import Pretraining
from .rejection import QRS, QRSCurves, Rejection, qrs_estimates

__all__ = [
    "DPG",
    "KLRL",
    "MomentFit",
    "Pretraining",
    "QRS",
    "BestOfN",
    "Engine",
    "Exact",
    "Importance",
    "QRSCurves",
    "Rejection",
    "TrainingConfig",
    "TrainingError",
    "best_of_n_kl_bound",
    "best_of_n_log_law",
    "fit_moments",
    "history_to_arviz",
    "history_to_csv",
    "qrs_estimates",
]
