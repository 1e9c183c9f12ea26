"""Comparison data for preference models (SPEC §7): pairs of texts where the better-scored one
wins, built automatically from a corpus and a scorer, with label noise as a parameter."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bayesalign.errors import ConfigError
from bayesalign.sequences import Sequences

_ENUMERATED_PAIRS = 1_000_000

Texts = Sequence[str] | Sequences
Contexts = Sequence[str | None] | None


@dataclass(frozen=True)
class Comparisons:
    """Pairs of texts, ``chosen[i]`` preferred to ``rejected[i]``, both after ``context[i]`` if given."""

    chosen: list[str]
    rejected: list[str]
    context: list[str | None] | None = None

    def __post_init__(self) -> None:
        if not self.chosen or len(self.chosen) != len(self.rejected):
            raise ConfigError(
                f"Comparisons need as many chosen as rejected texts, at least one: got "
                f"{len(self.chosen)} chosen and {len(self.rejected)} rejected"
            )
        if self.context is not None and len(self.context) != len(self.chosen):
            raise ConfigError(
                f"Comparisons.context has {len(self.context)} entries for {len(self.chosen)} pairs"
            )

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, index: slice | Sequence[int]) -> Comparisons:
        rows = range(len(self))[index] if isinstance(index, slice) else list(index)
        context = None if self.context is None else [self.context[i] for i in rows]
        return Comparisons([self.chosen[i] for i in rows], [self.rejected[i] for i in rows], context)


def build_comparisons(
    texts: Texts,
    score_fn: Callable[[Texts], torch.Tensor],
    num_pairs: int,
    label_noise: float = 0.0,
    seed: int = 0,
) -> Comparisons:
    """Label random pairs of texts (corpus snippets or model samples) by a score: higher wins.

    Pairs are drawn uniformly, without repeats, among pairs whose scores differ (ties are
    dropped) and, for ``Sequences`` with contexts, that share a context. Each label is then
    flipped with probability ``label_noise``: the noisy, automatically built data of PMP.
    """
    if not 0 <= label_noise < 0.5:
        raise ConfigError(f"label_noise must be in [0, 0.5) (0.5 erases the preference), got {label_noise}")
    if num_pairs < 1:
        raise ConfigError(f"num_pairs must be >= 1, got {num_pairs}")
    strings, contexts = texts_and_contexts(texts)
    scores = torch.as_tensor(score_fn(texts)).detach().double().cpu()
    if scores.shape != (len(strings),):
        raise ConfigError(f"score_fn returned shape {tuple(scores.shape)} for {len(strings)} texts")
    if torch.isnan(scores).any():
        raise ConfigError(f"score_fn returned NaN for text {int(torch.isnan(scores).nonzero()[0])}")
    groups = torch.tensor(_group_ids(contexts))
    available = _untied_pairs(scores, groups)
    if available == 0:
        raise ConfigError(
            f"every pair of the {len(strings)} texts is a tie (a single class: "
            f"{scores.unique().numel()} distinct score(s), none differing within a context), so "
            "there is no preference to learn; use texts the score_fn tells apart"
        )
    if available < num_pairs:
        raise ConfigError(
            f"only {available} untied pairs exist among {len(strings)} texts; ask for at most "
            f"{available} pairs or give more texts"
        )
    generator = torch.Generator().manual_seed(seed)
    first, second = _draw_pairs(scores, groups, num_pairs, generator)
    first_wins = scores[first] > scores[second]
    chosen = torch.where(first_wins, first, second)
    rejected = torch.where(first_wins, second, first)
    flip = torch.rand(num_pairs, generator=generator, dtype=torch.float64) < label_noise
    chosen, rejected = torch.where(flip, rejected, chosen), torch.where(flip, chosen, rejected)
    return Comparisons(
        chosen=[strings[i] for i in chosen.tolist()],
        rejected=[strings[i] for i in rejected.tolist()],
        context=None if all(c is None for c in contexts) else [contexts[i] for i in chosen.tolist()],
    )


def texts_and_contexts(texts: Texts, context: Contexts = None) -> tuple[list[str], list[str | None]]:
    """Plain strings and one context per row (``Sequences`` carry theirs)."""
    if isinstance(texts, Sequences):
        strings, context = texts.text, context if context is not None else texts.context
    else:
        strings = list(texts)
    contexts = list(context) if context is not None else [None] * len(strings)
    if len(contexts) != len(strings):
        raise ConfigError(f"{len(contexts)} contexts given for {len(strings)} texts")
    return strings, contexts


def _group_ids(contexts: list[str | None]) -> list[int]:
    ids: dict[str | None, int] = {}
    return [ids.setdefault(c, len(ids)) for c in contexts]


def _untied_pairs(scores: torch.Tensor, groups: torch.Tensor) -> int:
    """Pairs within a context minus tied pairs within a context, counted by group sizes."""
    per_group = Counter(groups.tolist())
    per_group_score = Counter(zip(groups.tolist(), scores.tolist()))
    return sum(math.comb(n, 2) for n in per_group.values()) - sum(
        math.comb(n, 2) for n in per_group_score.values()
    )


def _draw_pairs(
    scores: torch.Tensor, groups: torch.Tensor, num_pairs: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_pairs`` distinct untied same-context pairs: listed and permuted, or rejection-sampled."""
    n = len(scores)
    if math.comb(n, 2) <= _ENUMERATED_PAIRS:
        first, second = torch.triu_indices(n, n, 1)
        valid = (scores[first] != scores[second]) & (groups[first] == groups[second])
        first, second = first[valid], second[valid]
        pick = torch.randperm(len(first), generator=generator)[:num_pairs]
        return first[pick], second[pick]
    seen: dict[tuple[int, int], None] = {}
    while len(seen) < num_pairs:
        draws = torch.randint(n, (2, 2 * num_pairs), generator=generator).tolist()
        for i, j in zip(*draws):
            key = (min(i, j), max(i, j))
            if scores[i] != scores[j] and groups[i] == groups[j] and key not in seen:
                seen[key] = None
                if len(seen) == num_pairs:
                    break
    first, second = torch.tensor(list(seen)).T
    return first, second
