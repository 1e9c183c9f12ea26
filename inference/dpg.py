"""Distributional Policy Gradient: fit π_θ to p by minimising an f-divergence, forward KL
KL(p‖π) by default (SPEC §2.1), on-policy or off-policy with the KL-adaptive proposal swap
(§2.2), with the Ẑ baseline (§2.3), f-DPG divergences, and per-context Ẑ_c (CDPG, §2.5).

The update for samples x ∼ q, with t = π/p and p = P/Ẑ (Go et al. 2023):

    loss = mean_i  (π(x_i)/q(x_i)) · (f'(t_i) − b) · log π_θ(x_i)

For forward KL, f'(t) = −p/π, so the loss is −mean (P/(Ẑ q)) log π (gdc's DPG), and the baseline
b = E_π f' = −1 gives the advantage P/(Ẑ q) − π/q of DPG with baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from bayesalign import diagnostics as dx
from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import ConfigError, EmptySupportError, require_positive
from bayesalign.posterior import Posterior
from bayesalign.targets import NO_CONTEXT, Target
from bayesalign.training import Trainer

from .policy import PolicyEngineConfig, ScoredBatch, finish, pick_contexts, score_batch

DIVERGENCES = ("kl", "reverse_kl", "tv", "js")
MAX_LOG_RATIO = 50.0


def f_prime(divergence: str, log_t: torch.Tensor) -> torch.Tensor:
    """f'(t) at ``log t = log π − log p`` for D_f(π‖p) = E_p f(π/p)."""
    if divergence == "kl":  # f(t) = −log t: D_f = KL(p‖π)
        return -torch.exp(-log_t)
    if divergence == "reverse_kl":  # f(t) = t log t: D_f = KL(π‖p)
        # Where p = 0 (a violated constraint) f' is +inf; cap it so the push-down stays finite.
        return log_t.clamp(max=MAX_LOG_RATIO) + 1
    if divergence == "tv":  # f(t) = ½|t − 1|
        return 0.5 * torch.sign(log_t)
    # JS: f(t) = ½[t log t − (1 + t) log((1 + t)/2)], f'(t) = ½ log(2t/(1 + t)),
    # written with softplus(−log t) so t = inf (p = 0) gives the finite limit ½ log 2.
    return 0.5 * (math.log(2) - F.softplus(-log_t))


class RunningLogZ:
    """Running mean of importance weights per context: log Ẑ_c pooled over all steps (§2.2)."""

    def __init__(self) -> None:
        self.log_sum: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def update(self, key: str, log_w: torch.Tensor) -> float:
        batch = float(torch.logsumexp(log_w, 0))
        self.log_sum[key] = float(torch.logaddexp(torch.tensor(self.log_sum.get(key, -math.inf)),
                                                  torch.tensor(batch)))
        self.count[key] = self.count.get(key, 0) + log_w.numel()
        return self.log_z(key)

    def log_z(self, key: str) -> float:
        return self.log_sum[key] - math.log(self.count[key])

    def state_dict(self) -> dict:
        return {"log_sum": dict(self.log_sum), "count": dict(self.count)}

    def load_state_dict(self, state: dict) -> None:
        self.log_sum, self.count = dict(state["log_sum"]), dict(state["count"])


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

    def state_dict(self) -> dict:
        module = None if self.copy is None else self.copy.module.state_dict()
        return {"swaps": self.swaps, "module": module}

    def load_state_dict(self, state: dict) -> None:
        self.swaps = state["swaps"]
        if state["module"] is not None:
            self.swap()
            self.swaps = state["swaps"]
            self.copy.module.load_state_dict(state["module"])


