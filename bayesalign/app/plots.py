"""PNG figures of engine results: what a person compares at a glance rather than in a table.

Figures are drawn on a bare `matplotlib.figure.Figure` with the Agg canvas, never through
``pyplot``: nothing opens a window, no global backend is switched, and no figure outlives
its function (pyplot keeps every figure it makes alive until closed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Row = dict[str, Any]


class QRSCurves(Protocol):
    """What `plot_qrs_tradeoff` reads: ``bayesalign.inference.QRSCurves`` has these fields
    (the core never imports an engine, so the type is restated here)."""

    qrs_beta: list[float]
    acceptance_rate: list[float]
    tvd: list[float]
    kl: list[float]
    acceptance_rate_se: list[float] | None
    tvd_se: list[float] | None
    kl_se: list[float] | None


def figure(ncols: int, width: float = 4.2, height: float = 3.4) -> tuple[Figure, list[Axes]]:
    """A headless figure of ``ncols`` axes in a row (no pyplot state; constrained layout)."""
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a 120-dpi PNG, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _number(value: Any) -> float | None:
    """A finite float, or None for a missing or non-finite diagnostic (drawn as "n/a")."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _bars(ax: Axes, labels: list[str], values: list[float | None],
          errors: list[float | None] | None = None) -> None:
    """One bar per engine, its value written on it, "n/a" where the engine gives none."""
    heights = [v if v is not None else 0.0 for v in values]
    yerr = None
    if errors is not None and any(e is not None for e in errors):
        yerr = [e if e is not None else 0.0 for e in errors]
    bars = ax.bar(range(len(labels)), heights, yerr=yerr, capsize=3, color="tab:blue", alpha=0.8)
    for i, (bar, value) in enumerate(zip(bars, values, strict=True)):
        text = "n/a" if value is None else f"{value:.3g}"
        # Write the value beyond the bar's end and its error bar, above or below the axis.
        up = bar.get_height() >= 0
        reach = (yerr[i] if yerr is not None else 0.0) * (1 if up else -1)
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height() + reach),
                    ha="center", va="bottom" if up else "top", fontsize=7,
                    xytext=(0, 2 if up else -2), textcoords="offset points")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.margins(y=0.15)


def plot_engine_comparison(
    rows: Sequence[Row], path: str | Path, exact_log_z: float | None = None
) -> Path:
    """Bars of KL(p‖π), TVD and log Ẑ − log Z per engine on an enumerable world.

    Each row is a dict with ``engine`` (and optionally a longer ``label`` for the axis) and the
    `Diagnostics` fields ``kl_target_policy``, ``tvd``, ``log_z`` and ``log_z_se`` (None where
    an engine has no value). The log Z error
    is taken against ``exact_log_z``, or against the row whose engine is ``"Exact"``: the bars
    show at once which engines sample the target exactly and how far the others are.
    """
    if exact_log_z is None:
        exact_log_z = next((_number(r.get("log_z")) for r in rows if r["engine"] == "Exact"), None)
    labels = [str(r.get("label") or r["engine"]) for r in rows]
    fig, (ax_kl, ax_tvd, ax_z) = figure(3)
    _bars(ax_kl, labels, [_number(r.get("kl_target_policy")) for r in rows])
    ax_kl.set_title("KL(p‖π): distance to the target")
    _bars(ax_tvd, labels, [_number(r.get("tvd")) for r in rows])
    ax_tvd.set_title("TVD(p, π)")
    errors = [
        None if exact_log_z is None or _number(r.get("log_z")) is None
        else float(r["log_z"]) - exact_log_z
        for r in rows
    ]
    _bars(ax_z, labels, errors, [_number(r.get("log_z_se")) for r in rows])
    ax_z.set_title("log Ẑ − log Z (± se)" if exact_log_z is not None else "log Ẑ (no exact Z)")
    return save(fig, path)


