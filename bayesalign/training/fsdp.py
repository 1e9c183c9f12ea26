"""Fully sharded data parallel (torch FSDP2) for the `Trainer`, set up from accelerate's FSDP config.

accelerate applies FSDP on GPUs only. Reading configs/accelerate/fsdp.yaml through accelerate's own
`FullyShardedDataParallelPlugin` (`bayesalign.training.launch`) and sharding with ``fully_shard`` here
gives one code path for CPUs and GPUs, so the 2-process CPU tests exercise what a multi-GPU run
executes.

Each transformer block, each module the caller names as called outside the model's forward (AWR's
value head) and then the model itself become FSDP units: a process keeps 1/N of every parameter,
gradient and Adam moment, and gathers a unit's full weights only while it runs. Checkpoints hold
full (unsharded) state dicts keyed by parameter name, the same files a data-parallel run writes,
so either launch resumes the other's checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from bayesalign.errors import ConfigError

from .launch import launch_plugin
from .strategy import DataParallel


@dataclass(frozen=True)
class ShardingPlan:
    """What accelerate's FSDP config asks for, in the terms ``fully_shard`` takes."""

    wrap_blocks: bool  # one unit per transformer block (TRANSFORMER_BASED_WRAP); else the model only
    block_classes: tuple[str, ...]  # class names of those blocks; () = the model's _no_split_modules
    reshard_after_forward: bool
    offload_policy: Any  # torch's OffloadPolicy (none) or CPUOffloadPolicy
    activation_checkpointing: bool

    @property
    def offloads(self) -> bool:
        from torch.distributed.fsdp import CPUOffloadPolicy

        return isinstance(self.offload_policy, CPUOffloadPolicy)


class FullySharded(DataParallel):
    """FSDP2: each process holds 1/N of every parameter, gradient and Adam moment; FSDP reduces
    the gradients itself at the last micro-batch, and the main process' checkpoint is broadcast."""

    launch = "fsdp"
    shards = True

    def __init__(self, accelerator: Accelerator, module: torch.nn.Module, engine: str,
                 optimizer_name: str, learning_rate: float, max_grad_norm: float | None,
                 plan: ShardingPlan, separately_called: Sequence[torch.nn.Module]) -> None:
        if accelerator.mixed_precision == "fp16":
            raise ConfigError(f"{engine}: FSDP with fp16 needs a sharded grad scaler; use "
                              "mixed_precision bf16 (or no)")
        if plan.offloads and accelerator.device.type == "cpu":
            raise ConfigError(f"{engine}: fsdp_offload_params moves shards from a GPU to the "
                              "CPU; this run is on the CPU already: set it to false")
        self.skeleton = None
        if torch.distributed.is_initialized():
            self.skeleton = shard(module, plan, engine, separately_called)
        else:
            warnings.warn(f"{engine}: an FSDP launch with one process shards nothing; "
                          "training unsharded", stacklevel=4)
            self.shards = False
        super().__init__(accelerator, module, engine, optimizer_name, learning_rate, max_grad_norm)

    @property
    def name(self) -> str:
        return self.launch if self.shards else super().name

    @contextlib.contextmanager
    def micro_batch(self, index: int, accumulation: int) -> Iterator[None]:
        if self.shards:  # FSDP reduces gradients at the last micro-batch only
            self.module.set_requires_gradient_sync(index == accumulation - 1)
        with super().micro_batch(index, accumulation):
            yield

    def _average_gradients(self) -> None:
        if not self.shards:
            super()._average_gradients()

    def trained_module(self) -> torch.nn.Module:
        """A plain module with the full trained weights on every process (collective)."""
        if self.skeleton is not None:
            self.module = unsharded(self.module, self.skeleton, self.accelerator.device)
            self.skeleton = None
        return self.module


