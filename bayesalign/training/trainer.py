"""One training loop for every policy engine (DPG, CDPG, KL-RL): device, precision, accumulation,
progress, per-step history, and checkpoints that resume exactly.

What depends on the launch (data parallel, FSDP2, DeepSpeed ZeRO-1/2) is its `Strategy`
(`bayesalign.training.strategy`): the loop below is the same for all of them.

Checkpoints are written here (safetensors weights and optimizer state keyed by parameter name,
each process' RNG and engine state, history) rather than by ``accelerate.save_state``, so a data-parallel
and an FSDP run write the same files; DeepSpeed adds its partitioned optimizer state in
``deepspeed/``. A checkpoint is written to a temporary folder, checksummed, then
renamed, so a kill mid-write never leaves a half checkpoint; resume skips a corrupted one and
says so.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import ConfigError, TrainingError, require_positive
from bayesalign.seeding import seeded

from .checkpoints import (
    config_identity,
    describe_differences,
    rng_state,
    set_rng_state,
    verify,
    write_manifest,
)
from .fsdp import local_parameter_fraction, recomputes_activations
from .processes import gather, rank_seed
from .strategy import strategy_for
from .trackers import hyperparameters, require_tracker, scalars, tracker_dir


@dataclass
class TrainingConfig:
    """Hyperparameters every policy engine shares (one line each, TRL-style)."""

    # Options a resumed run may change (how long, where, how often, display); the others must
    # match the checkpoint's. Engines add theirs.
    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = (
        "steps", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "progress",
        "log_with", "tracker_dir")

    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # samples per micro-batch (per process)
    learning_rate: float | None = None  # None: the policy's recommendation (see optimizer)
    optimizer: str | None = None  # "adam" or "sgd"; None: the policy's recommended_optimizer
    max_grad_norm: float | None = None  # clip the global gradient norm when set
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    mixed_precision: str | None = "no"  # "no", "fp16", "bf16"; None: accelerate launch's setting
    checkpoint_dir: str | None = None  # where checkpoint-<step> folders go; resumes from the newest
    checkpoint_every: int = 0  # steps between checkpoints (0: only the final one, if a dir is set)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    seed: int = 0  # seeds torch per process (different samples on each rank)
    progress: bool = True  # progress bar on interactive terminals
    warmup_steps: int = 0  # linear learning-rate warm-up from 0 over this many steps
    lr_decay_steps: int | None = None  # cosine decay to 10% by this step; None: constant
    log_with: str | None = None  # an accelerate tracker for the history ("tensorboard", "wandb"…)
    tracker_dir: str | None = None  # where trackers write; None: checkpoint_dir/trackers or runs

    def __post_init__(self) -> None:
        require_positive("steps", self.steps)
        require_positive("batch_size", self.batch_size)
        if self.learning_rate is not None:
            require_positive("learning_rate", self.learning_rate)
        require_positive("gradient_accumulation_steps", self.gradient_accumulation_steps)
        if self.optimizer not in (None, "adam", "sgd"):
            raise ConfigError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be no/fp16/bf16, got {self.mixed_precision!r}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ConfigError("checkpoint_every must be >= 0 and keep_checkpoints >= 1")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        require_tracker(self.log_with)
        if self.lr_decay_steps is not None and self.lr_decay_steps <= self.warmup_steps:
            raise ConfigError(f"lr_decay_steps ({self.lr_decay_steps}) must exceed "
                              f"warmup_steps ({self.warmup_steps})")


def learning_rate_at(step: int, peak: float, warmup_steps: int,
                     lr_decay_steps: int | None) -> float:
    """Linear warm-up, then constant (a run can be extended) or cosine decay to 10%."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if lr_decay_steps is None:
        return peak
    progress = min(1.0, (step - warmup_steps) / (lr_decay_steps - warmup_steps))
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


StepFn = Callable[[int], tuple[torch.Tensor, dict[str, float]]]


