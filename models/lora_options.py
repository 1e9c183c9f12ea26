"""What a LoRA policy (models/lora.py) needs known without loading peft or transformers: its
options, and which weights a forward of a `CausalLM`'s model uses once LoRA policies adapted it
(the base ones, `base_forward`, so the prior still computes log a exactly)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from bayesalign.errors import ConfigError, require_positive

# On a base model that LoRA policies adapted: the PeftModel owning the adapters, and its LoRA
# layers (kept in __dict__, not as submodules: no cycle in the module tree).
PEFT_OWNER = "_bayesalign_peft"
ADAPTED_LAYERS = "_bayesalign_lora_layers"


@dataclass(frozen=True)
class LoraOptions:
    """A policy engine's ``lora=``: train ΔW = (α/r)·B·A on these modules instead of W."""

    rank: int = 8  # r, the adapters' rank
    alpha: float = 16.0  # α; the update is scaled by α / r
    target_modules: tuple[str, ...] | None = None  # module names to adapt; None: peft's default

    def __post_init__(self) -> None:
        require_positive("lora rank", self.rank)
        require_positive("lora alpha", self.alpha)
        if self.target_modules is not None:
            names = (self.target_modules,) if isinstance(self.target_modules, str) \
                else tuple(self.target_modules)
            if not names or not all(isinstance(n, str) for n in names):
                raise ConfigError(f"lora target_modules must be module names, got "
                                  f"{self.target_modules!r}")
            object.__setattr__(self, "target_modules", names)


@contextmanager
def base_forward(model: nn.Module) -> Iterator[None]:
    """Run a forward of ``model`` as the prior: with the LoRA adapters that policies injected
    into it disabled (what peft's ``PeftModel.disable_adapter()`` does for LoRA, without its
    walk over every module at each call: the sampling loop calls this once per token)."""
    layers = model.__dict__.get(ADAPTED_LAYERS)
    if not layers:
        yield
        return
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
