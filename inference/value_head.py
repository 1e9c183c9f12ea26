"""PPO's critic: a value head V(s_t) on each prefix s_t = (x, y_<t), and GAE over per-token
rewards of the KL-regularised objective (SPEC §3.2; Schulman et al. 2016, 2017).

The per-token reward of KL-RL is r_t = −c·k(log π(y_t|s_t) − log a(y_t|s_t)), plus the task
reward log L(y) on the last token; with k1 they sum to the sequence reward RLOO uses. The head
reads the policy's features without sending gradients back into them (as a separate critic
network would), so the policy's update is PPO's surrogate alone:
- `HiddenStateValue` (a `CausalLM`): a linear map of the last hidden state at each position,
  captured at the input of the LM head during the policy's own forward (one pass, no change
  to the model);
- `PrefixValueTable` (an enumerable policy with no hidden states, e.g. `PrefixTreeLM`): one free
  value per prefix, the tabular analogue of `PrefixTreeLM`'s one logit row per prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import ConfigError
from bayesalign.sequences import Sequences

from .lm_head import lm_head_input

MAX_TABLE_ENTRIES = 10_000_000  # a per-prefix table beyond this is not a tabular world


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates A_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γV_{t+1} − V_t, and
    the value targets A_t + V_t, for ``[batch, length]`` tensors whose ``mask`` is a prefix of
    each row (V = 0 after the last token: the episode ends there)."""
    advantages = torch.zeros_like(rewards)
    running = rewards.new_zeros(rewards.shape[0])
    next_value = rewards.new_zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        live = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(live, delta + gamma * lam * running, 0.0)
        advantages[:, t] = running
        next_value = torch.where(live, values[:, t], 0.0)
    return advantages, torch.where(mask, advantages + values, 0.0)


def token_rewards(task: torch.Tensor, kl_per_token: torch.Tensor, mask: torch.Tensor,
                  kl_scale: float) -> torch.Tensor:
    """r_t = −c·k_t on every token, plus the task reward log L(y) on each row's last token."""
    rewards = torch.where(mask, -kl_scale * kl_per_token, 0.0)
    lengths = mask.sum(-1)
    rows = torch.nonzero(lengths > 0).squeeze(-1)
    rewards[rows, lengths[rows] - 1] += task[rows].to(rewards)
    return rewards


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(A − mean) / std over the masked tokens (PPO's advantage normalisation)."""
    live = values[mask]
    if live.numel() < 2:
        return values
    return torch.where(mask, (values - live.mean()) / (live.std() + 1e-8), 0.0)


def clipped_value_loss(new: torch.Tensor, old: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: float | None) -> torch.Tensor:
    """½ max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²), a per-token mean over each sequence
    then over sequences (PPO's value clipping; ``clip=None``: the plain squared error)."""
    error = (new - returns) ** 2
    if clip is not None:
        clipped = old + torch.clamp(new - old, -clip, clip)
        error = torch.maximum(error, (clipped - returns) ** 2)
    per_sequence = (0.5 * error * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_sequence.mean()


class HiddenStateValue(torch.nn.Module):
    """V(s_t) = w·h_t + b, h_t the last hidden state where the policy predicts token t
    (zero-initialised: V starts at 0 everywhere)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def score(self, policy: SequenceDistribution, y: Sequences
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """π's per-token log-probs (with gradients) and V per token, from one forward."""
        with lm_head_input(policy.module.get_output_embeddings()) as captured:
            log_probs = policy.token_log_probs(y)
        if not captured:
            raise ConfigError(f"advantage='gae': {type(policy.module).__name__} computes its "
                              "logits without calling its output embeddings, so the value head "
                              "cannot read its hidden states; use advantage='rloo'")
        hidden = captured[-1].detach().to(self.linear.weight.dtype)
        values = self.linear(hidden).squeeze(-1).double()
        # y.mask of a drawn batch runs through the first EOS, as token_log_probs' mask does.
        return log_probs, torch.where(y.mask.to(values.device), values, 0.0)


class PrefixValueTable(torch.nn.Module):
    """One free V per prefix: table t holds V(y_<t) for the V**t prefixes of length t."""

    def __init__(self, vocab_size: int, length: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tables = torch.nn.ParameterList(
            torch.nn.Parameter(torch.zeros(vocab_size**t, dtype=torch.float64))
            for t in range(length))

    def score(self, policy: SequenceDistribution, y: Sequences
              ) -> tuple[torch.Tensor, torch.Tensor]:
        log_probs = policy.token_log_probs(y)
        tokens = y.tokens.to(log_probs.device)
        prefix = torch.zeros(len(y), dtype=torch.long, device=tokens.device)
        columns = []
        for t in range(tokens.shape[1]):
            columns.append(self.tables[t][prefix])
            prefix = prefix * self.vocab_size + tokens[:, t]
        values = torch.stack(columns, -1) if columns else log_probs.new_zeros(log_probs.shape)
        return log_probs, torch.where(y.mask.to(values.device), values, 0.0)


ValueHead = HiddenStateValue | PrefixValueTable


def value_head_for(policy: SequenceDistribution) -> ValueHead:
    """The critic a policy supports: on its hidden states (transformers), else a prefix table
    (an enumerable policy); any other policy is refused, naming why."""
    module = policy.module
    if hasattr(module, "get_output_embeddings") and module.get_output_embeddings() is not None:
        return HiddenStateValue(module.get_output_embeddings().in_features)
    vocab, length = getattr(policy, "vocab_size", None), getattr(policy, "length", None)
    if policy.has_enumerate_support and vocab is not None and length is not None:
        entries = sum(vocab**t for t in range(length))
        if entries > MAX_TABLE_ENTRIES:
            raise ConfigError(f"advantage='gae': a value table for {type(policy).__name__} needs "
                              f"{entries} entries (one per prefix); use advantage='rloo'")
        return PrefixValueTable(vocab, length)
    raise ConfigError(f"advantage='gae' needs a value head; {type(policy).__name__} has neither "
                      "hidden states (a transformers LM) nor an enumerable prefix tree; use "
                      "advantage='rloo'")


class PolicyAndValue(torch.nn.Module):
    """The policy's module and its value head, trained by one optimizer and checkpointed
    together; the head gets its own learning rate (``parameter_groups``)."""

    def __init__(self, policy: torch.nn.Module, value: ValueHead,
                 value_learning_rate: float | None) -> None:
        super().__init__()
        self.policy, self.value = policy, value
        self.value_learning_rate = value_learning_rate

    def parameter_groups(self, learning_rate: float) -> list[dict]:
        """The optimizer's groups: the policy's trainable weights at ``learning_rate``, the
        head's at ``value_learning_rate`` (the policy's rate when None)."""
        policy = [p for p in self.policy.parameters() if p.requires_grad]
        if not policy:
            raise ConfigError("KLRL: the policy has no trainable parameters")
        return [{"params": policy, "lr": learning_rate},
                {"params": list(self.value.parameters()),
                 "lr": self.value_learning_rate or learning_rate}]


@dataclass
class Trainable:
    """What the `Trainer` reads of a policy, for a policy trained with its value head."""

    module: PolicyAndValue
    recommended_optimizer: tuple[str, float]

