"""How a target is solved: engines sharing one protocol, ``fit(target, ...) -> Posterior``.

Names resolve on first use (PEP 562): importing a sampling engine loads neither the training
loop nor accelerate, which only the learned engines need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "BestOfN": ".best_of_n",
    "ContextDistillation": ".context_distillation",
    "DPG": ".dpg",
    "Engine": ".base",
    "Exact": ".exact",
    "Importance": ".importance",
    "KLRL": ".klrl",
    "LoraOptions": "bayesalign.models.lora_options",
    "MomentFit": ".moments",
    "Pretraining": ".pretraining",
    "QRS": ".rejection",
    "QRSCurves": ".rejection",
    "Rejection": ".rejection",
    "SMC": ".smc",
    "TableTwist": ".twists",
    "TrainingConfig": "bayesalign.training",
    "TrainingError": "bayesalign.errors",
    "TwistLearning": ".twist_learning",
    "best_of_n_kl_bound": ".best_of_n",
    "best_of_n_log_law": ".best_of_n",
    "exact_reference": ".reference",
    "fit_moments": ".moments",
    "history_to_arviz": "bayesalign.training",
    "history_to_csv": "bayesalign.training",
    "log_z_bounds": ".bounds",
    "qrs_estimates": ".rejection",
    "snis_reference": ".reference",
}

if TYPE_CHECKING:
    from bayesalign.errors import TrainingError
    from bayesalign.models.lora_options import LoraOptions
    from bayesalign.training import TrainingConfig, history_to_arviz, history_to_csv

    from .base import Engine
    from .best_of_n import BestOfN, best_of_n_kl_bound, best_of_n_log_law
    from .bounds import log_z_bounds
    from .context_distillation import ContextDistillation
    from .dpg import DPG
    from .exact import Exact
    from .importance import Importance
    from .klrl import KLRL
    from .moments import MomentFit, fit_moments
    from .pretraining import Pretraining
    from .reference import exact_reference, snis_reference
    from .rejection import QRS, QRSCurves, Rejection, qrs_estimates
    from .smc import SMC
    from .twist_learning import TwistLearning
    from .twists import TableTwist


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "BestOfN",
    "ContextDistillation",
    "DPG",
    "Engine",
    "Exact",
    "Importance",
    "KLRL",
    "LoraOptions",
    "MomentFit",
    "Pretraining",
    "QRS",
    "QRSCurves",
    "Rejection",
    "SMC",
    "TableTwist",
    "TrainingConfig",
    "TrainingError",
    "TwistLearning",
    "best_of_n_kl_bound",
    "best_of_n_log_law",
    "exact_reference",
    "fit_moments",
    "history_to_arviz",
    "history_to_csv",
    "log_z_bounds",
    "qrs_estimates",
    "snis_reference",
]
