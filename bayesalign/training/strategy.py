"""How a launch runs the training loop's launch-dependent moments, one class per launch kind.

The `Trainer`'s loop is the same for every launch: for each micro-batch, ``backward``; then one
``update``; now and then ``save``. A `Strategy` says what those mean for a single process or data
parallel (`DataParallel`), torch FSDP2 (`bayesalign.training.fsdp.FullySharded`) or DeepSpeed
ZeRO-1/2 (`bayesalign.training.zero.Zero`), and which module training hands back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from bayesalign.errors import ConfigError

from .checkpoints import full_state, load_full_state


class DataParallel:
    """One process, or several each holding the whole model: gradients are averaged here, in one
    flat all-reduce, because the policy's parameters are used outside a module forward (a
    `TabularLM` has none) and cannot be wrapped by DDP."""

    launch = "data_parallel"
    shards = False  # whether each process holds only a shard of the weights

    def __init__(self, accelerator: Accelerator, module: torch.nn.Module, engine: str,
                 optimizer_name: str, learning_rate: float, max_grad_norm: float | None) -> None:
        self.accelerator = accelerator
        self.module = module
        self.max_grad_norm = max_grad_norm
        # A module with its own groups (a policy and its value head at another rate) gives them.
        params = module.parameter_groups(learning_rate) if hasattr(module, "parameter_groups") \
            else trainable_parameters(module, engine)
        optimizer_class = torch.optim.Adam if optimizer_name == "adam" else torch.optim.SGD
        self.optimizer = optimizer_class(params, lr=learning_rate)

    @property
    def name(self) -> str:
        return self.launch if self.accelerator.num_processes > 1 else "single_process"

    def begin_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def micro_batch(self, index: int, accumulation: int) -> Iterator[None]:
        """Autocast to the launch's precision for one micro-batch's forward."""
        with self.accelerator.autocast():
            yield

    def backward(self, loss: torch.Tensor, accumulation: int) -> None:
        self.accelerator.backward(loss / accumulation)

    def update(self) -> None:
        """Average (data parallel), unscale (fp16), clip, then step the optimizer."""
        self._average_gradients()
        scaler = self.accelerator.scaler  # fp16 only: backward scaled the loss
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
        if scaler is not None:
            scaler.step(self.optimizer)  # skips the step when a gradient overflowed
            scaler.update()
        else:
            self.optimizer.step()

    def _average_gradients(self) -> None:
        """All-reduce every gradient in one flat buffer (one collective per step, not per tensor)."""
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        flat = self.accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
        for grad, averaged in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(averaged.view_as(grad))

    def save(self, folder: Path) -> None:
        """Weights and optimizer state keyed by parameter name (the main process writes them).
        Every process must call it."""
        weights, optimizer_state = full_state(self.module, self.optimizer)
        if self.accelerator.is_main_process:
            save_file(weights, str(folder / "policy.safetensors"))
            torch.save(optimizer_state, folder / "optimizer.pt")
            if self.accelerator.scaler is not None:  # fp16: the loss scale and its growth tracker
                torch.save(self.accelerator.scaler.state_dict(), folder / "scaler.pt")

    def load(self, checkpoint: Path) -> None:
        require_written_by(checkpoint, deepspeed=False)
        weights, optimizer_state = {}, {}
        if self.accelerator.is_main_process or not self.shards:  # FSDP broadcasts the main's copy
            weights = load_file(str(checkpoint / "policy.safetensors"), device="cpu")
            optimizer_state = torch.load(checkpoint / "optimizer.pt", map_location="cpu")
        load_full_state(self.module, self.optimizer, weights, optimizer_state, self.shards)
        if self.accelerator.scaler is not None and (checkpoint / "scaler.pt").exists():
            self.accelerator.scaler.load_state_dict(torch.load(checkpoint / "scaler.pt"))

    def trained_module(self) -> torch.nn.Module:
        """The module as training leaves it, whole on every process."""
        return self.module


def trainable_parameters(module: torch.nn.Module, engine: str) -> list[torch.nn.Parameter]:
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"{engine}: the policy has no trainable parameters")
    return params


def require_written_by(checkpoint: Path, deepspeed: bool) -> None:
    """DeepSpeed's partitioned optimizer state lives in its own files: refuse a mixed resume."""
    by_deepspeed = (checkpoint / "deepspeed").is_dir()
    if by_deepspeed != deepspeed:
        raise ConfigError(
            f"{checkpoint} was written {'with' if by_deepspeed else 'without'} DeepSpeed, "
            f"whose optimizer state is partitioned in its own files; resume it with "
            f"{'a DeepSpeed launch' if by_deepspeed else 'a launch without DeepSpeed'}"
        )


def strategy_for(accelerator: Accelerator, module: torch.nn.Module, engine: str,
                 optimizer_name: str, learning_rate: float, max_grad_norm: float | None,
                 batch_size: int, accumulation: int, mixed_precision: str | None,
                 supports_sharding: bool, separately_called: Sequence[torch.nn.Module]) -> DataParallel:
    """The strategy this ``accelerate launch`` asked for (FSDP, DeepSpeed, or data parallel)."""
    from . import fsdp, zero

    zero_plan = zero.plan_from_launch(accelerator)
    fsdp_plan = None if zero_plan else fsdp.plan_from_launch(accelerator)
    # ZeRO-1/2 keep the whole weights on every process, so a policy may sample between updates;
    # FSDP gathers them in lockstep, which sampling each process to its own length breaks.
    if fsdp_plan is not None and not supports_sharding:
        raise ConfigError(
            f"{engine}: FSDP launches serve pretraining only; this engine samples from its "
            "policy within each step, each process to its own length, which FSDP's lockstep "
            "weight gathers do not allow; launch with configs/accelerate/ddp.yaml, or "
            "deepspeed.yaml (ZeRO-2) to partition the optimizer state"
        )
    if zero_plan is not None:
        return zero.Zero(accelerator, module, engine, optimizer_name, learning_rate, max_grad_norm,
                         zero_plan, batch_size, accumulation, mixed_precision)
    if fsdp_plan is not None:
        return fsdp.FullySharded(accelerator, module, engine, optimizer_name, learning_rate,
                                 max_grad_norm, fsdp_plan, separately_called)
    return DataParallel(accelerator, module, engine, optimizer_name, learning_rate, max_grad_norm)