def plot_qrs_tradeoff(
    curves: QRSCurves, path: str | Path, exact: QRSCurves | None = None
) -> Path:
    """QRS's quality/efficiency trade-off over ``qrs_beta`` (SPEC §4.2), to pick a β_q.

    Left: acceptance rate, TVD(p, p_β) and KL(p‖p_β) against β_q; right: the distances against
    the acceptance rate they cost. Error bars are the bootstrap standard errors of ``curves``;
    ``exact`` (e.g. from enumeration) is drawn as lines for comparison.
    """
    fig, (ax_beta, ax_trade) = figure(2, width=5.0, height=3.8)
    series = [("acceptance rate", "acceptance_rate", "tab:green"),
              ("TVD(p, p_β)", "tvd", "tab:blue"),
              ("KL(p‖p_β)", "kl", "tab:red")]
    for label, name, colour in series:
        ax_beta.errorbar(curves.qrs_beta, getattr(curves, name), yerr=getattr(curves, f"{name}_se"),
                         fmt="o", color=colour, capsize=3, markersize=4, label=f"{label} (IS)")
        if exact is not None:
            ax_beta.plot(exact.qrs_beta, getattr(exact, name), "-", color=colour, alpha=0.6,
                         label=f"{label} (exact)")
    ax_beta.set_xscale("log")
    ax_beta.set_xlabel("qrs_beta β_q (log scale)")
    ax_beta.set_title("QRS over β_q")
    ax_beta.legend(fontsize=7)
    for label, name, colour in series[1:]:
        ax_trade.errorbar(curves.acceptance_rate, getattr(curves, name),
                          xerr=curves.acceptance_rate_se, yerr=getattr(curves, f"{name}_se"),
                          fmt="o", color=colour, capsize=3, markersize=4, label=f"{label} (IS)")
        if exact is not None:
            ax_trade.plot(exact.acceptance_rate, getattr(exact, name), "-", color=colour,
                          alpha=0.6, label=f"{label} (exact)")
    # β_q ≤ min P/q all give p_β = q, one point: label it once with every β_q it stands for.
    labels: dict[tuple[float, float], list[str]] = {}
    for beta, rate, distance in zip(curves.qrs_beta, curves.acceptance_rate, curves.tvd,
                                    strict=True):
        labels.setdefault((round(rate, 9), round(distance, 9)), []).append(f"{beta:g}")
    for (rate, distance), betas in labels.items():
        ax_trade.annotate(", ".join(betas), (rate, distance), fontsize=7, xytext=(3, 3),
                          textcoords="offset points", ha="right" if rate > 0.9 else "left")
    ax_trade.set_xlabel("acceptance rate (labels: β_q)")
    ax_trade.set_ylabel("distance to the target")
    ax_trade.set_title("quality vs efficiency")
    ax_trade.legend(fontsize=7)
    return save(fig, path)


def plot_reward_kl_frontier(points: Sequence[Row], path: str | Path,
                            symlog_kl: bool = False) -> Path:
    """Reward against KL(π‖a), the price paid in drift from the prior (SPEC §3.1, §4.3).

    Each point is a dict with ``engine``, ``kl_policy_prior`` and ``reward`` (E_π r), and
    optionally ``label`` (default: ``kl_coef=…`` or ``n=…`` when given, else the engine).
    Points of one engine are joined in order of KL, so the exact posteriors over ``kl_coef``
    trace the optimal frontier and any other engine shows how far below it it lies.
    ``symlog_kl`` spreads KLs from 0.01 to tens of nats (linear below 0.1 nats).
    """
    fig, (ax,) = figure(1, width=5.5, height=4.0)
    engines = list(dict.fromkeys(str(p["engine"]) for p in points))
    for index, engine in enumerate(engines):
        mine = sorted((p for p in points if str(p["engine"]) == engine),
                      key=lambda p: float(p["kl_policy_prior"]))
        kls = [float(p["kl_policy_prior"]) for p in mine]
        rewards = [float(p["reward"]) for p in mine]
        ax.plot(kls, rewards, "o-", markersize=5, label=engine)
        # Alternate label sides by engine so labels of nearby points from two curves separate.
        above = index % 2 == 0
        for point, kl_value, reward_value in zip(mine, kls, rewards, strict=True):
            ax.annotate(_point_label(point), (kl_value, reward_value), fontsize=7,
                        ha="right" if above else "left", va="bottom" if above else "top",
                        xytext=(-4, 4) if above else (4, -4), textcoords="offset points")
    ax.margins(0.08)
    if symlog_kl:
        ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("KL(π‖a)")
    ax.set_ylabel("E_π[r]")
    ax.set_title("reward vs KL to the prior")
    ax.legend(fontsize=8)
    return save(fig, path)


def _point_label(point: Row) -> str:
    if "label" in point:
        return str(point["label"])
    for key in ("kl_coef", "n", "qrs_beta"):
        if key in point:
            return f"{key}={point[key]:g}"
    return str(point["engine"])


def plot_ess_over_steps(
    history: Sequence[Row], path: str | Path, label: str | None = None
) -> Path:
    """Normalised ESS ∈ [1/N, 1] per training step (SPEC §9): when it collapses, the
    importance weights of a learned engine (DPG, λ fitting) stop being trustworthy.

    ``history`` is a list of per-step dicts with ``step`` and ``ess_fraction``; steps without
    an ``ess_fraction`` (not measured that step) are skipped.
    """
    measured = [h for h in history if _number(h.get("ess_fraction")) is not None]
    fig, (ax,) = figure(1, width=5.5, height=3.4)
    ax.plot([h["step"] for h in measured], [float(h["ess_fraction"]) for h in measured],
            "-", marker="." if len(measured) < 50 else None, label=label)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("training step")
    ax.set_ylabel("ESS / N")
    ax.set_title("effective sample size over training")
    if label is not None:
        ax.legend(fontsize=8)
    return save(fig, path)
