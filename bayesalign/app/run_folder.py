"""The folder ``bayesalign fit`` writes: the config as run, the posterior, its diagnostics, the
history and the engine's plots, then a ``COMPLETE`` marker, last and atomically.

A folder without ``COMPLETE`` is an unfinished run (killed, failed, or still running): `show`
refuses it, and a new ``fit`` into it resumes a learned engine from ``checkpoints/`` inside it.
"""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bayesalign.errors import ConfigError
from bayesalign.posterior import Posterior

CONFIG = "config.json"
COMPLETE = "COMPLETE"
DIAGNOSTICS = "diagnostics.json"
HISTORY = "history.csv"
POSTERIOR = "posterior"
CHECKPOINTS = "checkpoints"
QRS_SWEEP = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # multiples of the run's qrs_beta in its plot


def write_json(path: Path, value: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(partial, path)


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def check(folder: Path, config: dict[str, Any]) -> None:
    """Refuse a folder that holds a finished run, or something else than an unfinished run of
    the same engine and target (which a learned engine resumes). Every process checks, so
    that none starts training alone when the folder is refused."""
    if is_complete(folder):
        raise ConfigError(f"{folder} holds a finished run ({COMPLETE} is there): choose another "
                          "--output, or delete the folder to run again")
    if folder.exists() and any(folder.iterdir()):
        if not (folder / CONFIG).is_file():
            raise ConfigError(f"{folder} is not empty and is not a bayesalign run folder (no "
                              f"{CONFIG}): choose another --output")
        before = json.loads((folder / CONFIG).read_text())
        for key in ("engine", "target"):
            if before.get(key) != config[key]:
                raise ConfigError(f"{folder} holds an unfinished run of {key} "
                                  f"{before.get(key)!r}, not {config[key]!r}: choose another "
                                  "--output, or delete the folder")


def start(folder: Path, config: dict[str, Any]) -> None:
    """Create the folder and write the config as run (the main process only)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / CONFIG, config)


def write(folder: Path, posterior: Posterior, record: dict[str, Any]) -> list[Path]:
    """Write the run's results, then ``COMPLETE`` (``record``: command, versions, times)."""
    posterior.save(folder / POSTERIOR)
    write_json(folder / DIAGNOSTICS, posterior.diagnostics.as_dict())
    written = [folder / POSTERIOR, folder / DIAGNOSTICS]
    if posterior.history:
        from bayesalign.training.history import history_to_csv

        written.append(history_to_csv(posterior.history, folder / HISTORY))
    written += plots(folder, posterior)
    finished = datetime.now(UTC).isoformat(timespec="seconds")
    write_json(folder / COMPLETE, {**record, "finished": finished,
                                   "files": sorted(p.name for p in written)})
    return written


def plots(folder: Path, posterior: Posterior) -> list[Path]:
    """The plots the engine's results have: ESS and reward against KL(π‖a) over training steps
    (learned engines), QRS's trade-off over β_q around the run's (from its proposal draws)."""
    from bayesalign.app import plots as draw

    made = []
    history = posterior.history
    if any(_finite(row.get("ess_fraction")) for row in history):
        made.append(draw.plot_ess_over_steps(history, folder / "ess_over_steps.png",
                                             label=posterior.engine))
    steps = [row for row in history
             if _finite(row.get("kl_policy_prior")) and _finite(row.get("log_potential"))]
    if steps:
        marked = {steps[0]["step"], steps[-1]["step"]}
        points = [{"engine": posterior.engine, "kl_policy_prior": row["kl_policy_prior"],
                   "reward": row["log_potential"],
                   "label": f"step {row['step']}" if row["step"] in marked else ""}
                  for row in steps]
        made.append(draw.plot_reward_kl_frontier(points, folder / "reward_kl.png"))
    if posterior.engine == "QRS" and posterior.proposal_log_weights is not None:
        from bayesalign.inference import qrs_estimates

        betas = [posterior.config["qrs_beta"] * m for m in QRS_SWEEP]
        made.append(draw.plot_qrs_tradeoff(qrs_estimates(posterior.proposal_log_weights, betas),
                                           folder / "qrs_tradeoff.png"))
    return made


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def show(folder: Path) -> str:
    """A finished run's table: what ran, then every diagnostic (`Posterior.summary`)."""
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder")
    if not is_complete(folder):
        hint = ""
        if (folder / CONFIG).is_file():
            config = json.loads((folder / CONFIG).read_text())
            hint = (f" It is an unfinished {config.get('engine')} run on {config.get('target')}:"
                    f" run the same `bayesalign fit` with --output {folder} to resume or redo it.")
        raise ConfigError(f"{folder} is not a finished run (no {COMPLETE} marker: the fit was "
                          f"interrupted, failed or is still running).{hint}")
    config = json.loads((folder / CONFIG).read_text())
    record = json.loads((folder / COMPLETE).read_text())
    posterior = Posterior.load(folder / POSTERIOR)
    header = [f"run        {folder}", f"target     {config['target']}",
              f"command    {record.get('command', '')}", f"finished   {record['finished']}",
              f"files      {', '.join(record['files'])}", ""]
    return "\n".join(header) + posterior.summary()
