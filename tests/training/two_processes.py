"""Helpers of the multi-process tests: ``accelerate launch`` of ``bayesalign pretrain`` on 2 CPU
processes (gloo) and the run folders' histories and checkpoints."""

import csv
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from bayesalign.inference.pretraining_run import pretrain
from bayesalign.models.pretraining import copy_stdlib_slice

ROOT = Path(__file__).resolve().parents[2]
STEPS, BATCH = 8, 4  # per process: the 1-process runs use 2 × BATCH, or BATCH × 2 accumulations
# Observed: 5e-7 for MLE, 1e-6 for conditional training (float32 sums in another order); a wrong
# shard or average moves it by > 1e-2 (rank 0's half of the conditional batch alone: 0.1).
LOSS_TOLERANCE = 1e-5
OPTIONS = {"steps": STEPS, "block_size": 64, "eval_every": 4, "checkpoint_every": 4,
           "heldout_fraction": 0.2, "eval_samples": 4, "progress": False}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 150 kB of standard-library modules (a seeded choice)."""
    return copy_stdlib_slice(tmp_path_factory.mktemp("corpus"), 150_000)


@pytest.fixture(scope="module")
def one_process_run(corpus, tmp_path_factory) -> Path:
    """``pretrain`` in this process with the 2-process runs' global batch."""
    output = tmp_path_factory.mktemp("one")
    return pretrain(corpus=corpus, output=output, batch_size=2 * BATCH, **OPTIONS)


def flags(options: dict) -> list[str]:
    """``bayesalign pretrain`` flags for `pretrain`'s options (``steps`` is ``--max-steps``)."""
    names = {"steps": "max_steps"}
    return [f"--{names.get(k, k).replace('_', '-')}={v}" for k, v in options.items()
            if k != "progress"]


def launch_two_processes(*arguments: str, config: str = "cpu_2proc",
                         launcher: Sequence[str] = ()) -> None:
    """``accelerate launch LAUNCHER`` of ``bayesalign pretrain ARGUMENTS`` on 2 CPU processes with
    one of the repository's configs, as a user would (GPU configs get ``--mixed_precision no``;
    ``bayesalign pretrain --mixed-precision`` overrides it)."""
    precision = [] if config == "cpu_2proc" else ["--num_processes=2", "--mixed_precision=no"]
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(ROOT / "configs" / "accelerate" / f"{config}.yaml"), *precision,
               *launcher, "-m", "bayesalign", "pretrain", *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def launch_two_processes_mle(corpus: Path, output: Path, config: str = "cpu_2proc",
                             *arguments: str, launcher: Sequence[str] = ()) -> None:
    launch_two_processes(f"--corpus={corpus}", f"--output={output}", f"--batch-size={BATCH}",
                         *flags(OPTIONS), *arguments, config=config, launcher=launcher)


def ranks_that_checkpointed(output: Path) -> set[str]:
    """The per-rank RNG files of the final checkpoint: one per process that trained."""
    checkpoint = output / "training" / "checkpoints" / f"checkpoint-{STEPS:08d}"
    return {f.name for f in checkpoint.glob("rng-*.pt")}


def history(output: Path) -> list[dict[str, str]]:
    with (output / "training" / "history.csv").open() as f:
        return list(csv.DictReader(f))


def max_difference(a: list[dict[str, str]], b: list[dict[str, str]], column: str) -> float:
    pairs = [(float(x[column]), float(y[column])) for x, y in zip(a, b) if x[column]]
    assert len(a) == len(b) and pairs
    return max(abs(x - y) for x, y in pairs)


PEP8_TARGET = """
import pyro

import bayesalign as ba
from bayesalign.models import Corpus, scorers

corpus = Corpus({corpus!r}, segment="line")


@ba.target
def clean_code():
    y = pyro.sample("y", corpus)
    ba.reward("pep8", scorers.pep8(y))
"""
