"""What a KL-RL run carries from one step to the next and checkpoints besides the policy: the KL
multiplier c and its adaptive controller, REINFORCE's reward baseline (SPEC §3.2), the PPO
rollout that the next updates reuse, and the divergence monitor's state."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from bayesalign.training.processes import gather

from .divergence import DivergenceState
from .policy import require_same_contexts


@dataclass
class RolloutGroup:
    """One context's draws in a PPO rollout, as plain tensors (no decoder closure) so a
    checkpoint taken mid-rollout pickles."""

    tokens: torch.Tensor
    mask: torch.Tensor
    row_context: Any  # the draws' per-row contexts (`Sequences.context`)
    context: Any
    old_log_probs: torch.Tensor  # [batch, length]: per-token log π_old
    advantage: torch.Tensor  # [batch] RLOO advantages, or [batch, length] GAE
    old_values: torch.Tensor | None = None  # GAE: [batch, length] V_old per token
    returns: torch.Tensor | None = None  # GAE: [batch, length] value targets A + V_old


@dataclass
class PPORollout:
    """A PPO rollout: its groups and the metrics of the step that drew it."""

    groups: list[RolloutGroup]
    metrics: dict[str, float]


@dataclass
class KLRLState:
    """What a KL-RL run checkpoints besides the policy: which contexts it trains on, the KL
    multiplier c, REINFORCE's reward baseline, the PPO rollout (None before the first) and the
    divergence monitor's state."""

    contexts: str  # `contexts_digest` of the training contexts
    kl_scale: float
    reward_baseline: float = 0.0
    rollout: PPORollout | None = None
    divergence: DivergenceState = field(default_factory=DivergenceState)

    def reinforce_advantage(self, reward: torch.Tensor) -> torch.Tensor:
        """R − b with b a moving average of past mean rewards (§3.2), then b is updated."""
        advantage = reward - self.reward_baseline
        self.reward_baseline = 0.9 * self.reward_baseline + 0.1 * float(gather(reward).mean())
        return advantage

    def adapt_kl_scale(self, kl: float, target_kl: float, gain: float) -> None:
        """Ziegler et al.'s controller c ← c(1 + K·clip(KL/KL_target − 1, ±0.2)) (§3.2)."""
        self.kl_scale *= 1 + gain * max(-0.2, min(0.2, kl / target_kl - 1))

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        require_same_contexts(state["contexts"], self.contexts)
        self.divergence.load_from(state, "KLRL")
        rollout = state["rollout"]
        self.kl_scale, self.reward_baseline = state["kl_scale"], state["reward_baseline"]
        self.rollout = None if rollout is None else PPORollout(
            [RolloutGroup(**group) for group in rollout["groups"]], rollout["metrics"])