def plan_from_launch(accelerator: Accelerator) -> ShardingPlan | None:
    """The FSDP plan of this launch, or None for data parallel / single process."""
    plugin = launch_plugin(accelerator, "fsdp")
    if plugin is None:
        return None
    if plugin.fsdp_version != 2:
        raise ConfigError(f"fsdp_version {plugin.fsdp_version} is not supported: set "
                          "fsdp_version: 2 in the accelerate config (torch's fully_shard)")
    wrap = getattr(plugin.auto_wrap_policy, "__name__", None)
    if wrap not in (None, "transformer_auto_wrap_policy"):
        raise ConfigError(f"fsdp_auto_wrap_policy {wrap} is not supported: use "
                          "TRANSFORMER_BASED_WRAP (one unit per transformer block) or NO_WRAP")
    return ShardingPlan(wrap_blocks=wrap is not None,
                        block_classes=tuple(plugin.transformer_cls_names_to_wrap or ()),
                        reshard_after_forward=bool(plugin.reshard_after_forward),
                        offload_policy=plugin.cpu_offload,
                        activation_checkpointing=bool(plugin.activation_checkpointing))


def shard(module: torch.nn.Module, plan: ShardingPlan, engine: str,
          separately_called: Sequence[torch.nn.Module] = ()) -> torch.nn.Module:
    """Shard ``module`` in place across all processes; returns a meta-device skeleton of it.

    The skeleton (same classes, no storage) is what `unsharded` fills with the trained weights.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    skeleton = _meta_copy(module)
    units = _blocks(module, plan, engine) if plan.wrap_blocks else []
    if plan.activation_checkpointing:
        if not getattr(module, "supports_gradient_checkpointing", False):
            raise ConfigError(f"{engine}: fsdp_activation_checkpointing needs a transformers "
                              f"model that supports it; {type(module).__name__} does not")
        _checkpointing_call(module, "enable", {"use_reentrant": False})
    # Our losses never write in place into a model's output, which is what this warns about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    device = next(module.parameters()).device
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    options = {"mesh": mesh, "reshard_after_forward": plan.reshard_after_forward,
               "offload_policy": plan.offload_policy}
    for unit in [*units, *separately_called]:
        fully_shard(unit, **options)
    fully_shard(module, **options)
    return skeleton


def _blocks(module: torch.nn.Module, plan: ShardingPlan, engine: str) -> list[torch.nn.Module]:
    """The transformer blocks to shard one by one (a unit's weights are gathered together)."""
    classes = plan.block_classes or tuple(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in module.modules() if type(m).__name__ in classes]
    if not blocks:
        named = f"no module of class {', '.join(classes)}" if classes else "no transformer block"
        raise ConfigError(f"{engine}: FSDP found {named} in {type(module).__name__} to shard; "
                          "set fsdp_transformer_layer_cls_to_wrap in the accelerate config, or "
                          "fsdp_auto_wrap_policy: NO_WRAP")
    return blocks


def local_parameter_fraction(module: torch.nn.Module) -> float:
    """Share of the parameters this process holds: 1 unsharded, about 1/N under FSDP."""
    params = list(module.parameters())
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
    return local / sum(p.numel() for p in params)


def unsharded(module: torch.nn.Module, skeleton: torch.nn.Module,
              device: torch.device) -> torch.nn.Module:
    """A plain module holding ``module``'s full weights on every process (for sampling, saving
    and evaluating after training, which no longer run in lockstep). Every process must call it."""
    weights = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    plain = skeleton.to_empty(device=device)
    plain.load_state_dict({k: v.detach().to(device) for k, v in weights.items()})
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()  # to_empty gave tied parameters separate storage
    if recomputes_activations(plain):
        _checkpointing_call(plain, "disable")
    return plain


def recomputes_activations(module: torch.nn.Module) -> bool:
    """Whether a transformers model has activation (gradient) checkpointing on."""
    flag = getattr(module, "is_activation_checkpointing", None)  # transformers >= 5
    return bool(getattr(module, "is_gradient_checkpointing", False) if flag is None else flag)


def _checkpointing_call(module: torch.nn.Module, action: str, kwargs: dict | None = None) -> None:
    """transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_* (the old
    names go in v6); the floor, 4.45, has only the old ones."""
    new = getattr(module, f"activation_checkpointing_{action}", None)
    if new is not None:
        new(**({} if kwargs is None else {"activation_checkpointing_kwargs": kwargs}))
    else:
        getattr(module, f"gradient_checkpointing_{action}")(
            **({} if kwargs is None else {"gradient_checkpointing_kwargs": kwargs}))


def _meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """``module``'s structure with every tensor on the meta device (no memory, ties kept)."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = (torch.nn.Parameter(empty, requires_grad=tensor.requires_grad)
                            if isinstance(tensor, torch.nn.Parameter) else empty)
    return copy.deepcopy(module, memo)
