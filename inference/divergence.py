"""Divergence detection for the policy engines (DPG, KL-RL): say when a run goes off the rails.

"Divergence" here is a training run running away, not DPG's f-divergence. Three signals, each
read from what a step already computes (its draws y ~ q and their weights w = P(y)/q(y)):

(a) **ESS collapse**: the Kish ESS fraction (Σw)²/(n Σw²) of the step's weights stays below
    ``divergence_ess_fraction`` for ``divergence_patience`` consecutive checks (one per step
    without gradient accumulation): a handful of draws carry the whole target mass. A step
    with no draw of P > 0 reads as ESS 0 only when the share of draws so far with P > 0 makes
    such a step unlikely (chance below ``EMPTY_STEP_EVIDENCE``); on a rare target it is no
    reading (at 1.5% of draws in the support, 38% of batches of 64 hold none);
(b) **KL(π‖a) runaway**: the step's estimate of KL(π‖a) passes ``divergence_kl_multiple`` ×
    the target's KL(p‖a). KL(p‖a) = E_p[log P − log a] − log Z (SPEC §1) is estimated from
    every weight drawn so far, pooled: E_p[log φ] (φ = P/a, the potential) by self-normalised
    IS with the pooled weights, minus log Ẑ, the pooled mean weight (DPG's running Ẑ). The
    policy that solves the target sits at KL(π‖a) = KL(p‖a); one far past it has left p
    (the estimate is floored at ``MIN_KL_TARGET_PRIOR``);
(c) **log Ẑ drift**: the step's estimate log mean w differs from the running log Ẑ of the
    steps before (DPG's running Ẑ; KL-RL's, pooled the same way from its on-policy weights) by
    more than ``divergence_log_z_se`` standard errors (the two delta-method se's,
    sqrt(1/ESS − 1/n) each, combined) for ``divergence_patience`` consecutive checks: every
    step's mean weight estimates the same Z, so a lasting drift means the policy's draws no
    longer see the target's mass (the se of heavy-tailed weights is underestimated now and
    then, so one step past it is no signal).

(d) **KL(π‖a) past the target's**: the step's KL(π‖a) exceeds the target's estimated KL(p‖a)
    (as in (b)) by more than ``divergence_kl_excess`` nats for ``divergence_patience``
    consecutive checks. KL(π‖a) − KL(p‖a) = KL(π‖p) + E_π[log φ] − E_p[log φ] (SPEC §1): for a
    hard constraint with π in its support it is KL(π‖p) itself, the reverse distance of a
    policy that has traded p's spread for a few sequences it favours; for a reward it
    understates KL(π‖p) unless π's reward has passed p's (then π over-optimises). Measured on
    ``bundled:code-small``'s ``return`` (KL(p‖a) 2.18, experiments/real_lm_convergence): RLOO's
    template collapse reads ≈ 1.3–2.0 nats from 4,000 samples on (0.9 at 2,000; its KL(p‖π)
    ends at 4.9, past the prior's 2.2), while DPG, converging, stays below −0.7 (KL(π‖a) ≤
    0.56 × KL(p‖a)); the multiple (b) of RLOO's run is 1.4–1.9, under its threshold.

A policy collapsed onto a few sequences that satisfy the target has equal weights P/π (ESS
fraction 1) and, once its draws dominate the pool, a KL(p‖a) estimate near its own KL(π‖a):
(a) and (b) then miss it; (c) and (b) see the onset, which is when the warning is raised, and
(d) sees a collapse that keeps its distance from p, as RLOO's on a rare constraint.

Under several processes the signals are computed from every process' weights (gathered), as
one process drawing them all would compute them.

``divergence_action``: "warn" raises a `DivergenceWarning` once per signal, naming the step and
the signal's value; "stop" raises a `TrainingError` naming them and the last checkpoint kept
(a checkpointed run then resumes from its last good checkpoint); "off" checks nothing. The
monitor's running sums and patience count are checkpointed with the engine's state.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch

from bayesalign.errors import ConfigError, DivergenceWarning, TrainingError, require_positive
from bayesalign.training.processes import gather, mean_over_processes

ACTIONS = ("warn", "stop", "off")
# Signal (b) divides by max(KL̂(p‖a), this): below it the pooled estimate is noise at batches of
# tens (and ≤ 0 after a wild step's huge weight), and a policy within divergence_kl_multiple ×
# 0.1 nats of its prior has not run away.
MIN_KL_TARGET_PRIOR = 0.1
# Signal (a): a step whose draws all have P = 0 counts as ESS 0 when, at the pooled share of
# draws with P > 0, n draws would all miss the support with a chance below this.
EMPTY_STEP_EVIDENCE = 1e-3


@dataclass
class DivergenceOptions:
    """The options of divergence detection, shared by DPG and KL-RL (one line each)."""

    # They watch the run without changing it, so a resumed run may change any of them.
    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = (
        "divergence_action", "divergence_ess_fraction", "divergence_patience",
        "divergence_kl_multiple", "divergence_log_z_se", "divergence_kl_excess")

    divergence_action: str = "warn"  # "warn", "stop" (TrainingError at the last checkpoint), "off"
    divergence_ess_fraction: float = 0.01  # (a): ESS/n below this ...
    divergence_patience: int = 5  # (a), (c), (d): for this many consecutive checks
    divergence_kl_multiple: float = 5.0  # (b): KL(π‖a) above this × the estimated KL(p‖a)
    divergence_log_z_se: float = 8.0  # (c): the step's log Ẑ this many se from the running one
    divergence_kl_excess: float = 1.0  # (d): KL(π‖a) this many nats above the estimated KL(p‖a)

    def check_divergence_options(self) -> None:
        if self.divergence_action not in ACTIONS:
            raise ConfigError(f"divergence_action must be one of {ACTIONS}, "
                              f"got {self.divergence_action!r}")
        if not 0 < self.divergence_ess_fraction < 1:
            raise ConfigError("divergence_ess_fraction must be in (0, 1), "
                              f"got {self.divergence_ess_fraction}")
        if not isinstance(self.divergence_patience, int) or self.divergence_patience < 1:
            raise ConfigError(f"divergence_patience must be an integer >= 1, "
                              f"got {self.divergence_patience!r}")
        require_positive("divergence_kl_multiple", self.divergence_kl_multiple)
        require_positive("divergence_log_z_se", self.divergence_log_z_se)
        require_positive("divergence_kl_excess", self.divergence_kl_excess)


@dataclass
class PooledWeights:
    """Running sums over every weight drawn for one context: log Σw, log Σw², n, and the
    self-normalised mean of log φ under them (an estimate of E_p log φ)."""

    log_sum: float = -math.inf
    log_sum_sq: float = -math.inf
    count: int = 0
    mean_log_potential: float = 0.0
    kl_policy_prior: float = 0.0  # the latest step's estimate of KL(π_c‖a_c)
    in_support: int = 0  # draws with P > 0 among ``count``

    def chance_all_outside(self, n: int) -> float:
        """The chance that n draws all have P = 0, at the pooled share of draws with P > 0."""
        return (1 - self.in_support / self.count) ** n if self.count else 1.0

    def kl_target_prior(self) -> float:
        """KL(p‖a) = E_p log φ − log Z by the pooled weights, floored at MIN_KL_TARGET_PRIOR."""
        return max(self.mean_log_potential - self.log_z(), MIN_KL_TARGET_PRIOR)

    def log_z(self) -> float:
        return self.log_sum - math.log(self.count) if self.count else -math.inf

    def log_z_se(self) -> float:
        return _se(self.log_sum, self.log_sum_sq, self.count)

    def add(self, log_w: torch.Tensor, log_potential: torch.Tensor) -> None:
        finite = torch.isfinite(log_w)
        self.count += log_w.numel()
        self.in_support += int(finite.sum())
        if not finite.any():
            return
        batch = float(torch.logsumexp(log_w[finite], 0))
        total = float(torch.logaddexp(torch.tensor(self.log_sum), torch.tensor(batch)))
        mean = float((torch.softmax(log_w[finite], 0) * log_potential[finite]).sum())
        share = math.exp(batch - total)
        self.mean_log_potential = (1 - share) * self.mean_log_potential + share * mean
        self.log_sum = total
        self.log_sum_sq = float(torch.logaddexp(torch.tensor(self.log_sum_sq),
                                                torch.logsumexp(2 * log_w[finite], 0)))


@dataclass
class DivergenceState:
    """What the monitor checkpoints: the pooled weights per context, the current runs of low-ESS,
    high-drift and high-excess checks, and the signals already reported (each is reported once)."""

    pooled: dict[str, PooledWeights] = field(default_factory=dict)
    low_ess_checks: int = 0
    high_drift_checks: int = 0
    reported: list[str] = field(default_factory=list)
    high_excess_checks: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.pooled = {k: PooledWeights(**v) for k, v in state["pooled"].items()}
        self.low_ess_checks, self.reported = state["low_ess_checks"], list(state["reported"])
        self.high_drift_checks = state["high_drift_checks"]
        # A checkpoint written before signal (d) existed: its run of high-excess checks starts
        # at 0 on resume, which can only delay that warning by up to divergence_patience steps.
        self.high_excess_checks = state.get("high_excess_checks", 0)

    def load_from(self, engine_state: dict, engine: str) -> None:
        """Restore the monitor from its engine's checkpointed state, refusing a state written
        before the engines had a monitor rather than starting one afresh mid-run."""
        if "divergence" not in engine_state:
            raise ConfigError(f"the checkpoint's {engine} state has no divergence monitor (it was "
                              "written by an older version of this engine); use a new "
                              "checkpoint_dir")
        self.load_state_dict(engine_state["divergence"])


class DivergenceMonitor:
    """Reads each step's weights, returns the signals' values for the history, and warns or
    stops when one passes its threshold. ``last_checkpoint`` says where a stopped run resumes."""

    def __init__(self, options: DivergenceOptions, engine: str, state: DivergenceState,
                 last_checkpoint: Callable[[], str]) -> None:
        self.options = options
        self.engine = engine
        self.state = state
        self.last_checkpoint = last_checkpoint

    def signals(self, key: str, log_w: torch.Tensor, log_potential: torch.Tensor,
                kl_policy_prior: float) -> dict[str, float]:
        """One context's signals at this step (and its weights pooled for the next steps):
        ``ess_fraction`` and ``log_z_drift_se``; KL(π_c‖a_c) is kept for `check`.

        Each process passes its own draws' ``log_w``, ``log_potential`` and estimate of
        KL(π_c‖a_c); they are gathered (averaged) across processes here, so the signals and the
        monitor's state are those of the whole step's draws, the same on every process."""
        if self.options.divergence_action == "off":
            return {}
        log_w, log_potential = gather(log_w.double()), gather(log_potential.double())
        kl_policy_prior = mean_over_processes(kl_policy_prior)
        pooled = self.state.pooled.setdefault(key, PooledWeights())
        before_log_z, before_se = pooled.log_z(), pooled.log_z_se()
        n = log_w.numel()
        chance_all_outside = pooled.chance_all_outside(n)
        pooled.add(log_w, log_potential)
        finite = torch.isfinite(log_w)
        if not finite.any():
            # Before any draw with P > 0 there is no posterior to collapse onto (the chance is
            # then 1), and where draws in the support are rare a step without one is chance.
            return {"ess_fraction": 0.0} if chance_all_outside < EMPTY_STEP_EVIDENCE else {}
        log_sum = float(torch.logsumexp(log_w[finite], 0))
        log_sum_sq = float(torch.logsumexp(2 * log_w[finite], 0))
        pooled.kl_policy_prior = kl_policy_prior
        out = {"ess_fraction": math.exp(2 * log_sum - log_sum_sq) / n}
        if math.isfinite(before_log_z):
            se = math.hypot(_se(log_sum, log_sum_sq, n), before_se)
            drift = (log_sum - math.log(n)) - before_log_z
            out["log_z_drift_se"] = abs(drift) / se if se > 0 else (0.0 if drift == 0 else math.inf)
        return out

    def check(self, step: int, rows: list[dict[str, float]]) -> dict[str, float]:
        """The step's signals over its contexts (for the history), checked: the lowest ESS
        fraction, the largest drift, and E_c KL(π_c‖a_c) / E_c KL(p_c‖a_c) and E_c KL(π_c‖a_c) −
        E_c KL(p_c‖a_c) over every context seen so far, each at its latest estimate — context
        averages, as CDPG's objective is, since one context's KL(p_c‖a_c) may be tiny and a
        shared policy far from its a_c."""
        options = self.options
        if options.divergence_action == "off" or not rows:
            return {}
        measured = [r["ess_fraction"] for r in rows if "ess_fraction" in r]
        if not measured:  # no context has drawn P > 0 yet
            return {}
        worst = {"ess_fraction": min(measured)}
        rated = [p for p in self.state.pooled.values() if math.isfinite(p.log_z())]
        if rated:
            policy_kl = sum(p.kl_policy_prior for p in rated) / len(rated)
            target_kl = sum(p.kl_target_prior() for p in rated) / len(rated)
            worst["kl_policy_prior_multiple"] = policy_kl / target_kl
            worst["kl_policy_prior_excess"] = policy_kl - target_kl
        drifts = [r["log_z_drift_se"] for r in rows if "log_z_drift_se" in r]
        if drifts:
            worst["log_z_drift_se"] = max(drifts)
        low = worst["ess_fraction"] < options.divergence_ess_fraction
        self.state.low_ess_checks, lasting = self._consecutive(self.state.low_ess_checks, low)
        if lasting:
            self._report(step, "ess_fraction", f"the importance weights' ESS fraction has been "
                         f"below divergence_ess_fraction={options.divergence_ess_fraction} for "
                         f"{self.state.low_ess_checks} consecutive steps (now "
                         f"{worst['ess_fraction']:.3g})")
        multiple = worst.get("kl_policy_prior_multiple", 0.0)
        if multiple > options.divergence_kl_multiple:
            self._report(step, "kl_policy_prior", f"KL(π‖a) is {multiple:.3g} × the target's "
                         f"estimated KL(p‖a), past divergence_kl_multiple="
                         f"{options.divergence_kl_multiple}")
        excess = worst.get("kl_policy_prior_excess", 0.0)
        high = excess > options.divergence_kl_excess
        self.state.high_excess_checks, lasting = self._consecutive(self.state.high_excess_checks,
                                                                   high)
        if lasting:
            self._report(step, "kl_policy_prior_excess", f"KL(π‖a) has exceeded the target's "
                         f"estimated KL(p‖a) by more than divergence_kl_excess="
                         f"{options.divergence_kl_excess} nats for {self.state.high_excess_checks} "
                         f"consecutive steps (now {excess:.3g}); for a hard constraint that excess "
                         "is KL(π‖p): π has left p for sequences it favours (measure it against "
                         "exact_reference)")
        drift = worst.get("log_z_drift_se", 0.0)
        high = drift > options.divergence_log_z_se
        self.state.high_drift_checks, lasting = self._consecutive(self.state.high_drift_checks, high)
        if lasting:
            self._report(step, "log_z", f"the step's log Ẑ has been more than "
                         f"divergence_log_z_se={options.divergence_log_z_se} standard errors from "
                         f"the running log Ẑ for {self.state.high_drift_checks} consecutive steps "
                         f"(now {drift:.3g})")
        return {f"monitor_{k}": v for k, v in worst.items()}

    def _consecutive(self, checks: int, bad: bool) -> tuple[int, bool]:
        """A signal's count of consecutive bad checks after this one (one longer, or 0 on a good
        check) and whether it has lasted ``divergence_patience`` checks: one bad step is noise."""
        checks = checks + 1 if bad else 0
        return checks, checks >= self.options.divergence_patience

    def _report(self, step: int, signal: str, what: str) -> None:
        message = f"{self.engine} diverges at step {step}: {what}"
        if self.options.divergence_action == "stop":
            raise TrainingError(f"{message}; training stopped (divergence_action='stop'). "
                                f"{self.last_checkpoint()}")
        if signal not in self.state.reported:
            self.state.reported.append(signal)
            warnings.warn(f"{message}. Lower the learning rate, or set divergence_action='stop' "
                          "to stop at the last checkpoint", DivergenceWarning, stacklevel=2)


def _se(log_sum: float, log_sum_sq: float, count: int) -> float:
    """Delta-method se of log mean w, sqrt(1/ESS − 1/n), from log Σw, log Σw² and n."""
    if count == 0 or not math.isfinite(log_sum):
        return math.inf
    return math.sqrt(max(math.exp(log_sum_sq - 2 * log_sum) - 1 / count, 0.0))
