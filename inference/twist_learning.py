"""`TwistLearning`: fit a `PrefixTwist` by contrastive twist learning (CTL, SPEC §11).

CTL (Zhao, Brekelmans, Makhzani & Grosse, ICML 2024, §4) fits ψ_t so that the intermediate
target π_t(s_{1:t}) ∝ a(s_{1:t}) ψ_t(s_{1:t}) matches σ's marginal on prefixes, whose twist is
the optimal ψ*_t = E_a[L | s_{1:t}] (up to a constant per t). Its gradient is

    Σ_t  E_σ[∇ log ψ_t(s_{1:t})] − E_{π_t}[∇ log ψ_t(s_{1:t})]

Each step draws ``batch_size`` sequences from the prior: the negative term weights their
prefixes by ψ_t (self-normalised, a = q so a/q = 1); the positive term weights the same draws
by L (self-normalised importance sampling of σ), or takes ``exact_samples`` (exact target draws,
e.g. ``Rejection(...).fit(target).samples``) with equal weights when they are given. Only
prefixes still incomplete at t enter step t's terms (a finished sequence has no ψ_t), and a
t whose positive term has no mass is skipped, since without it the negative term only lowers ψ.
The loop is the shared `Trainer`'s: checkpoints, exact resume, history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from bayesalign.errors import ConfigError
from bayesalign.sequences import Sequences
from bayesalign.targets import NO_CONTEXT, Target
from bayesalign.training import Trainer, TrainingConfig

from .base import one_context
from .twists import PrefixTwist, TableTwist


@dataclass
class _Trainable:
    """What `Trainer` reads of the thing it trains: the module and its optimizer default."""

    module: PrefixTwist
    recommended_optimizer: tuple[str, float]


@dataclass
class TwistLearning(TrainingConfig):
    """Contrastive twist learning: ``fit(target)`` returns the trained twist, for ``SMC(twist=)``."""

    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = (*TrainingConfig.RESUMABLE_CHANGES, "twist")

    steps: int = 300  # optimizer steps
    twist: PrefixTwist | None = None  # the module to train (in place); None: a TableTwist
    exact_samples: Sequences | None = None  # exact target draws for the positive term

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.twist is not None and not isinstance(self.twist, PrefixTwist):
            raise ConfigError(f"TwistLearning: twist must be a PrefixTwist, got "
                              f"{type(self.twist).__name__}")
        if self.exact_samples is not None and len(self.exact_samples) == 0:
            raise ConfigError("TwistLearning: exact_samples is empty; give exact target draws "
                              "or None (self-normalised weights)")

    def fit(self, target: Target, context: Any = NO_CONTEXT, *, contexts: Any = None) -> PrefixTwist:
        one_context("TwistLearning", contexts)
        prior = target.prior(context)
        twist = self.twist if self.twist is not None else TableTwist(prior)
        if twist.vocabulary_id != tuple(prior.vocabulary_id):
            raise ConfigError(f"TwistLearning: the twist was built for vocabulary "
                              f"{twist.vocabulary_id}, the prior's is {tuple(prior.vocabulary_id)}")
        trainer = Trainer(self, _Trainable(twist, twist.recommended_optimizer), "TwistLearning")

        def step(step_index: int) -> tuple[torch.Tensor, dict[str, float]]:
            draws = prior.sample_batch(self.batch_size)
            log_potential = target.log_potential(draws, context).double().cpu()
            if self.exact_samples is None:
                positives, positive_log_w = draws, log_potential
            else:
                index = torch.randint(len(self.exact_samples), (self.batch_size,))
                positives = self.exact_samples[index]
                positive_log_w = torch.zeros(self.batch_size, dtype=torch.float64)
            return ctl_loss(twist, positives, positive_log_w, draws, trainer.device)

        twist.history = trainer.run(step)
        return twist


def ctl_loss(
    twist: PrefixTwist, positives: Sequences, positive_log_w: torch.Tensor, negatives: Sequences,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, dict[str, float]]:
    """``Σ_t Σ_i w⁻_{t,i} log ψ_t(s⁻_i) − Σ_i w⁺_{t,i} log ψ_t(s⁺_i)`` with stopped weights: its
    gradient is minus CTL's, so minimising it ascends CTL. ``negatives`` are prior draws."""
    loss = torch.zeros((), dtype=torch.float64, device=device)
    steps, positive_ess = 0, []
    width = min(twist.max_prefix_length, positives.tokens.shape[1] - 1,
                negatives.tokens.shape[1] - 1)
    for t in range(1, width + 1):
        pos_rows, neg_rows = _incomplete(positives, t), _incomplete(negatives, t)
        log_w = positive_log_w[pos_rows]
        if not neg_rows.any() or not torch.isfinite(log_w).any():
            continue
        weights = torch.softmax(log_w, 0).to(device)
        positive_ess.append(float(1 / (weights**2).sum()))
        log_psi_pos = twist(positives.tokens[pos_rows, :t].to(device))
        log_psi_neg = twist(negatives.tokens[neg_rows, :t].to(device))
        negative = torch.softmax(log_psi_neg.detach().double(), 0)
        loss = loss + (negative * log_psi_neg).sum() - (weights * log_psi_pos).sum()
        steps += 1
    if not steps:  # no prefix of positive target mass in this batch: a step without signal
        loss = loss + 0.0 * sum(p.sum() for p in twist.parameters())
    metrics = {"ctl_steps": float(steps),
               "positive_ess": min(positive_ess) if positive_ess else 0.0}
    return loss, metrics


def _incomplete(y: Sequences, t: int) -> torch.Tensor:
    """Rows whose prefix of length t is not yet complete: they have a token at position t."""
    return y.mask[:, t].cpu() if y.tokens.shape[1] > t else torch.zeros(len(y), dtype=torch.bool)
