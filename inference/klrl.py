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
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from bayesalign.errors import ConfigError, require_positive
from bayesalign.posterior import Posterior
from bayesalign.sequences import Sequences
from bayesalign.targets import NO_CONTEXT, Target
from bayesalign.training import Trainer

from .policy import PolicyEngineConfig, finish, pick_contexts, score_batch

ALGORITHMS = ("reinforce", "rloo", "ppo")
UNBIASED = {("k1", "reward"), ("k2", "loss")}


def kl_estimate(estimator: str, log_ratio: torch.Tensor) -> torch.Tensor:
    """k(y) from ``log_ratio = log π − log a`` (so log ρ = −log_ratio)."""
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    return torch.expm1(-log_ratio) + log_ratio  # k3 = (ρ − 1) − log ρ


def leave_one_out(values: torch.Tensor) -> torch.Tensor:
    """RLOO baseline: for each sample, the mean of the others (Kool et al. 2019)."""
    n = values.numel()
    return (values.sum() - values) / (n - 1)


class _Controller:
    """Adaptive KL multiplier c (Ziegler et al. 2019): c ← c(1 + K·clip(KL/target − 1, ±0.2))."""

    def __init__(self, value: float) -> None:
        self.value = value
        self.reward_baseline = 0.0
        self.rollout: dict | None = None

    def state_dict(self) -> dict:
        return {"value": self.value, "reward_baseline": self.reward_baseline,
                "rollout": self.rollout}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.reward_baseline = state["value"], state["reward_baseline"]
        self.rollout = state["rollout"]


