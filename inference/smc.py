"""`SMC`: sequential Monte Carlo over tokens, with resampling and twists (SPEC §11).

N particles extend token by token under a proposal q_t; particle weights follow the intermediate
targets γ_t(s_{1:t}) = a(s_{1:t})·ψ_t(s_{1:t}) (ψ ≡ 1 without a twist), and when a particle
completes — exactly as the prior defines completion: its first EOS, or the prior's length — its
twist is replaced by the target's factors L(s), so γ_final = P = a·L and the incremental weights

    w_t = a(s_t | s_{<t}) ψ_t(s_{1:t}) / (ψ_{t−1}(s_{1:t−1}) q_t(s_t | s_{<t}))

telescope to P(s)/q(s): the twist changes variance and when resampling fires, never the target.
Sites declared with ``ba.prefix_constraint`` multiply ψ_t by 1[prefix ok] (``prefix_factors``):
a prefix that can no longer meet the constraint is pruned at once instead of at its end.
Resampling (when ESS < ``ess_threshold``·N) draws ancestors and gives every particle the mean
weight; log Ẑ is the log of the final mean weight with that bookkeeping, unbiased in Ẑ
(Del Moral 2004), so E[log Ẑ] ≤ log Z: the diagnostics report it as ``log_z_lower`` too,
a stochastic lower bound (SPEC §11). With ``proposal="twisted"``, q_t ∝ a(·|s_{<t})·ψ_t(s_{<t}, ·) over the
vocabulary and w_t = Σ_v a(v|s_{<t}) ψ_t(s_{<t}v) / ψ_{t−1}(s_{<t}); under the optimal twist
(`twists.optimal_twist`) every weight is Z at the first step and 1 afterwards, so log Ẑ = log Z
for any N. After Zhao, Brekelmans, Makhzani & Grosse (ICML 2024), "Probabilistic inference in
language models via twisted SMC".

The prior's next-token law comes from `next_token`: a table per prefix (`TabularLM`,
`PrefixTreeLM`) or a `CausalLM` advancing all particles in one forward pass per token with its
KV cache reordered on resampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import (
    ConfigError,
    EmptySupportError,
    InvalidFactorError,
)
from bayesalign.evaluation import evaluate
from bayesalign.posterior import Posterior
from bayesalign.seeding import seeded
from bayesalign.targets import NO_CONTEXT, Target

from .base import one_context, require_same_vocabulary
from .next_token import NextToken, next_token
from .resampling import check_scheme, resample
from .twists import Twist, log_prefix_factor, prefix_checks, require_twist_fits


def _ess(log_w: torch.Tensor) -> float:
    """Kish ESS ``(Σw)²/Σw²`` of log-weights with at least one finite entry."""
    return float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))


def _log_mean_exp(log_w: torch.Tensor) -> float:
    return float(torch.logsumexp(log_w, 0)) - math.log(log_w.numel())


@dataclass
class _Particles:
    """The particle population: tokens so far, weights, log ψ, and the next-token laws."""

    tokens: torch.Tensor  # [N, T] long, 0 past each particle's end
    mask: torch.Tensor  # [N, T] bool, True at the tokens drawn so far
    done: torch.Tensor  # [N] bool: complete (EOS or the prior's length); stops extending
    log_w: torch.Tensor  # [N] float64 log-weight since the last resampling
    log_psi: torch.Tensor  # [N] log ψ of the current prefix (log L once complete)
    prior: NextToken  # a(· | s_{<t}) of each particle
    proposal: NextToken | None  # q(· | s_{<t}) when a proposal distribution is given
    prefix_checks: dict[str, Callable] | None = None  # the target's prefix constraints, once read

    @classmethod
    def start(cls, num: int, prior: NextToken, proposal: NextToken | None) -> _Particles:
        zeros = torch.zeros(num, dtype=torch.float64)
        return cls(torch.zeros(num, prior.length, dtype=torch.long),
                   torch.zeros(num, prior.length, dtype=torch.bool),
                   torch.zeros(num, dtype=torch.bool), zeros, zeros.clone(), prior, proposal)

    def append(self, rows: torch.Tensor, t: int, token: torch.Tensor) -> None:
        self.tokens[rows, t] = token
        self.mask[rows, t] = True
        for law in (self.prior, self.proposal):
            if law is not None:
                law.advance(rows, token)

    def reorder(self, ancestors: torch.Tensor) -> None:
        """Keep the ancestors' lineages, each at the mean weight (log_w = 0, SPEC §11)."""
        for name in ("tokens", "mask", "done", "log_psi"):
            setattr(self, name, getattr(self, name)[ancestors])
        self.log_w = torch.zeros_like(self.log_w)
        for law in (self.prior, self.proposal):
            if law is not None:
                law.reorder(ancestors)