class Trainer:
    """Runs ``step_fn`` (one micro-batch: loss and metrics) for ``config.steps`` optimizer steps.

    ``micro_step`` is the index of the micro-batch ``step_fn`` is asked for within its optimizer
    step, so that a data-driven ``step_fn`` reads a new slice at each accumulation. ``state``
    maps names to engine objects with ``state_dict``/``load_state_dict`` (running Ẑ, the
    off-policy proposal, the adaptive kl_coef), checkpointed with the policy.

    How the launch runs backward, the update and checkpoints is its `Strategy`'s. Engines whose
    steps only run the module's forward on data (pretraining) pass ``supports_sharding`` (FSDP;
    ZeRO-1/2 serve every engine, as each process keeps the whole weights), and
    name in ``separately_called`` any submodule they call outside that forward (a value head).
    After `run`, ``module`` is the trained module, unsharded, on every process.

    The learning-rate schedule (``warmup_steps``, ``lr_decay_steps``) is applied here, to every
    param group before each optimizer step, and recorded as the history's ``learning_rate``.
    """

    def __init__(
        self,
        config: TrainingConfig,
        policy: SequenceDistribution,
        engine: str,
        state: dict[str, Any] | None = None,
        supports_sharding: bool = False,
        separately_called: Sequence[torch.nn.Module] = (),
    ) -> None:
        self.config = config
        self.engine = engine
        self.state = dict(state or {})
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                                       mixed_precision=config.mixed_precision,
                                       log_with=config.log_with, project_dir=tracker_dir(config))
        module = policy.module
        module.to(self.accelerator.device)
        name, learning_rate = policy.recommended_optimizer
        self.strategy = strategy_for(
            self.accelerator, module, engine, config.optimizer or name,
            config.learning_rate or learning_rate, config.max_grad_norm, config.batch_size,
            config.gradient_accumulation_steps, config.mixed_precision, supports_sharding,
            separately_called)
        self.peak_learning_rates = [group["lr"] for group in self.optimizer.param_groups]
        self.history: list[dict[str, float]] = []
        self.start_step = 0
        self.micro_step = 0

    @property
    def module(self) -> torch.nn.Module:
        return self.strategy.module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.strategy.optimizer

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def parallelism(self) -> dict[str, Any]:
        """How this run is spread over processes (for cards and run configs)."""
        return {"launch": self.strategy.name, "processes": self.accelerator.num_processes,
                "parameter_fraction_per_process": local_parameter_fraction(self.module),
                "activation_checkpointing": recomputes_activations(self.module)}

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """All processes' values (for global weight normalisation, DESIGN.md 'Scale')."""
        return gather(tensor)

    def run(self, step_fn: StepFn) -> list[dict[str, float]]:
        config = self.config
        # Each rank its own seed, so ranks draw different samples.
        with seeded(rank_seed(config.seed, self.accelerator.process_index)):
            self._resume()
            if config.log_with:
                self.accelerator.init_trackers(self.engine, config=hyperparameters(config))
            bar = tqdm(total=config.steps, initial=self.start_step, desc=self.engine,
                       disable=None if config.progress else True, leave=False)
            run_started = time.perf_counter()
            for step in range(self.start_step, config.steps):
                started = time.perf_counter()
                row = self._optimizer_step(step, step_fn)
                self._add_rates(row, time.perf_counter() - started, run_started, step)
                self.history.append(row)
                if config.log_with:
                    self.accelerator.log(scalars(row), step=step)
                bar.update(1)
                bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "kl_target_policy",
                                                              "tokens_per_s") if k in row})
                done = step + 1
                if config.checkpoint_dir and (
                    (config.checkpoint_every and done % config.checkpoint_every == 0)
                    or done == config.steps
                ):
                    self.save_checkpoint(done)
            bar.close()
            if config.log_with:
                self.accelerator.end_training()
        self.strategy.trained_module()
        return self.history

    def _optimizer_step(self, step: int, step_fn: StepFn) -> dict[str, float]:
        """Every micro-batch's forward and backward, then one update of the weights."""
        accumulation = self.config.gradient_accumulation_steps
        rows: list[dict[str, float]] = []
        learning_rate = self._schedule(step)
        self.strategy.begin_step()
        for self.micro_step in range(accumulation):
            with self.strategy.micro_batch(self.micro_step, accumulation):
                loss, metrics = step_fn(step)
            # Every process stops together (one left alone would wait at the next all-reduce).
            finite = torch.isfinite(loss.detach()).reshape(1)
            if not bool(gather(finite).all()):
                value = "finite here, not on another process" if finite else loss.item()
                raise TrainingError(
                    f"{self.engine}: loss is {value} at step {step}; training stopped. "
                    f"{self.last_checkpoint_note()}"
                )
            self.strategy.backward(loss, accumulation)
            rows.append({"loss": float(loss.detach()), **metrics})
        self.strategy.update()
        row = {k: float(np.mean([r[k] for r in rows if k in r])) for k in rows[0]}
        # The loss of the global batch, not of this process' share: the curve the history
        # records is then the same for any number of processes. Memory: the busiest process.
        row["loss"], row["peak_memory_mb"] = self._across_processes(row["loss"], _peak_memory_mb())
        row["learning_rate"] = learning_rate
        row["step"] = step
        return row

    def _schedule(self, step: int) -> float:
        """Set every param group's rate for ``step``; the first group's, for the history."""
        rate = learning_rate_at(step, 1.0, self.config.warmup_steps, self.config.lr_decay_steps)
        for group, peak in zip(self.optimizer.param_groups, self.peak_learning_rates):
            group["lr"] = peak * rate
        return self.peak_learning_rates[0] * rate

    def _add_rates(self, row: dict[str, float], seconds: float, run_started: float,
                   step: int) -> None:
        config = self.config
        row["seconds"] = seconds
        row["samples_per_s"] = (config.batch_size * config.gradient_accumulation_steps
                                / max(seconds, 1e-9))
        if "tokens" in row:  # step_fn's tokens per micro-batch, on every process
            row["tokens_per_s"] = (row["tokens"] * config.gradient_accumulation_steps
                                   * self.accelerator.num_processes / max(seconds, 1e-9))
        elapsed = time.perf_counter() - run_started
        row["eta_s"] = elapsed / (step + 1 - self.start_step) * (config.steps - step - 1)

    def _across_processes(self, mean_of: float, max_of: float) -> tuple[float, float]:
        """(mean, max) over processes of two per-process values, in one collective."""
        if self.accelerator.num_processes == 1:
            return mean_of, max_of
        tensor = torch.tensor([[mean_of, max_of]], dtype=torch.float64, device=self.device)
        gathered = self.accelerator.gather(tensor)
        return float(gathered[:, 0].mean()), float(gathered[:, 1].max())

    def last_checkpoint_note(self) -> str:
        """Where a stopped run resumes from (for the messages of errors that stop training)."""
        latest = self._checkpoints()[-1:] if self.config.checkpoint_dir else []
        return f"Last checkpoint kept: {latest[0]}" if latest else "No checkpoint was written."

    # -- checkpoints -------------------------------------------------------------------------

    def _checkpoints(self) -> list[Path]:
        root = Path(self.config.checkpoint_dir)
        return sorted(root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))

    def save_checkpoint(self, step: int) -> Path:
        """Write then rename: ``checkpoint-<step>`` exists only once it is complete."""
        root = Path(self.config.checkpoint_dir)
        final = root / f"checkpoint-{step:08d}"
        rank = self.accelerator.process_index
        tmp = root / f".tmp-checkpoint-{step:08d}"
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        torch.save(rng_state(), tmp / f"rng-{rank}.pt")
        # Per process: a PPO rollout holds this process' own draws.
        torch.save({k: v.state_dict() for k, v in self.state.items()}, tmp / f"engine-{rank}.pt")
        self.strategy.save(tmp)
        if self.accelerator.is_main_process:
            meta = {"step": step, "engine": self.engine, "config": config_identity(self.config),
                    "history": self.history}
            (tmp / "trainer.json").write_text(json.dumps(meta))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            write_manifest(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self._checkpoints()[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def _resume(self) -> None:
        if not self.config.checkpoint_dir or not Path(self.config.checkpoint_dir).exists():
            return
        for checkpoint in reversed(self._checkpoints()):
            problem = verify(checkpoint)
            if problem is None:
                self._load(checkpoint)
                return
            warnings.warn(f"{checkpoint} is unusable ({problem}); trying the previous one",
                          stacklevel=3)

    def _load(self, checkpoint: Path) -> None:
        meta = json.loads((checkpoint / "trainer.json").read_text())
        if meta["engine"] != self.engine or meta["config"] != config_identity(self.config):
            raise ConfigError(
                f"{checkpoint} was written by {meta['engine']} with another configuration "
                f"({describe_differences(meta['config'], config_identity(self.config))}); use a new "
                "checkpoint_dir or the same settings"
            )
        # Multi-process CPU runs get device "cpu:0", which safetensors and torch.load refuse.
        device = "cpu" if self.device.type == "cpu" else str(self.device)
        self.strategy.load(checkpoint)
        rank = self.accelerator.process_index
        written_here = (checkpoint / f"rng-{rank}.pt").exists()
        if not written_here:  # resumed on more processes than wrote it: weights are exact, RNG is not
            warnings.warn(f"{checkpoint} has no RNG or engine state for process {rank}; it "
                          "continues from its seed and process 0's engine state", stacklevel=3)
        engine_file = checkpoint / f"engine-{rank if written_here else 0}.pt"
        if not engine_file.exists():
            raise ConfigError(f"{checkpoint} holds no {engine_file.name} (it was written by an "
                              "older version, with one engine.pt); use a new checkpoint_dir")
        engine_state = torch.load(engine_file, map_location=device, weights_only=False)
        for name, obj in self.state.items():
            if name not in engine_state:
                raise ConfigError(f"{checkpoint} holds no engine state {name!r} (it was written "
                                  "by an older version of this engine); use a new checkpoint_dir")
            obj.load_state_dict(engine_state[name])
        if written_here:
            set_rng_state(torch.load(checkpoint / f"rng-{rank}.pt", weights_only=False))
        self.history = meta["history"]
        self.start_step = meta["step"]


def _peak_memory_mb() -> float:
    """This process' peak memory so far: torch's allocations on a GPU, else the resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes there, KiB on Linux
