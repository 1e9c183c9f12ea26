"""KL-regularised RL: maximise E_π[log L(y)] − KL(π‖a), whose optimum is the declared target
p ∝ a·L (SPEC §1.1, §3). With ``ba.reward(name, r, kl_coef)`` the factor is r/kl_coef, so this is
the familiar E[r] − kl_coef·KL divided by kl_coef: one declared target, one posterior.

The penalised reward R = log L − c·k(y) uses a KL estimator k on sequence log-ratios
log ρ = log a − log π (Schulman): k1 = −log ρ, k2 = ½(log ρ)², k3 = (ρ − 1) − log ρ.
Where it goes matters for the gradient of KL(π‖a):
- k1 in the reward (the default, TRL's RLOO) is unbiased: E[(log π − log a)∇log π] = ∇KL;
- k2 in the loss is unbiased too: ∇½(log π − log a)² = (log π − log a)∇log π;
- k1 or k3 in the loss, and k2 or k3 in the reward, are biased (a warning says so).
A hard constraint (log L = −inf) is given the finite ``constraint_penalty``: the objective is
then the target with L clipped at e^penalty on violating sequences.

``loss_normalisation`` (REINFORCE, RLOO): "sequence" (the default) is the score-function loss
−mean A·log π_θ(y), the unbiased gradient of the objective; "token" divides each sequence's
log π_θ by its number of tokens, so that long sequences do not dominate the step, at the price
of a gradient that is no longer the objective's when lengths differ. PPO's clipped surrogate
is a per-token mean over each sequence already. Divergence detection: `divergence`.

PPO's advantages: ``advantage="rloo"`` (the default) gives every token of a sequence its RLOO
advantage; ``advantage="gae"`` trains a value head (`value_head`) with a clipped value loss and
gives token t the GAE of the per-token rewards −c·k_t, plus log L on the last token. What a run
carries from step to step and checkpoints (c, the baseline, the PPO rollout): `klrl_state`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import ConfigError, require_positive
from bayesalign.posterior import Posterior
from bayesalign.sequences import Sequences
from bayesalign.targets import NO_CONTEXT, Target
from bayesalign.training import Trainer
from bayesalign.training.processes import gather

from .divergence import DivergenceMonitor, DivergenceOptions
from .klrl_state import KLRLState, PPORollout, RolloutGroup
from .policy import (
    PolicyEngineConfig,
    ScoredBatch,
    contexts_digest,
    finish,
    mean_metrics,
    pick_contexts,
    require_loss_normalisation,
    score_batch,
)
from .value_head import (
    PolicyAndValue,
    Trainable,
    ValueHead,
    clipped_value_loss,
    gae,
    token_rewards,
    value_head_for,
    whiten,
)

ALGORITHMS = ("reinforce", "rloo", "ppo")
ADVANTAGES = ("rloo", "gae")
UNBIASED = {("k1", "reward"), ("k2", "loss")}


def kl_estimate(estimator: str, log_ratio: torch.Tensor) -> torch.Tensor:
    """k(y) from ``log_ratio = log π − log a`` (so log ρ = −log_ratio)."""
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    return torch.expm1(-log_ratio) + log_ratio  # k3 = (ρ − 1) − log ρ


def rloo_advantage(reward: torch.Tensor) -> torch.Tensor:
    """R_i − b_i, b_i the mean reward of the group's other samples (§3.2, Kool et al. 2019);
    the group is the step's draws for the context on every process."""
    group = gather(reward)
    return reward - (group.sum() - reward) / (group.numel() - 1)


def clipped_surrogate(new: torch.Tensor, old: torch.Tensor, advantage: torch.Tensor,
                      mask: torch.Tensor, clip: float) -> torch.Tensor:
    """PPO's min(ρ_t A, clip(ρ_t, 1 ± ε) A) per token, ρ_t = π/π_old, averaged per sequence (§3.2)."""
    ratio = torch.exp(new - old)
    clipped = torch.clamp(ratio, 1 - clip, 1 + clip)
    surrogate = torch.minimum(ratio * advantage, clipped * advantage)
    return (surrogate * mask).sum(-1) / mask.sum(-1).clamp(min=1)


