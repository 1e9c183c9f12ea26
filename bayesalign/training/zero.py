"""DeepSpeed ZeRO stages 0–2 for the `Trainer`, set up from accelerate's DeepSpeed config.

accelerate drives DeepSpeed on GPUs only, so configs/accelerate/deepspeed.yaml is read through
accelerate's own `DeepSpeedPlugin` (`bayesalign.training.launch`) and the engine is built with
``deepspeed.initialize`` here, on CPUs (DeepSpeed's CPU accelerator, gloo) and GPUs alike: the
2-process CPU tests run the code a GPU run runs.

ZeRO-1/2 partition the optimizer state (and gradients) across processes; every process keeps
the whole weights, so step functions call the model as usual (and the policy engines sample
from it between updates, each process to its own length). ZeRO-3 also partitions the
weights, and then the model must only be called through DeepSpeed's engine (a direct call
trains on stale weights, measured); FSDP (configs/accelerate/fsdp.yaml) shards the same way
and is supported, so stage 3 is refused with a pointer to it.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from bayesalign.errors import ConfigError

from .launch import launch_plugin
from .strategy import DataParallel, require_written_by, trainable_parameters

STATE_TAG = "state"  # DeepSpeed's checkpoint tag inside a bayesalign checkpoint's deepspeed/


@dataclass(frozen=True)
class ZeroPlan:
    """The DeepSpeed config of this launch, ``auto`` values still to fill."""

    config: dict
    stage: int
    offload_optimizer: bool


class Zero(DataParallel):
    """ZeRO-1/2: DeepSpeed's engine partitions the optimizer state (and gradients), casts the
    module to bf16/fp16 itself, and steps at the last micro-batch; each process checkpoints its
    partition in ``deepspeed/``."""

    launch = "deepspeed"

    def __init__(self, accelerator: Accelerator, module: torch.nn.Module, engine: str,
                 optimizer_name: str,
                 learning_rate: float, max_grad_norm: float | None, plan: ZeroPlan,
                 batch_size: int, accumulation: int, mixed_precision: str | None) -> None:
        self.accelerator = accelerator
        self.module = module
        precision = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        params = trainable_parameters(module, engine)
        self.engine = initialize(
            module, optimizer_for(plan, optimizer_name, params, learning_rate),
            engine_config(plan, batch_size, accumulation, max_grad_norm, precision,
                          accelerator.num_processes))
        self.optimizer = self.engine.optimizer  # partitioned; param_groups as torch's

    @property
    def name(self) -> str:
        return f"deepspeed_zero{self.engine.zero_optimization_stage()}"

    def begin_step(self) -> None:
        """DeepSpeed's engine zeroes the gradients when it steps."""

    @contextlib.contextmanager
    def micro_batch(self, index: int, accumulation: int) -> Iterator[None]:
        yield  # the module is cast already: no autocast

    def backward(self, loss: torch.Tensor, accumulation: int) -> None:
        self.engine.backward(loss)  # divides by the accumulation steps
        self.engine.step()  # steps at the last micro-batch only

    def update(self) -> None:
        """Done by `backward`'s engine step at the last micro-batch."""

    def save(self, folder: Path) -> None:
        save(self.engine, folder / "deepspeed")
        weights = master_weights(self.engine)
        if self.accelerator.is_main_process:
            from safetensors.torch import save_file

            save_file(weights, str(folder / "policy.safetensors"))

    def load(self, checkpoint: Path) -> None:
        require_written_by(checkpoint, deepspeed=True)
        load(self.engine, checkpoint / "deepspeed")

    def trained_module(self) -> torch.nn.Module:
        full_precision_weights(self.engine)
        return self.module


