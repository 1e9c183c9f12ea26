"""What a DPG run carries from one step to the next and checkpoints besides the policy: the
running Ẑ_c (SPEC §2.2, §2.5), the f-DPG baseline b (§2.3), the off-policy proposal q (§2.2),
the divergence monitor's state, and the draws kept for reuse (`replay`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from bayesalign.distribution import SequenceDistribution

from .divergence import DivergenceState
from .policy import require_same_contexts
from .replay import HeldBatch, ReplayPool


class Proposal:
    """The off-policy proposal q: starts at the prior, becomes a frozen copy of π on a swap."""

    def __init__(self, initial: SequenceDistribution, policy: SequenceDistribution) -> None:
        self.initial = initial
        self.policy = policy
        self.copy: SequenceDistribution | None = None
        self.swaps = 0

    def current(self) -> SequenceDistribution:
        return self.copy if self.copy is not None else self.initial

    def swap(self) -> None:
        copy = self.policy.trainable_copy()
        copy.module.requires_grad_(False)
        self.copy = copy
        self.swaps += 1


@dataclass
class DPGState:
    """What a DPG run checkpoints besides the policy: which contexts it trains on, the running
    log Ẑ_c, the f-DPG baseline b, the off-policy proposal (None on-policy), the divergence
    monitor's state, the replay pool (None without one), the batches held for the next updates
    (per micro-batch index) and how many samples were drawn."""

    contexts: str  # `contexts_digest` of the training contexts
    baseline: float  # b of §2.3: E_π f' = −1 for forward KL; a running mean of f' otherwise
    proposal: Proposal | None
    log_sum: dict[str, float] = field(default_factory=dict)  # per context: log Σ of all weights
    count: dict[str, int] = field(default_factory=dict)  # per context: how many weights
    divergence: DivergenceState = field(default_factory=DivergenceState)
    pool: ReplayPool | None = None
    held: dict[int, list[HeldBatch]] = field(default_factory=dict)
    samples_drawn: int = 0  # fresh training draws, all processes (proposal checks excluded)

    def update_log_z(self, key: str, log_w: torch.Tensor) -> float:
        """Pool a batch's weights into the running mean Ẑ_c over all steps (§2.2)."""
        batch = float(torch.logsumexp(log_w, 0))
        self.log_sum[key] = float(torch.logaddexp(torch.tensor(self.log_sum.get(key, -math.inf)),
                                                  torch.tensor(batch)))
        self.count[key] = self.count.get(key, 0) + log_w.numel()
        return self.log_z(key)

    def log_z(self, key: str) -> float:
        return self.log_sum[key] - math.log(self.count[key])

    def reused(self, micro_step: int, updates_per_batch: int) -> list[HeldBatch] | None:
        """The batches this micro-batch index reuses, None when a fresh draw is due."""
        held = self.held.get(micro_step)
        return held if held and held[0].updates < updates_per_batch else None

    def state_dict(self) -> dict:
        proposal = self.proposal
        copy = proposal.copy.module.state_dict() if proposal and proposal.copy else None
        return {"contexts": self.contexts, "baseline": self.baseline, "log_sum": dict(self.log_sum),
                "count": dict(self.count), "swaps": proposal.swaps if proposal else 0,
                "proposal": copy, "divergence": self.divergence.state_dict(),
                "pool": None if self.pool is None else self.pool.state_dict(),
                "held": self.held, "samples_drawn": self.samples_drawn}

    def load_state_dict(self, state: dict) -> None:
        require_same_contexts(state["contexts"], self.contexts)
        self.divergence.load_from(state, "DPG")
        self.baseline, self.log_sum, self.count = state["baseline"], state["log_sum"], state["count"]
        # Checkpoints from before draws were reused hold none: nothing is held or pooled yet.
        self.held = state.get("held", {})
        self.samples_drawn = state.get("samples_drawn", 0)
        if self.pool is not None and state.get("pool") is not None:
            self.pool.load_state_dict(state["pool"])
        if self.proposal is not None:
            if state["proposal"] is not None:
                self.proposal.swap()
                self.proposal.copy.module.load_state_dict(state["proposal"])
            self.proposal.swaps = state["swaps"]
