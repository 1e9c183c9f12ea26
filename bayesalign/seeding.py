"""`seeded`: run a block with torch's RNG seeded, leaving the caller's RNG as it was."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Seed torch (CPU and the current GPU) inside the block and restore the caller's RNG state
    afterwards, so a seeded step does not depend on, or change, what ran before it.
    ``None`` runs the block unseeded."""
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
