"""The files of a training checkpoint: checksums, the manifest that makes a folder a complete
checkpoint, per-process RNG state, and the settings a resume must share with the writer."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


def config_identity(config: Any) -> dict:
    """The settings (of a dataclass config) a resumed run must share with the run that wrote
    the checkpoint."""
    resumable = getattr(config, "RESUMABLE_CHANGES", ())
    identity = {k: v for k, v in asdict(config).items() if k not in resumable}
    return json.loads(json.dumps(identity, default=repr))


def describe_differences(a: dict, b: dict) -> str:
    """``key: A there, B here`` for every setting that differs (for resume errors)."""
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in keys) or "engine"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Checksum every file under ``folder`` (DeepSpeed's per-rank files included)."""
    manifest = {str(f.relative_to(folder)): sha256(f)
                for f in sorted(folder.rglob("*")) if f.is_file()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def verify(checkpoint: Path) -> str | None:
    """What makes ``checkpoint`` unusable (missing or changed file), or None."""
    manifest_file = checkpoint / "manifest.json"
    if not manifest_file.exists():
        return "no manifest"
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError:
        return "corrupted manifest"
    for name, digest in manifest.items():
        path = checkpoint / name
        if not path.exists():
            return f"missing {name}"
        if sha256(path) != digest:
            return f"checksum mismatch in {name}"
    return None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "random": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


FULL_ON_MAIN = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets it, on CPU


def full_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """`full_weights` and the optimizer state keyed by parameter name, on the main process' CPU;
    empty elsewhere under FSDP. Every process must call it."""
    return full_weights(module), get_optimizer_state_dict(module, optimizer, options=FULL_ON_MAIN)


def full_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights (tied duplicates dropped) on the main process' CPU (collective under FSDP)."""
    weights = get_model_state_dict(module, options=FULL_ON_MAIN)
    kept = {name for name, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    return {k: v.contiguous() for k, v in weights.items() if k in kept}


def load_full_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict,
                    optimizer_state: dict, sharded: bool) -> None:
    """Inverse of `full_state`. Sharded: the main process' dicts are broadcast (the others pass
    empty ones); tied parameters dropped on saving are filled from the name that was kept."""
    for alias, name in _tied_aliases(module).items():
        if name in weights:
            weights[alias] = weights[name]
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded)
    set_model_state_dict(module, weights, options=options)
    # Gradients left from an earlier fit of the same module would make torch skip building
    # the fresh optimizer's state ("Expected device to be set"); a resumed step starts at zero.
    module.zero_grad(set_to_none=True)
    if _keeps_state(optimizer):  # decided alike on every process: the load is collective
        set_optimizer_state_dict(module, optimizer, optimizer_state, options=options)


def _keeps_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer holds per-parameter state to restore. Plain SGD has none (torch's
    loader then fails, "Expected device to be set"); its settings come from the run's checked
    configuration and the Trainer sets the learning rate at every step."""
    return not (isinstance(optimizer, torch.optim.SGD)
                and all(group.get("momentum", 0) == 0 for group in optimizer.param_groups))


def _tied_aliases(module: torch.nn.Module) -> dict[str, str]:
    """Second and later names of a shared parameter -> its first name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        aliases.update({name: first[id(param)]} if id(param) in first else {})
        first.setdefault(id(param), name)
    return aliases