def plan_from_launch(accelerator: Accelerator) -> ZeroPlan | None:
    """The ZeRO plan of this launch, or None when it is not a DeepSpeed launch."""
    plugin = launch_plugin(accelerator, "deepspeed")
    if plugin is None:
        return None
    config = copy.deepcopy(plugin.deepspeed_config)
    zero = config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage == 3:
        raise ConfigError("DeepSpeed ZeRO-3 is not supported: launch with "
                          "configs/accelerate/fsdp.yaml, which shards weights, gradients and "
                          "optimizer state the same way, or use zero_stage 2")
    if zero.get("offload_param", {}).get("device", "none") != "none":
        raise ConfigError("offload_param_device needs ZeRO-3, which is not supported; set it "
                          "to none (offload_optimizer_device: cpu keeps the optimizer on the CPU)")
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    return ZeroPlan(config=config, stage=stage, offload_optimizer=offload)


def engine_config(plan: ZeroPlan, batch_size: int, accumulation: int, max_grad_norm: float | None,
                  mixed_precision: str, processes: int) -> dict:
    """The DeepSpeed config with this run's batch, accumulation, clipping and precision.

    bayesalign's options decide them; a DeepSpeed config that sets one to another value than
    ``auto`` or this run's is refused rather than silently overridden.
    """
    config = copy.deepcopy(plan.config)
    ours = {"train_micro_batch_size_per_gpu": batch_size,
            "gradient_accumulation_steps": accumulation,
            "train_batch_size": batch_size * accumulation * processes,
            "gradient_clipping": float(max_grad_norm or 0.0)}
    for key, value in ours.items():
        given = config.get(key, "auto")
        if given != "auto" and float(given) != float(value):
            raise ConfigError(f"the DeepSpeed config sets {key} = {given}, but this run's is "
                              f"{value}; set it to auto in the config (bayesalign's options decide it)")
        config[key] = value
    for precision in ("fp16", "bf16"):
        config[precision] = {**config.get(precision, {}), "enabled": mixed_precision == precision}
    config["zero_allow_untested_optimizer"] = True  # torch's Adam/SGD: the same step as DDP's
    config["steps_per_print"] = 2**31  # the Trainer's history and progress bar report instead
    return config


def optimizer_for(plan: ZeroPlan, name: str, params: list[torch.nn.Parameter],
                  learning_rate: float) -> torch.optim.Optimizer:
    """torch's optimizer; with the optimizer offloaded, DeepSpeed's CPU Adam (its C++ kernel is
    compiled on first use, about 40 s)."""
    if not plan.offload_optimizer:
        return (torch.optim.Adam if name == "adam" else torch.optim.SGD)(params, lr=learning_rate)
    if name != "adam":
        raise ConfigError(f"offload_optimizer_device cpu needs Adam, got optimizer {name!r}")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, lr=learning_rate, adamw_mode=False)


def initialize(module: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict) -> Any:
    """DeepSpeed's engine over ``module``; its ``optimizer`` is the partitioned one."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    return engine


def save(engine: Any, folder: Path) -> None:
    """Every process writes its partition of the optimizer state (collective)."""
    engine.save_checkpoint(str(folder), tag=STATE_TAG)


def load(engine: Any, folder: Path) -> None:
    """Weights, partitioned optimizer state and loss scale, on every process (collective)."""
    path, _ = engine.load_checkpoint(str(folder), tag=STATE_TAG, load_module_strict=True)
    if path is None:
        raise ConfigError(f"{folder} holds no DeepSpeed state for this run")


def master_weights(engine: Any) -> dict[str, torch.Tensor]:
    """The fp32 master weights and persistent buffers (tied duplicates dropped) on the CPU:
    under bf16/fp16 the module itself holds a low-precision copy. Every process must call it."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    weights = {}
    for name, param in module.named_parameters():
        master = safe_get_full_fp32_param(param) if param.requires_grad else None
        weights[name] = (param if master is None else master).detach().float().cpu().contiguous()
    state = module.state_dict()
    weights.update({name: buffer.detach().cpu().contiguous() for name, buffer in module.named_buffers()
                    if name in state})
    return weights


def full_precision_weights(engine: Any) -> None:
    """Put the fp32 master weights back into a module that trained in bf16/fp16 (collective)."""
    module = engine.module
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return
    masters = master_weights(engine)
    module.float()
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(masters[name])
