"""Pretraining-with-human-feedback objectives as token-level losses (SPEC §5, Korbak et al. 2023).

Every loss takes next-token ``logits [B, T, V]``, target ``tokens [B, T]``, a ``mask [B, T]`` of
real tokens and, where the objective needs it, ``rewards [B, T]``: the reward (higher is better,
``R = −misalignment score``) of the segment each token belongs to. Losses are minimised and
averaged over real tokens; log-softmax runs in float32 or wider, also under bf16.

Read as inference (DESIGN.md 'Pretraining is inference too'): filtering is rejection sampling on
the corpus then MLE, RWR is MLE on importance weights exp(R/β), conditional training learns the
joint of (tag, y) and conditions on tag = good at sampling time.
"""

from __future__ import annotations

import torch

from bayesalign.errors import ConfigError

AWR_WEIGHT_MAX = 1000.0  # PHF clamps exp(A/β) to [0, 1000]
UNLIKELIHOOD_FLOOR = 1e-20  # PHF clamps 1 − p at 1e-20 before the log


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(token_t | ·) for each position, in float32 or wider."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def mle_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Maximum likelihood: mean −log π over real tokens (also conditional training's loss, on
    sequences whose segments carry control tokens)."""
    return _masked_mean(-token_log_probs(logits, tokens), mask)


def unlikelihood_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    *,
    threshold: float = 0.0,
    alpha: float = 1.0,
    mode: str = "hard",
) -> torch.Tensor:
    """Likelihood on aligned tokens, α·unlikelihood −log(1 − π) on misaligned ones.

    ``mode="hard"``: a token is aligned iff its segment's reward ≥ ``threshold``. ``mode="soft"``
    reproduces the PHF code's behaviour for thresholds of 0 (its ``if self.score_threshold:``
    quirk): the aligned weight is ``1 − misalignment score = 1 + R``, which matches the hard rule
    only for scores in {0, 1}; rewards must then lie in [−1, 0].
    """
    log_p = token_log_probs(logits, tokens)
    if mode == "hard":
        aligned = (rewards >= threshold).to(log_p.dtype)
    elif mode == "soft":
        if (rewards < -1).any() or (rewards > 0).any():
            raise ConfigError("soft unlikelihood needs rewards in [-1, 0] (scores in [0, 1])")
        aligned = (1 + rewards).to(log_p.dtype)
    else:
        raise ConfigError(f"unlikelihood mode must be 'hard' or 'soft', got {mode!r}")
    one_minus_p = (-torch.expm1(log_p)).clamp(min=UNLIKELIHOOD_FLOOR)
    per_token = -aligned * log_p - alpha * (1 - aligned) * torch.log(one_minus_p)
    return _masked_mean(per_token, mask)


def rwr_loss(
    logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
    *, awr_beta: float = 1.0,
) -> torch.Tensor:
    """Reward-weighted regression: −log π weighted by exp(R/β), i.e. MLE on importance weights
    of the posterior corpus·exp(R/β) (PHF: AWR with α = 1, no value head); β = 1, the default
    as in `Pretraining`, weighs by the likelihood L = exp(R) itself."""
    if not awr_beta > 0:
        raise ConfigError(f"awr_beta must be > 0, got {awr_beta}")
    weights = torch.exp(rewards / awr_beta).clamp(max=AWR_WEIGHT_MAX)
    return _masked_mean(-weights * token_log_probs(logits, tokens), mask)


def awr_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    *,
    alpha: float = 0.5,
    awr_beta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantage-weighted regression with a value head ``values [B, T]`` (V of each prefix).

    Loss = α·mean(−log π · clamp(exp(A/β), 0, 1000)) + (1 − α)·mean((V − R)²), A = R − V
    (V detached in A). Returns the loss and the clamped weights (for logging and tests).
    """
    if not 0 <= alpha <= 1:
        raise ConfigError(f"AWR alpha must be in [0, 1], got {alpha}")
    if not awr_beta > 0:
        raise ConfigError(f"awr_beta must be > 0, got {awr_beta}")
    advantage = rewards - values.detach()
    weights = torch.exp(advantage / awr_beta).clamp(0.0, AWR_WEIGHT_MAX)
    policy = _masked_mean(-weights * token_log_probs(logits, tokens), mask)
    value = _masked_mean((values - rewards) ** 2, mask)
    return alpha * policy + (1 - alpha) * value, weights


def tag_segments(
    segments: list[list[int]],
    rewards: list[float],
    *,
    threshold: float,
    good_token_id: int,
    bad_token_id: int,
    drop_token_fraction: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Conditional training's data: each segment preceded by exactly one control token,
    ``<|good|>`` if its reward ≥ threshold else ``<|bad|>``; a ``drop_token_fraction`` of
    segments get none (PHF drops 1–10% so the model also learns untagged text)."""
    if len(segments) != len(rewards):
        raise ConfigError(f"{len(segments)} segments but {len(rewards)} rewards")
    if not 0 <= drop_token_fraction < 1:
        raise ConfigError(f"drop_token_fraction must be in [0, 1), got {drop_token_fraction}")
    drops = torch.rand(len(segments), generator=generator) < drop_token_fraction
    tagged: list[int] = []
    for segment, reward, drop in zip(segments, rewards, drops.tolist()):
        if not drop:
            tagged.append(good_token_id if reward >= threshold else bad_token_id)
        tagged.extend(segment)
    return tagged
