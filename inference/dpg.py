"""Distributional Policy Gradient: fit π_θ to p by minimising an f-divergence, forward KL
KL(p‖π) by default (SPEC §2.1), on-policy or off-policy with the KL-adaptive proposal swap
(§2.2), with the Ẑ baseline (§2.3), f-DPG divergences, and per-context Ẑ_c (CDPG, §2.5).

The update for samples x ∼ q, with t = π/p and p = P/Ẑ (Go et al. 2023):

    loss = mean_i  (π(x_i)/q(x_i)) · (f'(t_i) − b) · log π_θ(x_i)

For forward KL, f'(t) = −p/π, so the loss is −mean (P/(Ẑ q)) log π (gdc's DPG), and the baseline
b = E_π f' = −1 gives the advantage P/(Ẑ q) − π/q of DPG with baseline.

``loss_normalisation``: "sequence" (the default) is the loss above, whose gradient is the
unbiased estimate of ∇D_f; "token" divides each sequence's log π_θ by its number of tokens, as
LM losses average per token: long sequences then no longer dominate the step (the gradient's
scale stops growing with length), at the price of a gradient that is no longer the objective's
when lengths differ (its fixed point need not be p). With equal lengths it is the "sequence"
loss divided by the length, i.e. a smaller learning rate. Divergence detection: `divergence`.

Reusing draws (`replay`): each weight is P/q under the q that drew the sample (its log q is
stored at draw time), so a draw is a valid sample for the gradient at any later θ. With
``updates_per_batch`` = K a batch drawn at one step serves the next K optimizer steps; with
``ratio_clip`` = ε a later update drops the term of a sample whose ratio π_θ/π_old (π_old: the
policy at the batch's first update) has left [1 − ε, 1 + ε] in the direction the term pushes it,
as PPO clips, so the updates stay near the policy that drew the batch. With ``replay_size`` the
last draws of each context are pooled and each batch takes ``replay_fraction`` of its rows from
the pool (uniformly) and the rest fresh; Ẑ and the divergence monitor see the fresh draws only,
each once. What a run carries from step to step and checkpoints: `dpg_state`.
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
from bayesalign.training.processes import gather

from .divergence import DivergenceMonitor, DivergenceOptions
from .dpg_state import DPGState, Proposal
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
from .replay import HeldBatch, ReplayPool, StoredDraws, available_memory, max_length, require_pool_fits

DIVERGENCES = ("kl", "reverse_kl", "tv", "js")
MAX_LOG_RATIO = 50.0
# Steps a DPG may draw before its first draw with P > 0: each such step has a zero gradient
# (every weight P/(Ẑ q) is 0 whatever Ẑ is), routine on a rare constraint (at a 1.5% acceptance
# 62% of 32-draw batches hold none), but twenty in a row leave (1 − ρ)^(20·B) to chance — below
# 0.2% at ρ = 1%, B = 32 — so the proposal most likely misses the target's support.
STEPS_WITHOUT_SUPPORT = 20


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


def clip_mask(coefficient: torch.Tensor, log_ratio: torch.Tensor, clip: float) -> torch.Tensor:
    """1 where a term of the loss coefficient·log π keeps its gradient, 0 where PPO's clip drops
    it: the term pushes log π up (coefficient < 0) and π/π_old > 1 + ε already, or down and
    π/π_old < 1 − ε (``log_ratio`` = log π − log π_old)."""
    ratio = torch.exp(log_ratio)
    dropped = ((coefficient < 0) & (ratio > 1 + clip)) | ((coefficient > 0) & (ratio < 1 - clip))
    return (~dropped).to(coefficient.dtype)


@dataclass
class DPG(PolicyEngineConfig, DivergenceOptions):
    """DPG and its family; a conditional target fitted over several ``contexts`` gives CDPG."""

    # A draw's weight uses its stored log q whatever these say, so a resume may change them:
    # a held batch is reused until it has served updates_per_batch updates, a smaller pool keeps
    # its newest draws, a new one starts empty.
    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = (
        *PolicyEngineConfig.RESUMABLE_CHANGES, "proposal", *DivergenceOptions.RESUMABLE_CHANGES,
        "updates_per_batch", "ratio_clip", "replay_size", "replay_fraction")

    divergence: str = "kl"  # f-divergence D_f(π‖p): kl (= forward KL(p‖π)), reverse_kl, tv, js
    baseline: bool = False  # forward KL: the exact Ẑ baseline; others: running mean of f'
    off_policy: bool = False  # sample from a frozen proposal q, swapped to π when KL improves
    proposal: SequenceDistribution | None = None  # initial off-policy proposal (prior by default)
    proposal_update_interval: int = 16  # steps between KL checks for the proposal swap
    proposal_update_samples: int = 512  # fresh draws from q for each KL check, per process
    per_context_z: bool = True  # CDPG's Ẑ_c; False is the single-global-Z ablation
    loss_normalisation: str = "sequence"  # "sequence": weight·log π; "token": log π / length
    updates_per_batch: int = 1  # optimizer steps on each batch of draws (weights P/q_draw)
    ratio_clip: float | None = 0.2  # later updates drop terms whose π/π_old left 1 ± this
    replay_size: int | None = None  # draws kept per context for replay; None: no replay pool
    replay_fraction: float = 0.5  # with a pool: share of each batch taken from it
    name: str = field(init=False, default="DPG")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.divergence not in DIVERGENCES:
            raise ConfigError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        require_positive("proposal_update_interval", self.proposal_update_interval)
        require_loss_normalisation(self.loss_normalisation)
        self._check_reuse_options()
        self.check_divergence_options()
        if self.contexts is not None:
            self.name = "CDPG"

    def _check_reuse_options(self) -> None:
        if not isinstance(self.updates_per_batch, int) or self.updates_per_batch < 1:
            raise ConfigError(f"updates_per_batch must be an integer >= 1, "
                              f"got {self.updates_per_batch!r}")
        if self.ratio_clip is not None:
            require_positive("ratio_clip", self.ratio_clip)
        if self.replay_size is not None:
            if not isinstance(self.replay_size, int) or self.replay_size < 1:
                raise ConfigError(f"replay_size must be an integer >= 1 (or None for no replay "
                                  f"pool), got {self.replay_size!r}")
            if not 0 < self.replay_fraction < 1:
                raise ConfigError(f"replay_fraction must be in (0, 1), got {self.replay_fraction}")

    def fit(self, target: Target, context: Any = NO_CONTEXT, *, contexts: Any = None) -> Posterior:
        """Fit π to the target for one ``context``, or amortised over several (CDPG, §2.5)."""
        name = "CDPG" if contexts is not None else self.name
        contexts, policy = self.contexts_and_policy(target, context, contexts)
        proposal = Proposal(self.proposal or target.prior(contexts[0]), policy) \
            if self.off_policy else None
        pool = None
        if self.replay_size is not None:
            length = max_length(policy)
            if length is not None:
                require_pool_fits(self.replay_size, len(contexts), length, available_memory())
            pool = ReplayPool(self.replay_size)
        state = DPGState(contexts_digest(contexts), -1.0 if self.divergence == "kl" else 0.0,
                         proposal, pool=pool)
        trainer = Trainer(self, policy, name, {"dpg": state})
        monitor = DivergenceMonitor(self, name, state.divergence, trainer.last_checkpoint_note)

        def step(step_index: int) -> tuple[torch.Tensor, dict[str, float]]:
            reused = state.reused(trainer.micro_step, self.updates_per_batch)
            if reused is not None:
                loss, metrics = self._reuse_step(policy, reused, state, trainer.device)
                swap = self._proposal_schedule(target, proposal, policy, reused[0].context,
                                               step_index)
                return loss, {**metrics, **swap}
            chosen = pick_contexts(contexts, self.contexts_per_step)
            losses, metrics, signals, held = [], [], [], []
            for c in chosen:
                conditional = policy.given(c)
                q = conditional if proposal is None else proposal.current().given(c)
                size = max(1, self.batch_size // len(chosen))
                replayed = 0 if pool is None else round(self.replay_fraction * size)
                fresh = score_batch(target, q, max(1, size - replayed), c)
                log_w = trainer.gather(fresh.log_w)
                state.samples_drawn += log_w.numel()
                log_z = self._update_log_z(state, log_w, fresh, step_index,
                                           several=len(contexts) > 1)
                batch = fresh if pool is None else pool.with_replayed(fresh, replayed,
                                                                      trainer.device)
                loss, info, log_pi = self._loss(
                    conditional, batch, log_z, state, measured=len(fresh.y),
                    drawn_by_policy=proposal is None and pool is None
                    and self.updates_per_batch == 1)
                if len(contexts) == 1 and not math.isfinite(state.log_z(self._z_key(c))):
                    info["log_z"] = -math.inf  # no draw with P > 0 yet: no estimate of Z
                if self.updates_per_batch > 1:
                    held.append(HeldBatch(c, StoredDraws.of(batch), log_pi.cpu(), len(fresh.y)))
                losses.append(loss)
                metrics.append({**info, "fresh_samples": float(log_w.numel()),  # all processes'
                                "batch_update": 0.0})
                # Local tensors: the monitor gathers every process' draws itself.
                signals.append(monitor.signals(str(fresh.context), fresh.log_w,
                                               fresh.log_score - fresh.log_prior,
                                               info["kl_policy_prior"]))
            if held:
                state.held[trainer.micro_step] = held
            checked = monitor.check(step_index, signals)
            swap = self._proposal_schedule(target, proposal, policy, chosen[0], step_index)
            return torch.stack(losses).mean(), {**mean_metrics(metrics), **swap, **checked}

        history = trainer.run(step)
        running = {f"running_log_z[{key}]": state.log_z(key) for key in state.count}
        return finish(target, policy, name, contexts, history,
                      {"divergence": self.divergence, "baseline": self.baseline,
                       "off_policy": self.off_policy, "steps": self.steps,
                       "batch_size": self.batch_size, "updates_per_batch": self.updates_per_batch,
                       "replay_size": self.replay_size}, self.eval_samples,
                      {**running, "samples_drawn": float(state.samples_drawn)}, seed=self.seed)

    def _reuse_step(self, policy: SequenceDistribution, held: list[HeldBatch], state: DPGState,
                    device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        """Another update on the held batches, their weights P/q_draw at the running Ẑ_c."""
        losses, metrics = [], []
        for batch_held in held:
            batch = batch_held.draws.batch(batch_held.context, device)
            log_z = state.log_z(self._z_key(batch.context))
            loss, info, _ = self._loss(policy.given(batch_held.context), batch,
                                       log_z if math.isfinite(log_z) else 0.0, state,
                                       log_old=batch_held.log_old.to(device),
                                       measured=batch_held.fresh)
            losses.append(loss)
            metrics.append({**info, "fresh_samples": 0.0,
                            "batch_update": float(batch_held.updates)})
            batch_held.updates += 1
        return torch.stack(losses).mean(), mean_metrics(metrics)

    def _z_key(self, context: Any) -> str:
        """The running Ẑ a context's draws pool into: its own (CDPG's per-context Ẑ) or one."""
        return str(context) if self.per_context_z else "global"

    def _update_log_z(self, state: DPGState, log_w: torch.Tensor, batch: ScoredBatch,
                      step_index: int, several: bool) -> float:
        """Pool this batch's weights into log Ẑ_c (§2.2, §2.5); 0 while no draw (for c) has had
        P > 0, for at most STEPS_WITHOUT_SUPPORT steps of one context."""
        log_z = state.update_log_z(self._z_key(batch.context), log_w)
        if math.isfinite(log_z):
            return log_z
        if not several and step_index + 1 >= STEPS_WITHOUT_SUPPORT:
            raise EmptySupportError(
                f"{self.name} step {step_index}: all {len(batch.y)} importance weights are zero "
                f"for context {batch.context!r}, as at every one of the {step_index + 1} steps so "
                "far; every sample violates a constraint — use a proposal that reaches the "
                "target's support"
            )
        # No draw (for c) has had P > 0 yet, so every P/(Ẑ_c q) is 0 whatever Ẑ_c is: a step
        # without signal, routine on a rare constraint and for one empty context among many.
        return 0.0

    def _loss(
        self, policy: SequenceDistribution, batch: ScoredBatch, log_z: float, state: DPGState,
        log_old: torch.Tensor | None = None, measured: int | None = None,
        drawn_by_policy: bool = False,
    ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        """f-DPG's loss mean (π/q)(f'(π/p) − b) log π (§2.3, Go et al. 2023), its metrics and
        the draws' log π; with ``log_old`` (a reused batch) the terms `ratio_clip` drops are
        left out of the gradient. The metrics (and so the divergence monitor's KL(π‖a)) are of
        the first ``measured`` rows, the fresh draws: a replayed draw's π/q_draw is
        heavy-tailed once π has moved, fine in a mean gradient, not in a step's estimate.
        ``drawn_by_policy``: every row was drawn by ``policy`` at its current weights."""
        run = self._rows_to_run(batch, drawn_by_policy)
        y = batch.y if run is None else batch.y[run]
        log_pi = policy.token_log_probs(y).sum(-1)
        if run is None:
            log_pi_detached = log_pi.detach().double()
        else:
            log_pi_detached = batch.log_q.clone()
            log_pi_detached[run] = log_pi.detach().double()
        # The weights need the sequence's log π; "token" normalises only the term differentiated.
        scored = log_pi if self.loss_normalisation == "sequence" \
            else log_pi / y.lengths.to(log_pi.device).clamp(min=1)
        pi_over_q = torch.exp(log_pi_detached - batch.log_q)
        grad_weight = f_prime(self.divergence, log_pi_detached - (batch.log_score - log_z))
        if self.baseline:
            if self.divergence != "kl":
                state.baseline = 0.99 * state.baseline + 0.01 * float(
                    gather(pi_over_q * grad_weight).mean())
            grad_weight = grad_weight - state.baseline
        # Samples outside the target's support (P = 0) keep their term: with a baseline they
        # are pushed down, which is how π learns to put no mass there.
        coefficient = pi_over_q * grad_weight
        rows = slice(0, measured)
        head = ScoredBatch(batch.y[rows], batch.context, batch.log_q[rows],
                           batch.log_prior[rows], batch.log_score[rows]) \
            if measured is not None and measured < len(batch.y) else batch
        info = _metrics(head, log_z, log_pi_detached[rows], pi_over_q[rows])
        if log_old is not None and self.ratio_clip is not None:
            kept = clip_mask(coefficient, log_pi_detached - log_old, self.ratio_clip)
            coefficient = coefficient * kept
            info["clipped_fraction"] = float(1 - gather(kept.double()).mean())  # all processes
        if run is not None:
            coefficient = coefficient[run]
        loss = (coefficient.to(log_pi.dtype) * scored).sum() / len(batch.y)
        return loss, info, log_pi_detached

    def _rows_to_run(self, batch: ScoredBatch, drawn_by_policy: bool) -> torch.Tensor | None:
        """The rows the policy's forward and backward must see, or None for all of them.

        Forward KL without a baseline weights a draw by −P/(Ẑ q), which is 0 where P = 0 at any
        θ; on draws the policy made at its current weights log π is the log q they carry. Such
        rows need neither pass: on a rare constraint they are most of a batch (about 90% at the start
        of `return` in experiments/real_lm_convergence). One row is kept when all are zero, so
        that every process runs the model (data parallel reduces gradients in its backward)."""
        if not drawn_by_policy or self.divergence != "kl" or self.baseline:
            return None
        zero = ~torch.isfinite(batch.log_score)
        if not zero.any():
            return None
        keep = ~zero
        keep[0] = keep[0] | ~keep.any()
        # On the CPU: Sequences indexes its Python-side fields (texts, contexts) with it, and a
        # CPU index serves tensors on any device.
        return keep.nonzero().squeeze(-1).cpu()

    def _proposal_schedule(self, target: Target, proposal: Proposal | None,
                           policy: SequenceDistribution, context: Any,
                           step_index: int) -> dict[str, float]:
        """GDC's Algorithm 1 (§2.2): every ``proposal_update_interval`` steps, q ← π if the IS
        estimate of KL(p‖π) on fresh draws from q beats that of KL(p‖q)."""
        if proposal is None:
            return {"proposal_swaps": 0.0}
        checks = {}
        if (step_index + 1) % self.proposal_update_interval == 0:
            batch = score_batch(target, proposal.current().given(context),
                                self.proposal_update_samples, context)
            with torch.no_grad():
                log_pi = policy.given(context).log_prob(batch.y).double()
            # Every process' check draws: each process then takes the same decision.
            log_score, log_q, log_pi = (gather(t) for t in (batch.log_score, batch.log_q, log_pi))
            if torch.isfinite(log_score - log_q).any():
                kl_pi = dx.is_kl_target_policy(log_score, log_q, log_pi)
                kl_q = dx.is_kl_target_policy(log_score, log_q, log_q)
                if kl_pi < kl_q:
                    proposal.swap()
                checks = {"kl_target_policy_check": kl_pi, "kl_target_proposal_check": kl_q}
        return {**checks, "proposal_swaps": float(proposal.swaps)}


def _metrics(batch: ScoredBatch, log_z: float, log_pi: torch.Tensor,
             pi_over_q: torch.Tensor) -> dict[str, float]:
    """log Ẑ, ESS, E_π log φ, KL(π‖a) and KL(p‖π) of one batch, by IS from q (§2.6), from
    every process' draws (gathered)."""
    log_score, log_prior, log_q, log_pi, pi_over_q = (gather(t) for t in (
        batch.log_score, batch.log_prior, batch.log_q, log_pi, pi_over_q))
    log_w = log_score - log_q
    finite = torch.isfinite(log_w)
    info = {
        "log_z": log_z,
        "ess_fraction": dx.ess(log_w) / len(log_w) if finite.any() else 0.0,
        "log_potential": float((pi_over_q[finite] * (log_score - log_prior)[finite]
                                ).sum() / pi_over_q.sum()) if finite.any() else -math.inf,
        "kl_policy_prior": float((pi_over_q * (log_pi - log_prior)).mean()),
    }
    if finite.any():
        info["kl_target_policy"] = dx.is_kl_target_policy(log_score, log_q, log_pi)
    return info