@dataclass
class SMC:
    """Sequential Monte Carlo over tokens: ``num_particles`` weighted particles targeting p (SPEC §11)."""

    num_particles: int = 256  # N particles (and draws returned)
    ess_threshold: float = 0.5  # resample when ESS < ess_threshold·N (0: never, 1: every step)
    resampling: str = "systematic"  # multinomial | stratified | systematic | residual
    twist: Twist | None = None  # prefix tokens [n, t] -> log ψ_t [n]; None: ψ ≡ 1
    prefix_factors: bool = True  # also ψ_t ·= 1[prefix ok] for the target's ba.prefix_constraint sites
    proposal: SequenceDistribution | str | None = None  # None: the prior; "twisted": q ∝ a·ψ
    final_resample: bool = False  # return an equal-weight set (resampled with `resampling`)
    seed: int | None = 0  # seeds torch for the fit (None: the caller's RNG state)

    def __post_init__(self) -> None:
        if not isinstance(self.num_particles, int) or self.num_particles < 2:
            raise ConfigError(f"SMC: num_particles must be an integer >= 2, got {self.num_particles!r}")
        if not 0 <= self.ess_threshold <= 1:
            raise ConfigError(f"SMC: ess_threshold must be in [0, 1], got {self.ess_threshold!r}")
        check_scheme(self.resampling)
        if isinstance(self.proposal, str) and self.proposal != "twisted":
            raise ConfigError(f"SMC: proposal {self.proposal!r} is unknown; give None (the prior), "
                              "'twisted' or a TabularLM/PrefixTreeLM")
        if self.twist is not None and not callable(self.twist):
            raise ConfigError("SMC: twist must be a callable mapping prefix tokens [n, t] to log ψ [n]")

    def fit(self, target: Target, context: Any = NO_CONTEXT, *, contexts: Any = None) -> Posterior:
        one_context("SMC", contexts)
        prior = target.prior(context)
        if isinstance(self.proposal, SequenceDistribution):
            require_same_vocabulary("proposal", self.proposal, prior)
        with seeded(self.seed):
            particles = self._start(prior, context)
            require_twist_fits(self.twist, prior, particles.prior.length)
            log_z, history = self._run(particles, target, context, prior)
            log_weights = particles.log_w + (log_z - _log_mean_exp(particles.log_w))
            samples = particles.prior.sequences(particles.tokens, particles.mask,
                                                torch.arange(self.num_particles))
            ess = _ess(log_weights)
            if self.final_resample:
                samples = samples[resample(torch.softmax(log_weights, 0), self.resampling)]
            diagnostics = evaluate(
                target, samples, context=context,
                log_weights=torch.zeros(len(samples)) if self.final_resample else log_weights,
            )
        events = sum(row["resampled"] for row in history)
        diagnostics = replace(
            diagnostics, log_z=log_z, log_z_se=None, log_z_lower=log_z, ess=ess,
            ess_fraction=ess / self.num_particles, num_proposed=self.num_particles,
            extras={"resampling_events": events, "ess_final": ess,
                    "ess_min": min(row["ess"] for row in history), "num_steps": len(history)},
        )
        return Posterior(samples, engine="SMC", diagnostics=diagnostics, target=target,
                         context=context,
                         log_weights=None if self.final_resample else log_weights,
                         config=self._config(), history=history)

    def _config(self) -> dict:
        proposal = self.proposal if self.proposal in (None, "twisted") else type(self.proposal).__name__
        return {"num_particles": self.num_particles, "ess_threshold": self.ess_threshold,
                "resampling": self.resampling, "twist": self.twist is not None,
                "prefix_factors": self.prefix_factors,
                "proposal": proposal, "final_resample": self.final_resample}

    def _start(self, prior: SequenceDistribution, context: Any) -> _Particles:
        n = self.num_particles
        prior_law, proposal_law = next_token(prior, "prior", n), None
        if isinstance(self.proposal, SequenceDistribution):
            proposal_law = next_token(self.proposal.given(context), "proposal", n)
            if proposal_law.length != prior_law.length:
                raise ConfigError(
                    f"SMC: the proposal's length {proposal_law.length} differs from the prior's "
                    f"{prior_law.length}; they must define the same sequences")
        return _Particles.start(n, prior_law, proposal_law)

    def _run(
        self, particles: _Particles, target: Target, context: Any, prior: SequenceDistribution,
    ) -> tuple[float, list[dict]]:
        """Extend, weight, resample until every particle is complete; returns log Ẑ and one
        history row per step."""
        n, length = self.num_particles, particles.prior.length
        log_z_resampled, history = 0.0, []  # log Π of the mean weights at resampling events
        for t in range(length):
            rows = (~particles.done).nonzero().squeeze(-1)
            self._extend(particles, rows, t, target, context, prior)
            log_mean = _log_mean_exp(particles.log_w)
            ess = _ess(particles.log_w)
            live = int((~particles.done).sum())
            resampled = bool(live) and (ess < self.ess_threshold * n or self.ess_threshold == 1)
            if resampled:
                log_z_resampled += log_mean
                particles.reorder(self._ancestors(torch.softmax(particles.log_w, 0)))
            history.append({"step": t + 1, "ess": ess, "resampled": int(resampled),
                            "log_z": log_z_resampled + (0.0 if resampled else log_mean),
                            "live": live})
            if not live:
                break
        return history[-1]["log_z"], history

    def _ancestors(self, weights: torch.Tensor) -> torch.Tensor:
        """Ancestor indices at a resampling event (conditional SMC keeps particle 0's)."""
        return resample(weights, self.resampling)

    def _draw(self, step_q: torch.Tensor, rows: torch.Tensor, t: int) -> torch.Tensor:
        """Token t of the live particles ``rows`` from the proposal's next-token law."""
        return torch.multinomial(step_q.exp(), 1).squeeze(-1)

    def _extend(
        self, particles: _Particles, rows: torch.Tensor, t: int, target: Target, context: Any,
        prior: SequenceDistribution,
    ) -> None:
        """Draw token t of the live particles ``rows`` and multiply in their incremental weights."""
        previous = particles.log_psi[rows]
        step_a = particles.prior.log_probs(rows)  # [n, V]
        if self.proposal == "twisted":
            complete, log_psi, log_norm = self._twisted_step(
                particles, rows, t, step_a, target, context, prior)
            increment = log_norm - previous
        else:
            step_q = step_a if particles.proposal is None else particles.proposal.log_probs(rows)
            token = self._draw(step_q, rows, t)
            log_ratio = (step_a - step_q).gather(-1, token[:, None]).squeeze(-1)
            complete = self._complete(token, t, particles.prior.length, prior)
            particles.append(rows, t, token)
            log_psi = self._log_psi(particles, particles.tokens[rows], particles.mask[rows], t,
                                    complete, rows, target, context, reader=self._reader(particles))
            increment = log_ratio + log_psi - previous
        # A prefix at ψ = 0 already carries weight zero: keep it at zero rather than 0/0.
        increment = torch.where(previous == -math.inf, -math.inf, increment)
        particles.log_w[rows] += increment
        particles.log_psi[rows] = log_psi
        particles.done[rows] = complete
        if not torch.isfinite(particles.log_w).any():
            finished = len(particles.done) - len(rows)
            raise EmptySupportError(
                f"SMC: every particle has weight zero at step {t + 1}: "
                f"{_why_zero(increment, log_psi, complete, finished)}; use more particles, a "
                "proposal closer to the target, or check the target's constraints"
            )

    def _twisted_step(
        self, particles: _Particles, rows: torch.Tensor, t: int, step_a: torch.Tensor,
        target: Target, context: Any, prior: SequenceDistribution,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw from q_t ∝ a(v | s_{<t}) ψ_t(s_{<t} v); returns completion, the drawn prefix's
        log ψ and log Σ_v a·ψ (the weight's numerator, whatever token is drawn)."""
        vocab = step_a.shape[-1]
        candidates = self._extensions(particles, rows, t, target, context, prior, vocab)
        log_joint = step_a + candidates
        log_norm = torch.logsumexp(log_joint, -1)
        # A row with no extension of positive mass keeps weight zero; it draws from a.
        draw_from = torch.where(torch.isfinite(log_norm)[:, None], log_joint, step_a)
        token = self._draw(torch.log_softmax(draw_from, -1), rows, t)
        complete = self._complete(token, t, particles.prior.length, prior)
        particles.append(rows, t, token)
        log_psi = candidates.gather(-1, token[:, None]).squeeze(-1)
        return complete, log_psi, log_norm

    @staticmethod
    def _complete(token: torch.Tensor, t: int, length: int,
                  prior: SequenceDistribution) -> torch.Tensor:
        """Complete exactly as the prior defines it: at its first EOS or at its length."""
        if t == length - 1:
            return torch.ones_like(token, dtype=torch.bool)
        if prior.eos_token_id is None:
            return torch.zeros_like(token, dtype=torch.bool)
        return token == prior.eos_token_id

    def _extensions(
        self, particles: _Particles, rows: torch.Tensor, t: int, target: Target, context: Any,
        prior: SequenceDistribution, vocab: int,
    ) -> torch.Tensor:
        """``log ψ_t(s_{<t} v)`` of every one-token extension (log L where v completes), [n, V]."""
        tokens = particles.tokens[rows].repeat_interleave(vocab, 0)
        mask = particles.mask[rows].repeat_interleave(vocab, 0)
        token = torch.arange(vocab).repeat(len(rows))
        tokens[:, t], mask[:, t] = token, True
        complete = self._complete(token, t, tokens.shape[1], prior)
        owners = rows.repeat_interleave(vocab)
        reader, twist_values = self._reader(particles), None
        if reader is not None and hasattr(self.twist, "next_token_log_psi"):
            # One head call per particle for all V extensions (a NextTokenTwist).
            with torch.no_grad():
                twist_values = self.twist.next_token_log_psi(reader.context_hidden(rows))
            twist_values = torch.as_tensor(twist_values).detach().double().cpu().reshape(-1)
        log_psi = self._log_psi(particles, tokens, mask, t, complete, owners, target, context,
                                twist_values=twist_values)
        return log_psi.reshape(-1, vocab)

    def _reader(self, particles: _Particles) -> Any:
        """The prior's step-by-step law when the twist reads its hidden states, else None."""
        reader = getattr(particles.prior, "twist_reader", None)
        return None if self.twist is None or reader is None else reader(self.twist)

    def _log_psi(
        self, particles: _Particles, tokens: torch.Tensor, mask: torch.Tensor, t: int,
        complete: torch.Tensor, owners: torch.Tensor, target: Target, context: Any,
        reader: Any = None, twist_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log L(s) for complete rows, log ψ_t(s_{1:t}) for the others: the twist's plus
        log 1[prefix ok] of the target's prefix constraints (0 without either).

        ``reader`` (the rows are the particles' own prefixes) gives a twist that reads the
        prior's hidden states those of the forward passes the prior runs anyway;
        ``twist_values`` are the twist's log ψ of every row, computed already."""
        log_psi = torch.zeros(len(tokens), dtype=torch.float64)
        if complete.any():
            done = particles.prior.sequences(tokens[complete], mask[complete], owners[complete])
            log_psi[complete] = target.log_potential(done, context).cpu()
        rows = ~complete
        if not rows.any():
            return log_psi
        prefixes, prefix_mask, prefix_owners = tokens[rows, : t + 1], mask[rows, : t + 1], owners[rows]
        if self.prefix_factors:
            log_psi[rows] += self._prefix_log_psi(particles, prefixes, prefix_mask, prefix_owners,
                                                  t, target, context)
        if self.twist is not None:
            values = twist_values[rows] if twist_values is not None \
                else self._twist_values(prefixes, t, prefix_owners, reader)
            log_psi[rows] += self._checked_twist(values, prefixes, t, prefix_owners)
        return log_psi

    def _prefix_log_psi(
        self, particles: _Particles, prefixes: torch.Tensor, mask: torch.Tensor,
        owners: torch.Tensor, t: int, target: Target, context: Any,
    ) -> torch.Tensor:
        """``Σ log 1[holds(prefix)]`` over the target's ``ba.prefix_constraint`` sites."""
        law = particles.prior
        if particles.prefix_checks is None:  # read the sites once, from one prefix's trace
            particles.prefix_checks = prefix_checks(
                target, law.sequences(prefixes[:1], mask[:1], owners[:1]), context)
        if not particles.prefix_checks:
            return torch.zeros(len(prefixes), dtype=torch.float64)
        return log_prefix_factor(particles.prefix_checks, law.sequences(prefixes, mask, owners),
                                 f"at SMC step {t + 1}")

    def _twist_values(self, prefixes: torch.Tensor, t: int, owners: torch.Tensor,
                      reader: Any) -> torch.Tensor:
        """The twist's log ψ of the particles ``owners``' prefixes: from the prior's hidden
        states when ``reader`` gives them (a `NextTokenTwist` reads the state before token t,
        a `HiddenStateTwist` the one after it), else by calling the twist on the prefixes."""
        with torch.no_grad():
            if reader is not None and hasattr(self.twist, "next_token_log_psi"):
                table = self.twist.next_token_log_psi(reader.context_hidden(owners))
                return table.gather(-1, prefixes[:, t:t + 1].to(table.device)).squeeze(-1)
            if reader is not None and hasattr(self.twist, "from_hidden_states"):
                return self.twist.from_hidden_states(reader.hidden_states(owners))
            return self.twist(prefixes)

    def _checked_twist(self, values: Any, prefixes: torch.Tensor, t: int,
                       owners: torch.Tensor) -> torch.Tensor:
        """The twist's ``values`` on ``prefixes`` as float64: one finite-or-−inf log ψ each."""
        log_psi = torch.as_tensor(values)
        if log_psi.shape != (len(prefixes),):
            raise InvalidFactorError(
                f"SMC twist returned shape {tuple(log_psi.shape)} at step {t + 1} for "
                f"{len(prefixes)} prefixes; it must return one log ψ per prefix, shape "
                f"({len(prefixes)},)"
            )
        log_psi = log_psi.detach().double().cpu()
        bad = torch.isnan(log_psi) | (log_psi == math.inf)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise InvalidFactorError(
                f"SMC twist is {log_psi[i].item()} at step {t + 1} for particle {int(owners[i])} "
                f"(prefix {prefixes[i].tolist()}); log ψ must be finite or -inf"
            )
        return log_psi


def _why_zero(increment: torch.Tensor, log_psi: torch.Tensor, complete: torch.Tensor,
              finished: int) -> str:
    """Why this step's live particles all went to weight zero, counted by cause."""
    zero, dead = increment == -math.inf, log_psi == -math.inf
    reasons = {
        "completed with a factor at -inf (a violated constraint)": zero & complete & dead,
        "reached a prefix the twist or a prefix constraint gives log ψ = -inf":
            zero & ~complete & dead,
        "drew a token of zero prior probability": zero & ~dead,
    }
    parts = [f"{int(m.sum())} particles {what}" for what, m in reasons.items() if m.any()]
    if finished:
        parts.append(f"the {finished} finished particles already had weight zero")
    return "; ".join(parts)
