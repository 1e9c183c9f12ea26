"""Per-step training metrics (the `Trainer`'s history) as CSV or ArviZ, for plots and reports."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np


def history_to_csv(history: list[dict[str, float]], path: str | Path) -> Path:
    """Write per-step metrics as CSV (one row per optimizer step)."""
    path = Path(path)
    columns = sorted({k for row in history for k in row}, key=lambda k: (k != "step", k))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    return path


def history_to_arviz(history: list[dict[str, float]]) -> Any:
    """Per-step metrics as an ArviZ InferenceData (one chain, draws = steps, in sample_stats)."""
    import arviz as az

    columns = sorted({k for row in history for k in row} - {"step"})
    stats = {k: np.array([[row.get(k, math.nan) for row in history]]) for k in columns}
    return az.from_dict(sample_stats=stats, attrs={"steps": len(history)})