@dataclass
class KLRL(PolicyEngineConfig, DivergenceOptions):
    """REINFORCE, RLOO or PPO on the KL-penalised reward of a declared target (RLOO groups
    samples by context)."""

    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = (*PolicyEngineConfig.RESUMABLE_CHANGES,
                                                     *DivergenceOptions.RESUMABLE_CHANGES)

    algorithm: str = "rloo"  # reinforce (moving-average baseline) | rloo | ppo
    kl_estimator: str = "k1"  # k1 | k2 | k3
    kl_placement: str = "reward"  # reward | loss; unbiased pairs: (k1, reward), (k2, loss)
    kl_scale: float = 1.0  # multiplier c on KL(π‖a); 1 targets the declared posterior exactly
    target_kl: float | None = None  # set to adapt c towards this KL(π‖a) in nats (logged)
    adaptive_kl_gain: float = 0.1  # K_β of the adaptive controller
    ppo_epochs: int = 4  # PPO: optimisation passes over each rollout
    ppo_minibatches: int = 1  # PPO: minibatches per pass (one optimizer step each)
    ppo_clip: float = 0.2  # PPO: ε of the clipped ratio
    advantage: str = "rloo"  # PPO: "rloo" (per sequence) | "gae" (value head, per token)
    gae_lambda: float = 0.95  # GAE: λ in [0, 1] (1: Monte-Carlo return minus V)
    gamma: float = 1.0  # GAE: discount in (0, 1]; 1 keeps the objective the declared target's
    value_coef: float = 0.1  # GAE: weight of the value loss in the joint loss
    value_clip: float | None = 0.2  # GAE: ε of the clipped value loss; None: unclipped
    value_learning_rate: float | None = None  # GAE: the value head's rate; None: the policy's
    whiten_advantages: bool = True  # GAE: normalise each group's token advantages (TRL's default)
    constraint_penalty: float = -30.0  # log L given to sequences violating a hard constraint
    loss_normalisation: str = "sequence"  # reinforce/rloo: A·log π ("sequence"), or / length
    name: str = field(init=False, default="KLRL")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ConfigError(f"kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}")
        if self.kl_placement not in ("reward", "loss"):
            raise ConfigError(f"kl_placement must be reward or loss, got {self.kl_placement!r}")
        require_positive("kl_scale", self.kl_scale)
        if self.target_kl is not None:
            require_positive("target_kl", self.target_kl)
        require_positive("ppo_epochs", self.ppo_epochs)
        require_positive("ppo_minibatches", self.ppo_minibatches)
        require_loss_normalisation(self.loss_normalisation)
        if self.loss_normalisation == "token" and self.algorithm == "ppo":
            raise ConfigError("loss_normalisation='token' is for reinforce and rloo: PPO's "
                              "clipped surrogate is already a per-token mean over each sequence")
        self._check_advantage_options()
        self.check_divergence_options()
        if self.batch_size < 2 and self.algorithm != "reinforce":
            raise ConfigError("RLOO and PPO need batch_size >= 2 (a leave-one-out baseline)")
        if (self.kl_estimator, self.kl_placement) not in UNBIASED:
            warnings.warn(
                f"KLRL: {self.kl_estimator} in the {self.kl_placement} gives a biased gradient of "
                "KL(π‖a); the optimum is then not the declared target. Unbiased: k1 in the "
                "reward (default) or k2 in the loss", stacklevel=3)
        self.name = f"KLRL-{self.algorithm}"

    def _check_advantage_options(self) -> None:
        if self.advantage not in ADVANTAGES:
            raise ConfigError(f"advantage must be one of {ADVANTAGES}, got {self.advantage!r}")
        if self.advantage == "gae" and self.algorithm != "ppo":
            raise ConfigError(f"advantage='gae' is for algorithm='ppo' (it needs PPO's value "
                              f"head), got algorithm={self.algorithm!r}")
        if self.advantage == "gae" and self.kl_placement != "reward":
            raise ConfigError("advantage='gae' puts the KL penalty in the per-token rewards; "
                              "kl_placement must be 'reward'")
        if not 0 <= self.gae_lambda <= 1:
            raise ConfigError(f"gae_lambda must lie in [0, 1], got {self.gae_lambda}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma must lie in (0, 1], got {self.gamma}")
        require_positive("value_coef", self.value_coef)
        if self.value_clip is not None:
            require_positive("value_clip", self.value_clip)
        if self.value_learning_rate is not None:
            require_positive("value_learning_rate", self.value_learning_rate)

    def fit(self, target: Target, context: Any = NO_CONTEXT, *, contexts: Any = None) -> Posterior:
        """Fit π for one ``context``, or amortised over several ``contexts``."""
        contexts, policy = self.contexts_and_policy(target, context, contexts)
        state = KLRLState(contexts_digest(contexts), self.kl_scale)
        value = value_head_for(policy) if self.advantage == "gae" else None
        trained = policy if value is None else Trainable(
            PolicyAndValue(policy.module, value, self.value_learning_rate),
            policy.recommended_optimizer)
        trainer = Trainer(self, trained, self.name, {"klrl": state})
        monitor = DivergenceMonitor(self, self.name, state.divergence, trainer.last_checkpoint_note)
        updates_per_rollout = self.ppo_epochs * self.ppo_minibatches

        def step(step_index: int) -> tuple[torch.Tensor, dict[str, float]]:
            if self.algorithm != "ppo":
                return self._policy_gradient_step(target, policy, contexts, state, monitor,
                                                  step_index)
            if step_index % updates_per_rollout == 0 or state.rollout is None:
                state.rollout = self._rollout(target, policy, contexts, state, monitor, step_index,
                                              value)
            return self._ppo_step(policy, state.rollout, step_index % updates_per_rollout, value)

        history = trainer.run(step)
        return finish(target, policy, self.name, contexts, history,
                      {"algorithm": self.algorithm, "advantage": self.advantage,
                       "kl_estimator": self.kl_estimator,
                       "kl_placement": self.kl_placement, "steps": self.steps,
                       "batch_size": self.batch_size}, self.eval_samples, seed=self.seed)

    def _scored_groups(self, target: Target, policy: SequenceDistribution, contexts: list[Any]
                       ) -> Iterator[tuple[SequenceDistribution, ScoredBatch]]:
        """Draw the step's contexts, then π's samples for each, scored by the target."""
        chosen = pick_contexts(contexts, self.contexts_per_step)
        per_context = max(2, self.batch_size // len(chosen))
        for c in chosen:
            conditional = policy.given(c)
            yield conditional, score_batch(target, conditional, per_context, c)

    def _task_reward(self, batch: ScoredBatch) -> tuple[torch.Tensor, float]:
        """log L(y), ``constraint_penalty`` where a hard constraint fails, and the failing fraction."""
        log_potential = batch.log_score - batch.log_prior
        violated = torch.isneginf(log_potential)
        return log_potential.masked_fill(violated, self.constraint_penalty), float(
            gather(violated.float()).mean())

    def _policy_gradient_step(self, target: Target, policy: SequenceDistribution,
                              contexts: list[Any], state: KLRLState, monitor: DivergenceMonitor,
                              step_index: int) -> tuple[torch.Tensor, dict[str, float]]:
        """REINFORCE or RLOO on R = log L − c·k (§3.2), k in the reward or in the loss."""
        losses, rows, signals = [], [], []
        c = state.kl_scale
        for conditional, batch in self._scored_groups(target, policy, contexts):
            log_pi = conditional.token_log_probs(batch.y).sum(-1)
            log_ratio = log_pi.detach().double() - batch.log_prior
            task, violated = self._task_reward(batch)
            reward = task - c * kl_estimate(self.kl_estimator, log_ratio) \
                if self.kl_placement == "reward" else task
            advantage = rloo_advantage(reward) if self.algorithm == "rloo" \
                else state.reinforce_advantage(reward)
            scored = log_pi if self.loss_normalisation == "sequence" \
                else log_pi / batch.y.lengths.to(log_pi.device).clamp(min=1)
            loss = -(advantage.to(log_pi.dtype) * scored).mean()
            if self.kl_placement == "loss":
                grad_ratio = log_pi - batch.log_prior.to(log_pi.dtype)
                loss = loss + c * kl_estimate(self.kl_estimator, grad_ratio).mean()
            losses.append(loss)
            rows.append(_metrics(task, log_ratio, violated, c))
            signals.append(_signals(monitor, batch, rows[-1]))
        self._adapt(state, rows)
        return torch.stack(losses).mean(), {**mean_metrics(rows),
                                            **monitor.check(step_index, signals)}

    def _adapt(self, state: KLRLState, rows: list[dict[str, float]]) -> None:
        """Adapt c to the step's KL(π‖a) when ``target_kl`` is set."""
        if self.target_kl is not None:
            kl = sum(r["kl_policy_prior"] for r in rows) / len(rows)
            state.adapt_kl_scale(kl, self.target_kl, self.adaptive_kl_gain)

    def _rollout(self, target: Target, policy: SequenceDistribution, contexts: list[Any],
                 state: KLRLState, monitor: DivergenceMonitor, step_index: int,
                 value: ValueHead | None) -> PPORollout:
        """One PPO rollout: samples, old per-token log-probs and advantages (RLOO of the
        sequence reward, or GAE); the divergence signals are checked once per rollout."""
        groups, rows, signals = [], [], []
        for conditional, batch in self._scored_groups(target, policy, contexts):
            y = batch.y
            with torch.no_grad():
                if value is None:
                    old, old_values = conditional.token_log_probs(y).double(), None
                else:
                    old, old_values = value.score(conditional, y)
            log_ratio = old.sum(-1) - batch.log_prior
            task, violated = self._task_reward(batch)
            if value is None:
                reward = task - state.kl_scale * kl_estimate(self.kl_estimator, log_ratio)
                groups.append(RolloutGroup(y.tokens, y.mask, y.context, batch.context, old,
                                           rloo_advantage(reward)))
            else:
                groups.append(self._gae_group(target, batch, task, old, old_values,
                                              state.kl_scale))
            rows.append(_metrics(task, log_ratio, violated, state.kl_scale))
            signals.append(_signals(monitor, batch, rows[-1]))
        self._adapt(state, rows)
        return PPORollout(groups, {**mean_metrics(rows), **monitor.check(step_index, signals)})

    def _gae_group(self, target: Target, batch: ScoredBatch, task: torch.Tensor,
                   old: torch.Tensor, old_values: torch.Tensor, kl_scale: float) -> RolloutGroup:
        """A rollout group with GAE advantages of the per-token rewards and value targets."""
        y = batch.y
        mask = y.mask.to(old.device)
        with torch.no_grad():
            prior_tokens = target.prior(batch.context).token_log_probs(y).double().to(old.device)
        rewards = token_rewards(task.to(old.device),
                                kl_estimate(self.kl_estimator, old - prior_tokens), mask,
                                kl_scale)
        advantage, returns = gae(rewards, old_values, mask, self.gamma, self.gae_lambda)
        if self.whiten_advantages:
            advantage = whiten(advantage, mask)
        return RolloutGroup(y.tokens, y.mask, y.context, batch.context, old, advantage,
                            old_values, returns)

    def _ppo_step(self, policy: SequenceDistribution, rollout: PPORollout, update_index: int,
                  value: ValueHead | None) -> tuple[torch.Tensor, dict[str, float]]:
        """One clipped-surrogate minibatch update on the cached rollout (per-token ratios),
        plus the clipped value loss with GAE."""
        minibatch = update_index % self.ppo_minibatches
        losses, value_losses = [], []
        for group in rollout.groups:
            y_all = Sequences(group.tokens, group.mask, context=group.row_context)
            rows = torch.arange(len(y_all)).chunk(self.ppo_minibatches)[minibatch]
            if len(rows) == 0:
                continue
            y = y_all[rows]
            conditional = policy.given(group.context)
            if value is None:
                new, values = conditional.token_log_probs(y), None
            else:
                new, values = value.score(conditional, y)
            advantage = group.advantage[rows].to(new)
            mask = y.mask.to(new.device)
            per_sequence = clipped_surrogate(
                new, group.old_log_probs[rows].to(new),
                advantage[:, None] if advantage.dim() == 1 else advantage, mask, self.ppo_clip)
            loss = -per_sequence.mean()
            if values is not None:
                value_loss = clipped_value_loss(values, group.old_values[rows].to(values),
                                                group.returns[rows].to(values), mask,
                                                self.value_clip)
                value_losses.append(float(value_loss.detach()))
                loss = loss + self.value_coef * value_loss
            losses.append(loss)
        metrics = {**rollout.metrics, "ppo_update": float(update_index)}
        if value_losses:
            metrics["value_loss"] = sum(value_losses) / len(value_losses)
        return torch.stack(losses).mean(), metrics


def _signals(monitor: DivergenceMonitor, batch: ScoredBatch,
             metrics: dict[str, float]) -> dict[str, float]:
    """The divergence signals of one context's on-policy draws (weights P/π)."""
    return monitor.signals(str(batch.context), batch.log_w, batch.log_score - batch.log_prior,
                           metrics["kl_policy_prior"])


def _metrics(task: torch.Tensor, log_ratio: torch.Tensor, violated: float,
             kl_scale: float) -> dict[str, float]:
    """E log L, KL(π‖a) and their difference (the objective over kl_coef) of one group, on
    every process' draws."""
    task, kl = gather(task), float(gather(log_ratio).mean())
    return {"log_potential": float(task.mean()), "kl_policy_prior": kl,
            "objective": float(task.mean()) - kl, "kl_scale": kl_scale,
            "constraint_violations": violated}
