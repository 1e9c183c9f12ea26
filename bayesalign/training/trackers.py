"""The training history to accelerate's experiment trackers (TensorBoard, W&B, MLflow, ...).

Off by default: ``log_with`` names a tracker accelerate knows. Every history row is logged at
its optimizer step, on the main process, so a TensorBoard curve is the history's column. W&B
runs offline with ``WANDB_MODE=offline`` (nothing here reaches a network by itself).
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any

from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

from bayesalign.errors import ConfigError


def require_tracker(name: str | None) -> None:
    """A clear error for a tracker accelerate does not know or whose package is missing."""
    if name is None:
        return
    if name not in LOGGER_TYPE_TO_CLASS:
        raise ConfigError(f"log_with={name!r} is not a tracker accelerate knows; choose one of "
                          f"{sorted(LOGGER_TYPE_TO_CLASS)}")
    if name not in [str(t) for t in get_available_trackers()]:
        raise ConfigError(f"log_with={name!r}: its package is not installed (e.g. pip install "
                          f"{name})")


def tracker_dir(config: Any) -> str:
    """Where file-based trackers write: ``tracker_dir``, else ``checkpoint_dir/trackers``,
    else ``runs``."""
    if config.tracker_dir is not None:
        return config.tracker_dir
    if config.checkpoint_dir is not None:
        return str(Path(config.checkpoint_dir) / "trackers")
    return "runs"


def hyperparameters(config: Any) -> dict[str, int | float | str | bool]:
    """The run's plain-valued options (trackers refuse modules and lists as hparams)."""
    values = {f.name: getattr(config, f.name) for f in fields(config)}
    return {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool))}


def scalars(row: dict[str, float]) -> dict[str, float]:
    """A history row's finite numbers (the step is the x axis, not a curve)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
