"""The hidden states a transformers LM feeds its output embeddings: what a value head (PPO) and
a hidden-state twist (SMC) read, captured during a forward pass the engine runs anyway."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def lm_head_input(lm_head: torch.nn.Module | None) -> Iterator[list[torch.Tensor]]:
    """The hidden states fed to ``lm_head`` during the block (a forward pre-hook); none for a
    model without output embeddings (``lm_head`` None)."""
    captured: list[torch.Tensor] = []
    if lm_head is None:
        yield captured
        return
    handle = lm_head.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    try:
        yield captured
    finally:
        handle.remove()