@dataclass
class DPG(PolicyEngineConfig):
    """DPG and its family; a conditional target with ``contexts`` gives CDPG."""

    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = (*PolicyEngineConfig.RESUMABLE_CHANGES,
                                                     "proposal")

    divergence: str = "kl"  # f-divergence D_f(π‖p): kl (= forward KL(p‖π)), reverse_kl, tv, js
    baseline: bool = False  # forward KL: the exact Ẑ baseline; others: running mean of f'
    off_policy: bool = False  # sample from a frozen proposal q, swapped to π when KL improves
    proposal: SequenceDistribution | None = None  # initial off-policy proposal (prior by default)
    proposal_update_interval: int = 16  # steps between KL checks for the proposal swap
    proposal_update_samples: int = 512  # fresh draws from q for each KL check
    per_context_z: bool = True  # CDPG's Ẑ_c; False is the single-global-Z ablation
    name: str = field(init=False, default="DPG")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.divergence not in DIVERGENCES:
            raise ConfigError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        require_positive("proposal_update_interval", self.proposal_update_interval)
        if self.contexts is not None:
            self.name = "CDPG"

    def fit(self, target: Target, context: Any = NO_CONTEXT) -> Posterior:
        contexts, policy = self.contexts_and_policy(target, context)
        log_z = RunningLogZ()
        baseline = {"value": -1.0 if self.divergence == "kl" else 0.0}
        state = {"log_z": log_z, "baseline": _Scalar(baseline)}
        proposal = None
        if self.off_policy:
            initial = self.proposal or target.prior(contexts[0])
            proposal = Proposal(initial, policy)
            state["proposal"] = proposal
        trainer = Trainer(self, policy, self.name, state)

        def step(step_index: int) -> tuple[torch.Tensor, dict[str, float]]:
            chosen = pick_contexts(contexts, self.contexts_per_step)
            per_context = max(1, self.batch_size // len(chosen))
            losses, metrics = [], []
            for c in chosen:
                conditional = policy if c is NO_CONTEXT else policy.given(c)
                q = conditional if proposal is None else _given(proposal.current(), c)
                batch = score_batch(target, q, per_context, c)
                key = str(c) if self.per_context_z else "global"
                current = log_z.update(key, trainer.gather(batch.log_w))
                if not math.isfinite(current):
                    if len(contexts) == 1:
                        raise EmptySupportError(
                            f"{self.name} step {step_index}: all {len(batch.y)} importance "
                            f"weights are zero for context {c!r} and no earlier step had a "
                            "positive one; every sample violates a constraint — use a proposal "
                            "that reaches the target's support"
                        )
                    # CDPG: no draw for c has had P > 0 yet, so every P/(Ẑ_c q) is 0 whatever
                    # Ẑ_c is; one empty context among many is routine under a hard constraint.
                    current = 0.0
                loss, info = self._loss(conditional, batch, current, baseline)
                losses.append(loss)
                metrics.append(info)
            if proposal is not None and (step_index + 1) % self.proposal_update_interval == 0:
                metrics[0].update(self._maybe_swap(target, proposal, policy, chosen[0]))
            metrics[0]["proposal_swaps"] = float(proposal.swaps) if proposal else 0.0
            merged = {k: sum(m[k] for m in metrics if k in m) / len(metrics) for k in metrics[0]}
            return torch.stack(losses).mean(), merged

        history = trainer.run(step)
        running = {f"running_log_z[{key}]": log_z.log_z(key) for key in log_z.count}
        return finish(target, policy, self.name, contexts, history,
                      {"divergence": self.divergence, "baseline": self.baseline,
                       "off_policy": self.off_policy, "steps": self.steps,
                       "batch_size": self.batch_size}, self.eval_samples, running, seed=self.seed)

    def _loss(
        self, policy: SequenceDistribution, batch: ScoredBatch, log_z: float, baseline: dict
    ) -> tuple[torch.Tensor, dict[str, float]]:
        log_pi = policy.token_log_probs(batch.y).sum(-1)
        log_pi_detached = log_pi.detach().double()
        pi_over_q = torch.exp(log_pi_detached - batch.log_q)
        log_t = log_pi_detached - (batch.log_score - log_z)
        grad_weight = f_prime(self.divergence, log_t)
        if self.baseline:
            if self.divergence != "kl":
                baseline["value"] = 0.99 * baseline["value"] + 0.01 * float(
                    (pi_over_q * grad_weight).mean())
            grad_weight = grad_weight - baseline["value"]
        # Samples outside the target's support (P = 0) keep their term: with a baseline they
        # are pushed down, which is how π learns to put no mass there.
        coefficient = pi_over_q * grad_weight
        loss = (coefficient.to(log_pi.dtype) * log_pi).mean()
        finite = torch.isfinite(batch.log_w)
        info = {
            "log_z": log_z,
            "ess_fraction": dx.ess(batch.log_w) / len(batch.y) if finite.any() else 0.0,
            "log_potential": float((pi_over_q[finite] * (batch.log_score - batch.log_prior)[finite]
                                    ).sum() / pi_over_q.sum()) if finite.any() else -math.inf,
            "kl_policy_prior": float((pi_over_q * (log_pi_detached - batch.log_prior)).mean()),
        }
        if finite.any():
            info["kl_target_policy"] = dx.is_kl_target_policy(batch.log_score, batch.log_q,
                                                              log_pi_detached)
        return loss, info

    def _maybe_swap(self, target: Target, proposal: Proposal, policy: SequenceDistribution,
                    context: Any) -> dict[str, float]:
        """Swap q ← π when the IS estimate of KL(p‖π) beats KL(p‖q) (Algorithm 1 of GDC)."""
        q = _given(proposal.current(), context)
        batch = score_batch(target, q, self.proposal_update_samples, context)
        if not torch.isfinite(batch.log_w).any():
            return {}
        with torch.no_grad():
            log_pi = _given(policy, context).log_prob(batch.y).double()
        kl_pi = dx.is_kl_target_policy(batch.log_score, batch.log_q, log_pi)
        kl_q = dx.is_kl_target_policy(batch.log_score, batch.log_q, batch.log_q)
        if kl_pi < kl_q:
            proposal.swap()
        return {"kl_target_policy_check": kl_pi, "kl_target_proposal_check": kl_q}


def _given(distribution: SequenceDistribution, context: Any) -> SequenceDistribution:
    return distribution if context is NO_CONTEXT else distribution.given(context)


class _Scalar:
    """A dict-held float made checkpointable (the running f-DPG baseline)."""

    def __init__(self, holder: dict) -> None:
        self.holder = holder

    def state_dict(self) -> dict:
        return dict(self.holder)

    def load_state_dict(self, state: dict) -> None:
        self.holder.update(state)
