"""`TwistLearning`: fit a `PrefixTwist` by contrastive twist learning (CTL, SPEC §11).

CTL (Zhao, Brekelmans, Makhzani & Grosse, ICML 2024, §4) fits ψ_t so that the intermediate
target π_t(s_{1:t}) ∝ a(s_{1:t}) ψ_t(s_{1:t}) matches σ's marginal on prefixes, whose twist is
the optimal ψ*_t = E_a[L | s_{1:t}]. Its gradient is

    Σ_t  E_σ[∇ log ψ_t(s_{1:t})] − E_{π_t}[∇ log ψ_t(s_{1:t})]

Each step draws ``batch_size`` sequences from the prior: the negative term weights their
prefixes by ψ_t (self-normalised, a = q so a/q = 1; a draw already complete at t keeps its
weight L, see `ctl_loss`); the positive term weights the same draws by L (self-normalised
importance sampling of σ), or takes ``exact_samples`` (exact target draws, e.g.
``Rejection(...).fit(target).samples``) with equal weights when they are given. A batch with no
positive mass is a step without signal (the negative term alone would only lower ψ).
With ``prefix_factors`` (the default, as `SMC`'s) the target's ``ba.prefix_constraint`` sites
multiply ψ_t in π_t as SMC multiplies them in, so the module learns only what those factors do
not say (the chance a clean prefix stays clean); train and run the twist with the same setting.
The loop is the shared `Trainer`'s: checkpoints, exact resume, history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from bayesalign.errors import ConfigError, VocabularyMismatchError
from bayesalign.sequences import Sequences
from bayesalign.targets import NO_CONTEXT, Target
from bayesalign.training import Trainer, TrainingConfig

from .base import one_context
from .twists import PrefixTwist, TableTwist, log_prefix_factor, prefix_checks


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
    prefix_factors: bool = True  # π_t also holds the target's prefix constraints (as SMC's)

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
            raise VocabularyMismatchError(
                f"TwistLearning: the twist was built for vocabulary {twist.vocabulary_id}, the "
                f"prior's is {tuple(prior.vocabulary_id)}")
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
            base = prefix_log_factors(target, draws, twist.max_prefix_length, context) \
                if self.prefix_factors else None
            return ctl_loss(twist, positives, positive_log_w, draws, log_potential,
                            trainer.device, negative_log_base=base)

        twist.history = trainer.run(step)
        return twist


def ctl_loss(
    twist: PrefixTwist, positives: Sequences, positive_log_w: torch.Tensor, negatives: Sequences,
    negative_log_potential: torch.Tensor, device: torch.device | str = "cpu",
    negative_log_ratio: torch.Tensor | None = None,
    negative_log_base: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``Σ_t Σ_i w⁻_{t,i} log ψ_t(s⁻_i) − Σ_i w⁺_i log ψ_t(s⁺_i)`` over the draws still
    incomplete at t, with stopped weights: its gradient is minus CTL's, so minimising it ascends
    CTL. ``negatives`` are prior draws with their log L; draws from another q (or a whole
    enumerated support) need ``negative_log_ratio`` = log a(s)/q(s) of each draw, which weights
    its prefixes correctly too (the future's ratio averages to 1 under q).
    ``negative_log_base`` ``[n, ≥ width]``: log of a fixed factor ψ_t is multiplied by in π_t
    (`prefix_log_factors`: the target's prefix constraints, 0 or −inf per prefix).

    π_t covers every draw at step t: a complete one at its P = a·L (weight L under the prior),
    an incomplete one at a·ψ_t, so both terms normalise over all draws. That fixes ψ_t's scale
    against L (its fixed point is ψ* itself, not ψ* up to a constant per t), which matters once
    particles finish at different steps.
    """
    loss = torch.zeros((), dtype=torch.float64, device=device)
    steps = 0
    width = min(twist.max_prefix_length, positives.tokens.shape[1] - 1,
                negatives.tokens.shape[1] - 1)
    positive_log_w = positive_log_w.double().cpu()
    log_ratio = torch.zeros(len(negatives), dtype=torch.float64) if negative_log_ratio is None \
        else negative_log_ratio.double().cpu()
    negative_log_potential = negative_log_potential.double().cpu() + log_ratio
    if width >= 1 and torch.isfinite(positive_log_w).any():
        positive = torch.softmax(positive_log_w, 0).to(device)
        # One call per batch for every t: a hidden-state twist runs the prior once.
        log_psi_pos = twist.all_prefixes(positives.tokens[:, :width].to(device))
        log_psi_neg = twist.all_prefixes(negatives.tokens[:, :width].to(device))
        for t in range(1, width + 1):
            pos_rows, neg_rows = _incomplete(positives, t), _incomplete(negatives, t)
            if not neg_rows.any():
                continue
            log_gamma = negative_log_potential.clone().to(device)
            log_incomplete = log_psi_neg[neg_rows.to(device), t - 1].detach().double() \
                + log_ratio[neg_rows].to(device)
            if negative_log_base is not None:
                log_incomplete = log_incomplete + negative_log_base[neg_rows, t - 1].to(device)
            log_gamma[neg_rows.to(device)] = log_incomplete
            if not torch.isfinite(log_gamma).any():  # π_t has no mass on these draws
                continue
            negative = torch.softmax(log_gamma, 0)[neg_rows.to(device)]
            loss = (loss + (negative * log_psi_neg[neg_rows.to(device), t - 1]).sum()
                    - (positive[pos_rows.to(device)] * log_psi_pos[pos_rows.to(device), t - 1]).sum())
            steps += 1
        ess = float(1 / (positive**2).sum())
    else:
        ess = 0.0
    if not steps:  # no draw of positive target mass in this batch: a step without signal
        loss = loss + 0.0 * sum(p.sum() for p in twist.parameters())
    return loss, {"ctl_steps": float(steps), "positive_ess": ess}


def prefix_log_factors(target: Target, draws: Sequences, width: int,
                       context: Any = NO_CONTEXT) -> torch.Tensor | None:
    """``log Π 1[holds(s_{1:t})]`` of the target's prefix constraints for t = 1..width, float64
    ``[n, width]`` (0 or −inf; a row's entries past its end are meaningless and unused); None
    when the target declares none."""
    width = min(width, draws.tokens.shape[1])
    checks = prefix_checks(target, draws[:1], context)
    if not checks:
        return None
    return torch.stack([
        log_prefix_factor(checks, Sequences(tokens=draws.tokens[:, :t], mask=draws.mask[:, :t],
                                            context=draws.context, decoder=draws.decoder),
                          f"on prefixes of length {t} (TwistLearning)")
        for t in range(1, width + 1)], -1)


def _incomplete(y: Sequences, t: int) -> torch.Tensor:
    """Rows whose prefix of length t is not yet complete: they have a token at position t."""
    return y.mask[:, t].cpu() if y.tokens.shape[1] > t else torch.zeros(len(y), dtype=torch.bool)