@dataclass
class KLRL(PolicyEngineConfig):
    """REINFORCE, RLOO or PPO on the KL-penalised reward of a declared target (RLOO groups
    samples by context)."""

    algorithm: str = "rloo"  # reinforce (moving-average baseline) | rloo | ppo (RLOO advantages)
    kl_estimator: str = "k1"  # k1 | k2 | k3
    kl_placement: str = "reward"  # reward | loss; unbiased pairs: (k1, reward), (k2, loss)
    kl_scale: float = 1.0  # multiplier c on KL(π‖a); 1 targets the declared posterior exactly
    target_kl: float | None = None  # set to adapt c towards this KL(π‖a) in nats (logged)
    adaptive_kl_gain: float = 0.1  # K_β of the adaptive controller
    ppo_epochs: int = 4  # PPO: optimisation passes over each rollout
    ppo_minibatches: int = 1  # PPO: minibatches per pass (one optimizer step each)
    ppo_clip: float = 0.2  # PPO: ε of the clipped ratio
    constraint_penalty: float = -30.0  # log L given to sequences violating a hard constraint
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
        if self.batch_size < 2 and self.algorithm != "reinforce":
            raise ConfigError("RLOO and PPO need batch_size >= 2 (a leave-one-out baseline)")
        if (self.kl_estimator, self.kl_placement) not in UNBIASED:
            warnings.warn(
                f"KLRL: {self.kl_estimator} in the {self.kl_placement} gives a biased gradient of "
                "KL(π‖a); the optimum is then not the declared target. Unbiased: k1 in the "
                "reward (default) or k2 in the loss", stacklevel=3)
        self.name = f"KLRL-{self.algorithm}"

    def fit(self, target: Target, context: Any = NO_CONTEXT) -> Posterior:
        contexts, policy = self.contexts_and_policy(target, context)
        controller = _Controller(self.kl_scale)
        trainer = Trainer(self, policy, self.name, {"controller": controller})
        updates_per_rollout = self.ppo_epochs * self.ppo_minibatches

        def step(step_index: int) -> tuple[torch.Tensor, dict[str, float]]:
            if self.algorithm != "ppo":
                return self._policy_gradient_step(target, policy, contexts, controller)
            if step_index % updates_per_rollout == 0 or controller.rollout is None:
                controller.rollout = self._rollout(target, policy, contexts, controller)
            return self._ppo_step(policy, controller, step_index % updates_per_rollout)

        history = trainer.run(step)
        return finish(target, policy, self.name, contexts, history,
                      {"algorithm": self.algorithm, "kl_estimator": self.kl_estimator,
                       "kl_placement": self.kl_placement, "steps": self.steps,
                       "batch_size": self.batch_size}, self.eval_samples, seed=self.seed)

    def _scored_groups(self, target, policy, contexts):
        chosen = pick_contexts(contexts, self.contexts_per_step)
        per_context = max(2, self.batch_size // len(chosen))
        for c in chosen:
            conditional = policy if c is NO_CONTEXT else policy.given(c)
            yield conditional, score_batch(target, conditional, per_context, c)

    def _task_reward(self, batch) -> tuple[torch.Tensor, float]:
        log_potential = batch.log_score - batch.log_prior
        violated = torch.isneginf(log_potential)
        return log_potential.masked_fill(violated, self.constraint_penalty), float(
            violated.float().mean())

    def _policy_gradient_step(self, target, policy, contexts, controller):
        losses, rows = [], []
        for conditional, batch in self._scored_groups(target, policy, contexts):
            log_pi = conditional.token_log_probs(batch.y).sum(-1)
            log_ratio = log_pi.detach().double() - batch.log_prior
            task, violated = self._task_reward(batch)
            c = controller.value
            reward = task - c * kl_estimate(self.kl_estimator, log_ratio) \
                if self.kl_placement == "reward" else task
            if self.algorithm == "rloo":
                advantage = reward - leave_one_out(reward)
            else:
                advantage = reward - controller.reward_baseline
                controller.reward_baseline = 0.9 * controller.reward_baseline + 0.1 * float(
                    reward.mean())
            loss = -(advantage.to(log_pi.dtype) * log_pi).mean()
            if self.kl_placement == "loss":
                grad_ratio = log_pi - batch.log_prior.to(log_pi.dtype)
                loss = loss + c * kl_estimate(self.kl_estimator, grad_ratio).mean()
            losses.append(loss)
            rows.append(self._metrics(task, log_ratio, violated, c))
        self._adapt(controller, rows)
        return torch.stack(losses).mean(), _mean_rows(rows)

    def _metrics(self, task, log_ratio, violated, c) -> dict[str, float]:
        kl = float(log_ratio.mean())
        return {"log_potential": float(task.mean()), "kl_policy_prior": kl,
                "objective": float(task.mean()) - kl, "kl_scale": c,
                "constraint_violations": violated}

    def _adapt(self, controller: _Controller, rows: list[dict[str, float]]) -> None:
        if self.target_kl is None:
            return
        kl = sum(r["kl_policy_prior"] for r in rows) / len(rows)
        error = max(-0.2, min(0.2, kl / self.target_kl - 1))
        controller.value *= 1 + self.adaptive_kl_gain * error

    def _rollout(self, target, policy, contexts, controller) -> dict:
        """One PPO rollout: samples, old per-token log-probs and RLOO advantages (k1 reward)."""
        groups, rows = [], []
        for conditional, batch in self._scored_groups(target, policy, contexts):
            with torch.no_grad():
                old = conditional.token_log_probs(batch.y).double()
            log_ratio = old.sum(-1) - batch.log_prior
            task, violated = self._task_reward(batch)
            reward = task - controller.value * kl_estimate(self.kl_estimator, log_ratio)
            # Plain tensors (no decoder closure), so a checkpoint taken mid-rollout pickles.
            groups.append({"tokens": batch.y.tokens, "mask": batch.y.mask,
                           "row_context": batch.y.context, "context": batch.context,
                           "old": old, "advantage": reward - leave_one_out(reward)})
            rows.append(self._metrics(task, log_ratio, violated, controller.value))
        self._adapt(controller, rows)
        return {"groups": groups, "metrics": _mean_rows(rows)}

    def _ppo_step(self, policy, controller, update_index: int):
        """One clipped-surrogate minibatch update on the cached rollout (per-token ratios)."""
        rollout = controller.rollout
        minibatch = update_index % self.ppo_minibatches
        losses = []
        for group in rollout["groups"]:
            y_all = Sequences(group["tokens"], group["mask"], context=group["row_context"])
            rows = torch.arange(len(y_all)).chunk(self.ppo_minibatches)[minibatch]
            if len(rows) == 0:
                continue
            y = y_all[rows]
            conditional = policy if group["context"] is NO_CONTEXT else policy.given(
                group["context"])
            new = conditional.token_log_probs(y)
            mask = y.mask.to(new.device)
            ratio = torch.exp(new - group["old"][rows].to(new))
            advantage = group["advantage"][rows].to(new)[:, None]
            clipped = torch.clamp(ratio, 1 - self.ppo_clip, 1 + self.ppo_clip)
            surrogate = torch.minimum(ratio * advantage, clipped * advantage)
            per_sequence = (surrogate * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            losses.append(-per_sequence.mean())
        metrics = dict(rollout["metrics"])
        metrics["ppo_update"] = float(update_index)
        return torch.stack(losses).mean(), metrics


def _mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {
        "objective": math.nan}
