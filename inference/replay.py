"""Draws DPG keeps so that each is used more than once: the batch reused for several updates and
the replay pool of off-policy DPG (SPEC §2.2: any q works if each weight is P/q under the q that
drew it, so a draw stays valid after the policy has moved on).

A draw is kept with what its weight needs and nothing else, on the CPU: its tokens and mask,
its row context, log q under the distribution that drew it (never recomputed under today's
policy, which did not draw it), log a and log P.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import ConfigError
from bayesalign.sequences import Sequences

from .policy import ScoredBatch

# float64 log q, log a and log P, and one pointer for the row's context.
FIXED_BYTES_PER_DRAW = 3 * 8 + 8


@dataclass
class StoredDraws:
    """Scored draws on the CPU, detached from the decoder, so they pickle into a checkpoint."""

    tokens: torch.Tensor
    mask: torch.Tensor
    row_context: list[Any] | None
    log_q: torch.Tensor
    log_prior: torch.Tensor
    log_score: torch.Tensor

    @classmethod
    def of(cls, batch: ScoredBatch) -> StoredDraws:
        y = batch.y
        return cls(y.tokens.cpu(), y.mask.cpu(), None if y.context is None else list(y.context),
                   batch.log_q.detach().cpu(), batch.log_prior.detach().cpu(),
                   batch.log_score.detach().cpu())

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def batch(self, context: Any, device: torch.device) -> ScoredBatch:
        """The draws as a `ScoredBatch` on ``device``, weighted by the log q that drew them."""
        log_q = self.log_q.to(device)
        y = Sequences(self.tokens.to(device), self.mask.to(device), context=self.row_context,
                      log_q=log_q)
        return ScoredBatch(y, context, log_q, self.log_prior.to(device),
                           self.log_score.to(device))

    def rows(self, index: torch.Tensor) -> StoredDraws:
        contexts = None if self.row_context is None else [self.row_context[i]
                                                          for i in index.tolist()]
        return StoredDraws(self.tokens[index], self.mask[index], contexts, self.log_q[index],
                           self.log_prior[index], self.log_score[index])

    @staticmethod
    def cat(parts: list[StoredDraws]) -> StoredDraws:
        """Rows of every part, right-padded (mask False) to the widest."""
        width = max(p.tokens.shape[1] for p in parts)

        def pad(t: torch.Tensor, value: int | bool) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        contexts = None
        if any(p.row_context is not None for p in parts):
            contexts = [c for p in parts for c in (p.row_context or [None] * len(p))]
        return StoredDraws(torch.cat([pad(p.tokens, 0) for p in parts]),
                           torch.cat([pad(p.mask, False) for p in parts]), contexts,
                           torch.cat([p.log_q for p in parts]),
                           torch.cat([p.log_prior for p in parts]),
                           torch.cat([p.log_score for p in parts]))


@dataclass
class HeldBatch:
    """A step's batch kept for the next updates: the draws (the first ``fresh`` rows drawn at
    that step, the rest replayed), log π_old (the policy at the first update, against which later
    updates' ratios are clipped) and how many updates used it."""

    context: Any
    draws: StoredDraws
    log_old: torch.Tensor
    fresh: int
    updates: int = 1


class ReplayPool:
    """The last ``capacity`` draws of each context, oldest evicted first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.draws: dict[str, StoredDraws] = {}

    def __len__(self) -> int:
        return sum(len(d) for d in self.draws.values())

    def add(self, key: str, draws: StoredDraws) -> None:
        kept = self.draws.get(key)
        merged = draws if kept is None else StoredDraws.cat([kept, draws])
        if len(merged) > self.capacity:
            merged = merged.rows(torch.arange(len(merged) - self.capacity, len(merged)))
        self.draws[key] = merged

    def with_replayed(self, fresh: ScoredBatch, replayed: int,
                      device: torch.device) -> ScoredBatch:
        """The fresh draws and up to ``replayed`` earlier ones of the same context (each with the
        log q that drew it); the fresh ones then join the pool."""
        key = str(fresh.context)
        stored = StoredDraws.of(fresh)
        if len(self) == 0:  # for a policy that does not say its length, the first draws' width
            require_pool_fits(self.capacity, 1, stored.tokens.shape[1], available_memory())
        old = self.sample(key, replayed)
        self.add(key, stored)
        return fresh if old is None else StoredDraws.cat([stored, old]).batch(fresh.context,
                                                                              device)

    def sample(self, key: str, num_samples: int) -> StoredDraws | None:
        """Up to ``num_samples`` of the context's draws, uniformly without replacement (torch's
        RNG, so a resumed run picks the same); None when the pool holds none for it."""
        kept = self.draws.get(key)
        if kept is None or num_samples <= 0:
            return None
        index = torch.randperm(len(kept))[:num_samples]
        return kept.rows(index)

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "draws": dict(self.draws)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the pool; a resumed run with a smaller ``replay_size`` keeps the newest."""
        self.draws = {}
        for key, draws in state["draws"].items():
            self.draws[key] = draws if len(draws) <= self.capacity else draws.rows(
                torch.arange(len(draws) - self.capacity, len(draws)))


def bytes_per_draw(length: int) -> int:
    """Memory one stored draw takes: int64 tokens and a bool mask per position, plus its scores."""
    token_bytes = torch.empty((), dtype=torch.long).element_size()
    mask_bytes = torch.empty((), dtype=torch.bool).element_size()
    return length * (token_bytes + mask_bytes) + FIXED_BYTES_PER_DRAW


def max_length(policy: SequenceDistribution) -> int | None:
    """The longest sequence ``policy`` draws, when it says (CausalLM, TabularLM)."""
    for name in ("max_new_tokens", "length"):
        value = getattr(policy, name, None)
        if isinstance(value, int):
            return value
    return None


def available_memory() -> int | None:
    """Bytes of memory available to this process now (Linux's MemAvailable, else POSIX's free
    physical pages); None where neither can be read."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def require_pool_fits(replay_size: int, num_contexts: int, length: int,
                      available: int | None) -> None:
    """Refuse a pool of ``replay_size`` draws per context that memory cannot hold, saying how
    much it needs."""
    if available is None:
        return
    needed = replay_size * num_contexts * bytes_per_draw(length)
    if needed > available:
        raise ConfigError(
            f"replay_size={replay_size} needs {_size(needed)} for {replay_size} draws × "
            f"{num_contexts} context(s) of up to {length} tokens ({bytes_per_draw(length)} bytes "
            f"each), but only {_size(available)} of memory is available; lower replay_size to "
            f"at most {available // (num_contexts * bytes_per_draw(length))}")


def _size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024:
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TiB"
