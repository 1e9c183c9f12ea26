"""Sampling adaptors: per-step maps on next-token distributions (SPEC §8.2, Meister et al. 2023).

Each adaptor maps logits ``[..., vocab]`` to logits with removed tokens at ``-inf``; the chain
is then log-softmaxed, so the adapted sequence law is locally normalised and every sample's
exact log q is the sum of adapted per-step log-probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bayesalign.errors import ConfigError

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Temperature:
    """``p^{1/τ}``: τ < 1 sharpens, τ > 1 flattens."""

    temperature: float

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.temperature


@dataclass(frozen=True)
class TopK:
    """Keep the k most probable tokens (ties with the k-th are kept, as transformers does)."""

    k: int

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.k}")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        k = min(self.k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, NEG_INF)


def _keep_smallest_prefix(
    logits: torch.Tensor, order_key: torch.Tensor, mass: float
) -> torch.Tensor:
    """Keep the shortest prefix of tokens sorted by ``order_key`` whose probability ≥ ``mass``."""
    probs = torch.softmax(logits, dim=-1)
    order = torch.argsort(order_key, dim=-1, stable=True)
    sorted_probs = probs.gather(-1, order)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    drop_sorted = mass_before >= mass
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


@dataclass(frozen=True)
class TopP:
    """Nucleus: the smallest set of most probable tokens with mass ≥ p."""

    p: float

    def __post_init__(self) -> None:
        if not 0 < self.p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.p}")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return _keep_smallest_prefix(logits, -logits, self.p)


@dataclass(frozen=True)
class Typical:
    """Locally typical: tokens whose surprisal is closest to the entropy, up to mass ≥ p."""

    p: float

    def __post_init__(self) -> None:
        if not 0 < self.p <= 1:
            raise ConfigError(f"typical_p must be in (0, 1], got {self.p}")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits, dim=-1)
        entropy = -(log_probs.exp() * log_probs.nan_to_num(neginf=0.0)).sum(-1, keepdim=True)
        distance = (-log_probs - entropy).abs()
        return _keep_smallest_prefix(logits, distance, self.p)


@dataclass(frozen=True)
class Eta:
    """η-sampling: drop tokens with p < min(η, √η·e^{−H}); the most probable is always kept."""

    eta: float

    def __post_init__(self) -> None:
        if not 0 < self.eta < 1:
            raise ConfigError(f"eta must be in (0, 1), got {self.eta}")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits, dim=-1)
        probs = log_probs.exp()
        entropy = -(probs * log_probs.nan_to_num(neginf=0.0)).sum(-1, keepdim=True)
        threshold = torch.clamp(math.sqrt(self.eta) * torch.exp(-entropy), max=self.eta)
        drop = probs < threshold
        drop &= logits < logits.max(dim=-1, keepdim=True).values
        return logits.masked_fill(drop, NEG_INF)


@dataclass(frozen=True)
class BanTokens:
    """Never sample these ids (conditional training's control tokens, PHF's ``bad_words_ids``)."""

    token_ids: tuple[int, ...]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        banned[list(self.token_ids)] = True
        return logits.masked_fill(banned, NEG_INF)


Adaptor = Callable[[torch.Tensor], torch.Tensor]


def make_adaptors(
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    typical_p: float | None = None,
    eta: float | None = None,
) -> tuple[Adaptor, ...]:
    """The chain in transformers' order: temperature, then top-k, top-p, typical, η."""
    chain: list[Adaptor] = []
    if temperature is not None:
        chain.append(Temperature(temperature))
    if top_k is not None:
        chain.append(TopK(top_k))
    if top_p is not None:
        chain.append(TopP(top_p))
    if typical_p is not None:
        chain.append(Typical(typical_p))
    if eta is not None:
        chain.append(Eta(eta))
    return tuple(chain)


def adapted_log_probs(logits: torch.Tensor, adaptors: Sequence[Adaptor]) -> torch.Tensor:
    """Log-probabilities of the next token after the adaptor chain, in float32 or wider."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    for adaptor in adaptors:
        logits = adaptor(logits)
    return torch.log_softmax(logits, dim=-1)
