"""One training loop for every policy engine (DPG, CDPG, KL-RL): device, precision, accumulation,
progress, per-step history, and checkpoints that resume exactly.

Data parallel: the policy's parameters are used outside a module forward (a `TabularLM` has
none), so they are not wrapped by DDP; gradients are averaged across processes here. For engines
that pass ``supports_sharding``, an accelerate FSDP launch shards the module (`bayesalign.sharding`)
and a DeepSpeed launch partitions the optimizer state (`bayesalign.zero`, ZeRO-1/2).

Checkpoints are written by this module (safetensors weights and optimizer state keyed by
parameter name, RNG states, engine state, history) rather than ``accelerate.save_state``, so a
data-parallel and an FSDP run write the same files; DeepSpeed adds its partitioned optimizer
state in ``deepspeed/``. A checkpoint is written to a temporary folder, checksummed, then
renamed, so a kill mid-write never leaves a half checkpoint; resume skips a corrupted one and
says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import zero
from .checkpoint_files import (
    config_identity,
    describe_differences,
    rng_state,
    set_rng_state,
    verify,
    write_manifest,
)
from .distribution import SequenceDistribution
from .errors import BayesAlignError, ConfigError
from .sharding import (
    ShardingPlan,
    full_state,
    load_full_state,
    local_parameter_fraction,
    plan_from_launch,
    recomputes_activations,
    shard,
    unsharded,
)


def require_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


class TrainingError(BayesAlignError, RuntimeError):
    """Training stopped (NaN loss, no usable weights); the last checkpoint is kept."""


@dataclass
class TrainingConfig:
    """Hyperparameters every policy engine shares (one line each, TRL-style)."""

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


StepFn = Callable[[int], tuple[torch.Tensor, dict[str, float]]]


class Trainer:
    """Runs ``step_fn`` (one micro-batch: loss and metrics) for ``config.steps`` optimizer steps.

    ``micro_step`` is the index of the micro-batch ``step_fn`` is asked for within its optimizer
    step, so that a data-driven ``step_fn`` reads a new slice at each accumulation. ``state``
    maps names to engine objects with ``state_dict``/``load_state_dict`` (running Ẑ, the
    off-policy proposal, the adaptive kl_coef), checkpointed with the policy.

    Engines whose steps only run the module's forward on data (pretraining) pass
    ``supports_sharding``, and name in ``separately_called`` any submodule they call outside that
    forward (a value head). After `run`, ``module`` is the trained module, unsharded, on every
    process.
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
        self.policy = policy
        self.engine = engine
        self.state = dict(state or {})
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                                       mixed_precision=config.mixed_precision)
        self.module = policy.module
        self.module.to(self.accelerator.device)
        zero_plan = zero.plan_from_launch(self.accelerator)
        fsdp_plan = None if zero_plan else plan_from_launch(self.accelerator)
        if zero_plan is not None or fsdp_plan is not None:
            self._require_sharding_support(supports_sharding)
        self.sharded_from = None if fsdp_plan is None else self._shard(fsdp_plan, separately_called)
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"{engine}: the policy has no trainable parameters")
        name, learning_rate = policy.recommended_optimizer
        name, learning_rate = config.optimizer or name, config.learning_rate or learning_rate
        self.zero_engine = None
        if zero_plan is None:
            optimizer_class = torch.optim.Adam if name == "adam" else torch.optim.SGD
            self.optimizer = optimizer_class(params, lr=learning_rate)
        else:
            precision = (config.mixed_precision
                         or os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))
            self.zero_engine = zero.initialize(
                self.module, zero.optimizer_for(zero_plan, name, params, learning_rate),
                zero.engine_config(zero_plan, config.batch_size, config.gradient_accumulation_steps,
                                   config.max_grad_norm, precision,
                                   self.accelerator.num_processes))
            self.optimizer = self.zero_engine.optimizer  # partitioned; param_groups as torch's
        self.history: list[dict[str, float]] = []
        self.start_step = 0
        self.micro_step = 0

    def _require_sharding_support(self, supports_sharding: bool) -> None:
        if not supports_sharding:
            raise ConfigError(
                f"{self.engine}: FSDP and DeepSpeed launches serve pretraining only; this engine "
                "samples from its policy within each step, each process to its own length, which "
                "FSDP's lockstep weight gathers do not allow; launch with configs/accelerate/ddp.yaml"
            )

    def _shard(self, plan: ShardingPlan,
               separately_called: Sequence[torch.nn.Module]) -> torch.nn.Module | None:
        """Shard the module as ``plan`` says; returns its meta skeleton (None if unsharded)."""
        if self.accelerator.mixed_precision == "fp16":
            raise ConfigError(f"{self.engine}: FSDP with fp16 needs a sharded grad scaler; use "
                              "mixed_precision bf16 (or no)")
        if plan.offloads and self.device.type == "cpu":
            raise ConfigError(f"{self.engine}: fsdp_offload_params moves shards from a GPU to the "
                              "CPU; this run is on the CPU already: set it to false")
        if not torch.distributed.is_initialized():
            warnings.warn(f"{self.engine}: an FSDP launch with one process shards nothing; "
                          "training unsharded", stacklevel=3)
            return None
        return shard(self.module, plan, self.engine, separately_called)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def parallelism(self) -> dict[str, Any]:
        """How this run is spread over processes (for cards and run configs)."""
        launch = ("fsdp" if self.sharded_from is not None
                  else f"deepspeed_zero{self.zero_engine.zero_optimization_stage()}"
                  if self.zero_engine is not None
                  else "data_parallel" if self.accelerator.num_processes > 1 else "single_process")
        return {"launch": launch, "processes": self.accelerator.num_processes,
                "parameter_fraction_per_process": local_parameter_fraction(self.module),
                "activation_checkpointing": recomputes_activations(self.module)}

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """All processes' values (for global weight normalisation, DESIGN.md 'Scale')."""
        return self.accelerator.gather(tensor.contiguous())

    def run(self, step_fn: StepFn) -> list[dict[str, float]]:
        config = self.config
        with _seeded_per_process(config.seed, self.accelerator.process_index):
            self._resume()
            bar = tqdm(total=config.steps, initial=self.start_step, desc=self.engine,
                       disable=None if config.progress else True, leave=False)
            run_started = time.perf_counter()
            for step in range(self.start_step, config.steps):
                started = time.perf_counter()
                row = self._optimizer_step(step, step_fn)
                row["seconds"] = time.perf_counter() - started
                row["samples_per_s"] = (config.batch_size * config.gradient_accumulation_steps
                                        / max(row["seconds"], 1e-9))
                if "tokens" in row:  # step_fn's tokens per micro-batch, on every process
                    row["tokens_per_s"] = (row["tokens"] * config.gradient_accumulation_steps
                                           * self.accelerator.num_processes
                                           / max(row["seconds"], 1e-9))
                elapsed = time.perf_counter() - run_started
                row["eta_s"] = elapsed / (step + 1 - self.start_step) * (config.steps - step - 1)
                self.history.append(row)
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
        if self.sharded_from is not None:
            self.module = unsharded(self.module, self.sharded_from, self.device)
            self.sharded_from = None
        if self.zero_engine is not None:
            zero.full_precision_weights(self.zero_engine)
        return self.history

    def _optimizer_step(self, step: int, step_fn: StepFn) -> dict[str, float]:
        accumulation = self.config.gradient_accumulation_steps
        rows: list[dict[str, float]] = []
        if self.zero_engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        for self.micro_step in range(accumulation):
            if self.sharded_from is not None:  # FSDP reduces gradients at the last micro-batch
                self.module.set_requires_gradient_sync(self.micro_step == accumulation - 1)
            # DeepSpeed casts the module to bf16/fp16 itself; autocast is for the other launches.
            precision = self.accelerator.autocast() if self.zero_engine is None else contextlib.nullcontext()
            with precision:
                loss, metrics = step_fn(step)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"{self.engine}: loss is {loss.item()} at step {step}; training stopped. "
                    f"{self._last_checkpoint_note()}"
                )
            if self.zero_engine is None:
                self.accelerator.backward(loss / accumulation)
            else:  # divides by the accumulation steps, and steps at the last micro-batch
                self.zero_engine.backward(loss)
                self.zero_engine.step()
            rows.append({"loss": float(loss.detach()), **metrics})
        if self.zero_engine is None:
            self._update()
        row = {k: float(np.mean([r[k] for r in rows if k in r])) for k in rows[0]}
        # The loss of the global batch, not of this process' share: the curve the history
        # records is then the same for any number of processes. Memory: the busiest process.
        row["loss"], row["peak_memory_mb"] = self._across_processes(row["loss"], _peak_memory_mb())
        row["step"] = step
        return row

    def _update(self) -> None:
        """Average (data parallel), unscale (fp16), clip, then step the optimizer."""
        self._average_gradients()
        scaler = self.accelerator.scaler  # fp16 only: backward scaled the loss
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.config.max_grad_norm)
        if scaler is not None:
            scaler.step(self.optimizer)  # skips the step when a gradient overflowed
            scaler.update()
        else:
            self.optimizer.step()

    def _across_processes(self, mean_of: float, max_of: float) -> tuple[float, float]:
        """(mean, max) over processes of two per-process values, in one collective."""
        if self.accelerator.num_processes == 1:
            return mean_of, max_of
        tensor = torch.tensor([[mean_of, max_of]], dtype=torch.float64, device=self.device)
        gathered = self.accelerator.gather(tensor)
        return float(gathered[:, 0].mean()), float(gathered[:, 1].max())

    def _average_gradients(self) -> None:
        """All-reduce every gradient in one flat buffer (one collective per step, not per tensor)."""
        if self.accelerator.num_processes == 1 or self.sharded_from is not None:
            return
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        flat = self.accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
        for grad, averaged in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(averaged.view_as(grad))

    def _last_checkpoint_note(self) -> str:
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
        if self.zero_engine is None:
            weights, optimizer_state = full_state(self.module, self.optimizer)  # on every process
        else:  # each process writes its partition of the optimizer state
            zero.save(self.zero_engine, tmp / "deepspeed")
            weights, optimizer_state = zero.master_weights(self.zero_engine), None
        if self.accelerator.is_main_process:
            save_file(weights, str(tmp / "policy.safetensors"))
            if optimizer_state is not None:
                torch.save(optimizer_state, tmp / "optimizer.pt")
            if self.accelerator.scaler is not None:  # fp16: the loss scale and its growth tracker
                torch.save(self.accelerator.scaler.state_dict(), tmp / "scaler.pt")
            torch.save({k: v.state_dict() for k, v in self.state.items()}, tmp / "engine.pt")
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
        self._load_weights_and_optimizer(checkpoint)
        engine_state = torch.load(checkpoint / "engine.pt", map_location=device,
                                  weights_only=False)
        for name, obj in self.state.items():
            obj.load_state_dict(engine_state[name])
        rank_file = checkpoint / f"rng-{self.accelerator.process_index}.pt"
        if rank_file.exists():
            set_rng_state(torch.load(rank_file, weights_only=False))
        else:  # resumed on more processes than wrote the checkpoint: weights are exact, RNG is not
            warnings.warn(f"{checkpoint} has no RNG state for process "
                          f"{self.accelerator.process_index}; it continues from its seed", stacklevel=3)
        self.history = meta["history"]
        self.start_step = meta["step"]

    def _load_weights_and_optimizer(self, checkpoint: Path) -> None:
        by_deepspeed = (checkpoint / "deepspeed").is_dir()
        if by_deepspeed != (self.zero_engine is not None):
            raise ConfigError(
                f"{checkpoint} was written {'with' if by_deepspeed else 'without'} DeepSpeed, "
                f"whose optimizer state is partitioned in its own files; resume it with "
                f"{'a DeepSpeed launch' if by_deepspeed else 'a launch without DeepSpeed'}"
            )
        if self.zero_engine is not None:
            zero.load(self.zero_engine, checkpoint / "deepspeed")
            return
        sharded = self.sharded_from is not None
        weights, optimizer_state = {}, {}
        if self.accelerator.is_main_process or not sharded:  # FSDP broadcasts the main's copy
            weights = load_file(str(checkpoint / "policy.safetensors"), device="cpu")
            optimizer_state = torch.load(checkpoint / "optimizer.pt", map_location="cpu")
        load_full_state(self.module, self.optimizer, weights, optimizer_state, sharded)
        if self.accelerator.scaler is not None and (checkpoint / "scaler.pt").exists():
            self.accelerator.scaler.load_state_dict(torch.load(checkpoint / "scaler.pt"))


def _peak_memory_mb() -> float:
    """This process' peak memory so far: torch's allocations on a GPU, else the resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes there, KiB on Linux


@contextlib.contextmanager
def _seeded_per_process(seed: int, rank: int) -> Iterator[None]:
    """Seed torch differently on each rank, restoring the caller's RNG afterwards."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 1_000_003 * rank)
        yield


