"""Helpers of the multi-process tests: ``accelerate launch`` of ``bayesalign pretrain`` and of
the policy engines (DPG, KL-RL) on 2 CPU processes (gloo), the run folders' histories and
checkpoints, and one process drawing as 2 ranks do (`training_draws`)."""

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from unittest import mock

import psutil
import pyro
import pytest
import torch

import bayesalign as ba
from bayesalign.inference.pretraining_run import pretrain
from bayesalign.models import CausalLM
from bayesalign.models.pretraining import copy_stdlib_slice
from bayesalign.models.tiny import tiny_causal_lm
from bayesalign.sequences import Sequences
from bayesalign.training import Trainer
from bayesalign.training.checkpoints import verify
from bayesalign.training.processes import rank_seed

ROOT = Path(__file__).resolve().parents[1]
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
    command = accelerate_launch(["-m", "bayesalign", "pretrain", *arguments], config, launcher)
    done = subprocess.run(command, env=LAUNCH_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


LAUNCH_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def accelerate_launch(program: Sequence[str], config: str = "cpu_2proc",
                      launcher: Sequence[str] = ()) -> list[str]:
    """The ``accelerate launch`` command line of ``program`` on 2 CPU processes."""
    precision = [] if config == "cpu_2proc" else ["--num_processes=2", "--mixed_precision=no"]
    return [sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(ROOT / "configs" / "accelerate" / f"{config}.yaml"), *precision,
            *launcher, *program]


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


# -- the policy engines (DPG, KL-RL) ---------------------------------------------------------

POLICY_BATCH = 4  # per process; the 1-process runs draw 2 × POLICY_BATCH
# SGD: Adam's m/√v turns the float-order noise of a near-zero gradient into a full-size step
# (weights 1e-2 apart after 6 steps at lr 3e-3 while every logged metric agreed within 3e-5).
POLICY_OPTIONS = {"steps": 5, "optimizer": "sgd", "learning_rate": 0.05, "eval_samples": 4,
                  "seed": 5, "progress": False, "checkpoint_every": 2, "keep_checkpoints": 3}


CONTEXTS = ["x = ", "def "]  # CDPG's prompts: one drawn per step


def policy_engine(name: str, **options):
    """DPG, CDPG, RLOO or PPO (3 epochs per rollout: the checkpoint at step 2 is mid-rollout)."""
    from bayesalign.inference import DPG, KLRL

    options = {**POLICY_OPTIONS, **options}
    if name in ("dpg", "cdpg"):
        return DPG(**options, **({"contexts_per_step": 1} if name == "cdpg" else {}))
    return KLRL(algorithm=name, **({"ppo_epochs": 3} if name == "ppo" else {}), **options)


def low_tokens_target() -> ba.Target:
    """A tiny random GPT-2 prior (up to 6 new tokens) tilted towards the lower half of its ids."""
    prior = tiny_causal_lm(seed=1, n_layer=1, n_embd=32, initializer_range=0.3, max_new_tokens=6)

    @ba.target
    def low_tokens(prompt=None):
        y = pyro.sample("y", prior.given(prompt))
        low = ((y.tokens < prior.vocab_size // 2) & y.mask).sum(-1)
        ba.reward("low", (low / y.mask.sum(-1).clamp(min=1)).double(), kl_coef=0.2)

    return low_tokens


@contextlib.contextmanager
def training_draws(seed: int, ranks: int = 1,
                   distribution: type = CausalLM) -> Iterator[list[torch.Tensor]]:
    """Record the tokens a policy (an instance of ``distribution``) draws while it trains. With
    ``ranks`` = 2, one process draws each training batch as 2 launched processes do: half under
    each rank's RNG stream (seeded `rank_seed`, carried from batch to batch), concatenated in
    rank order."""
    drawn: list[torch.Tensor] = []
    sample, run = distribution.sample_batch, Trainer.run
    streams: dict[int, torch.Tensor] = {}
    training = False

    def training_run(self, step_fn):
        nonlocal training
        training = True
        try:
            return run(self, step_fn)
        finally:
            training = False

    def sample_batch(self, num_samples: int) -> Sequences:
        if not training or ranks == 1:
            y = sample(self, num_samples)
        else:
            parts = []
            for rank in range(ranks):
                with torch.random.fork_rng():
                    if rank in streams:
                        torch.set_rng_state(streams[rank])
                    else:
                        torch.manual_seed(rank_seed(seed, rank))
                    parts.append(sample(self, num_samples // ranks))
                    streams[rank] = torch.get_rng_state()
            # Tabular policies have no pad id: their sequences are of one width, masked with 0.
            y = Sequences.cat(parts, pad_token_id=getattr(self, "pad_token_id", 0))
        if training:
            drawn.append(y.tokens.clone())
        return y

    with mock.patch.object(distribution, "sample_batch", sample_batch), \
            mock.patch.object(Trainer, "run", training_run):
        yield drawn


def fit_and_save(name: str, output: Path, rank: int, ranks: int = 1, **options) -> None:
    """Fit engine ``name`` on `low_tokens_target` (checkpoints in ``output/name/checkpoints``);
    save this process' history, final weights and training draws under ``output/name``."""
    folder = output / name
    with training_draws(POLICY_OPTIONS["seed"], ranks) as drawn:
        engine = policy_engine(name, checkpoint_dir=str(folder / "checkpoints"), **options)
        post = engine.fit(low_tokens_target(), contexts=CONTEXTS if name == "cdpg" else None)
    torch.save({"history": post.history, "draws": drawn,
                "weights": {k: v.detach().cpu().clone()
                            for k, v in post.policy.module.state_dict().items()}},
               folder / f"run-{rank}.pt")


def policy_run(output: Path, name: str, rank: int = 0) -> dict:
    return torch.load(output / name / f"run-{rank}.pt", weights_only=False)


POLICY_SCRIPT = """
import os
import sys
from pathlib import Path

sys.path.insert(0, {tests!r})
from two_processes import fit_and_save

for name in {names!r}:
    fit_and_save(name, Path({output!r}), int(os.environ["RANK"]), **{options!r})
"""


def policy_launch(output: Path, names: Sequence[str], config: str = "cpu_2proc",
                  **options) -> list[str]:
    """The ``accelerate launch`` command that fits ``names`` on 2 processes of ``POLICY_BATCH``."""
    script = output / "fit.py"
    output.mkdir(parents=True, exist_ok=True)
    script.write_text(POLICY_SCRIPT.format(tests=str(Path(__file__).parent), names=list(names),
                                           output=str(output),
                                           options={"batch_size": POLICY_BATCH, **options}))
    return accelerate_launch([str(script)], config)


def launch_policy_engines(output: Path, names: Sequence[str], config: str = "cpu_2proc",
                          **options) -> None:
    done = subprocess.run(policy_launch(output, names, config, **options), env=LAUNCH_ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def kill_launch_after_first_checkpoint(command: list[str], checkpoints: Path, steps: int,
                                       timeout: float = 240) -> None:
    """Start ``command`` (an ``accelerate launch``), SIGKILL the launcher and its workers (which
    torchrun starts in sessions of their own) once a checkpoint appears, and check that the run
    died mid-run and left only complete (checksummed) checkpoints."""
    process = subprocess.Popen(command, env=LAUNCH_ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while (not list(checkpoints.glob("checkpoint-*")) and process.poll() is None
           and time.time() < deadline):
        time.sleep(0.02)
    launcher = psutil.Process(process.pid)
    run = [*launcher.children(recursive=True), launcher]
    assert len(run) >= 3, run  # the launcher and its 2 workers
    for member in run:
        member.send_signal(signal.SIGKILL)
    gone, alive = psutil.wait_procs(run, timeout=30)
    assert not alive, alive
    assert [p.returncode for p in gone if p.pid == process.pid] == [-signal.SIGKILL]  # mid-run
    written = sorted(checkpoints.glob("checkpoint-*"))
    assert written and int(written[-1].name.split("-")[1]) < steps
    assert all(verify(c) is None for c in written)  # none half-written
