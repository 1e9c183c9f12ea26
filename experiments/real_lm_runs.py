"""The parts of the real-LM convergence experiment that real_lm_convergence.py runs over targets
× engines (and reports): the targets, the engines and the sizes; one measurement of a policy by
the exact-sample yardstick; one engine trained in resumable segments, measured between them.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch

import bayesalign as ba
from bayesalign import diagnostics as dx
from bayesalign.errors import EmptySupportError, TrainingError
from bayesalign.inference import DPG, KLRL
from bayesalign.inference.policy import make_policy
from bayesalign.models import CausalLM, scorers
from bayesalign.models.adaptors import BanTokens
from bayesalign.reference import Reference, distances, reverse_distance
from bayesalign.seeding import seeded
from bayesalign.targets import NO_CONTEXT

PEP8_KL_COEF = 0.01

# DPG's best options measured so far (issue #11: the Ẑ baseline, 1.22 nats at 11,200 samples
# on the "return" target vs 1.30–1.38 without); the lead updates this as new options land.
BEST_DPG_OPTIONS: dict[str, Any] = {"baseline": True}

ENGINES: dict[str, tuple[type, dict[str, Any]]] = {
    "DPG": (DPG, {}),
    "DPG best": (DPG, BEST_DPG_OPTIONS),
    "DPG off-policy": (DPG, {"off_policy": True}),
    "RLOO": (KLRL, {"algorithm": "rloo"}),
    "PPO": (KLRL, {"algorithm": "ppo"}),
}


@dataclass(frozen=True)
class TargetSpec:
    """One target: its site, how its prior is built and what its table reports."""

    name: str
    site: str
    kind: str  # "constraint" (report the rate) or "reward" (report E r)
    new_tokens: int
    ban_eos: bool
    word: str | None = None  # constraint: this word appears in the decoded text


TARGETS = {
    "return": TargetSpec("return", "return", "constraint", 32, False, word="return"),
    "pep8": TargetSpec("pep8", "pep8", "reward", 64, True),
    "none": TargetSpec("none", "None", "constraint", 32, False, word="None"),
}


@dataclass(frozen=True)
class Sizes:
    targets: tuple[str, ...]
    engines: tuple[str, ...]
    budget: int  # samples drawn per engine
    eval_every: int  # samples drawn between evaluations (plus two early ones)
    reference_samples: int  # exact target draws in the yardstick's pool
    eval_samples: int  # policy draws per evaluation (KL(π‖a), reward, rate, what they are)
    new_tokens: int | None = None  # override every target's length (quick mode)
    fit_eval_samples: int = 64  # draws for each fit's own final diagnostics (not used here)

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        if quick:
            return cls(("return",), ("DPG", "RLOO"), 128, 128, 64, 32, new_tokens=16,
                       fit_eval_samples=16)
        return cls(("return", "pep8", "none"), tuple(ENGINES), 20_000, 2000, 1000, 256)

    def evaluation_points(self) -> list[int]:
        """Samples drawn at which the policy is measured: 0, eval_every/4, /2, then every
        eval_every up to the budget."""
        early = [self.eval_every // 4, self.eval_every // 2]
        regular = range(self.eval_every, self.budget + 1, self.eval_every)
        points = sorted({0, *[p for p in early if 0 < p], *regular, self.budget})
        return [p for p in points if p <= self.budget]


# -- targets -----------------------------------------------------------------------------------


def load_prior(spec: TargetSpec) -> CausalLM:
    """``bundled:code-small`` at the target's length, EOS banned where the target says so."""
    base = CausalLM.from_pretrained("bundled:code-small")
    adaptors = (BanTokens((base.eos_token_id,)),) if spec.ban_eos else ()
    return CausalLM(base.model, base.tokenizer, max_new_tokens=spec.new_tokens,
                    adaptors=adaptors)


def make_target(spec: TargetSpec, prior: CausalLM) -> ba.Target:
    if spec.kind == "constraint":
        word = spec.word

        def model():
            y = pyro.sample("y", prior)
            ba.constraint(spec.site, torch.tensor([word in s for s in y.text]))
    else:
        def model():
            y = pyro.sample("y", prior)
            ba.reward(spec.site, scorers.pep8(y), kl_coef=PEP8_KL_COEF)
    model.__name__ = f"code_small_{spec.name}"
    return ba.target(model)


def site_value(target: ba.Target, spec: TargetSpec, samples) -> torch.Tensor:
    """Per draw: 1.0 where the constraint holds, or the raw reward."""
    site = target.factors(samples)[spec.site]
    if spec.kind == "constraint":
        return torch.isfinite(site.log_factor).double()
    return site.value.double()


# -- counting draws ----------------------------------------------------------------------------


@contextlib.contextmanager
def counting_draws() -> Iterator[list[int]]:
    """Count the rows every `CausalLM.sample_batch` returns inside the block (``[n]``).

    Counted at the sampler rather than computed from an engine's options, so an option that
    changes how many draws a step makes (proposal checks, several updates per batch, replay)
    is measured, not assumed."""
    counter = [0]
    original = CausalLM.sample_batch

    def counted(self, num_samples, *args, **kwargs):
        y = original(self, num_samples, *args, **kwargs)
        counter[0] += len(y)
        return y

    CausalLM.sample_batch = counted
    try:
        yield counter
    finally:
        CausalLM.sample_batch = original


# -- measuring by the yardstick -----------------------------------------------------------------


def measure(target: ba.Target, spec: TargetSpec, policy: CausalLM, reference: Reference,
            eval_samples: int, seed: int) -> dict[str, Any]:
    """The yardstick's KL(p‖π) and TVD ± se, and from ``eval_samples`` fresh policy draws:
    the reverse KL(π_S‖p) ± se of π on p's support S with the pool's log Ẑ and π's mass
    outside S, KL(π‖a) ± se, the on-policy SNIS estimate of KL(p‖π), the reward or constraint
    rate, and what the draws are made of (distinct, empty, length, a few texts)."""
    with torch.no_grad():
        log_pi_pool = policy.log_prob(reference.samples)
        yard = distances(reference, log_pi_pool)
        with seeded(seed):
            draws = policy.sample_batch(eval_samples)
        log_pi = draws.log_q.double()
        log_prior = target.prior().log_prob(draws).double()
        log_score = target.log_score(draws, log_prior=log_prior)
    reverse = reverse_distance(reference, log_score, log_pi)
    ratio = log_pi - log_prior
    value = site_value(target, spec, draws)
    texts = draws.text
    return {
        "kl_target_policy": yard.kl_target_policy, "kl_target_policy_se": yard.kl_target_policy_se,
        "tvd": yard.tvd, "tvd_se": yard.tvd_se,
        "kl_policy_target_in_support": reverse.kl_policy_target_in_support,
        "kl_policy_target_in_support_se": reverse.kl_policy_target_in_support_se,
        "outside_support": reverse.outside_support,
        "kl_policy_prior": float(ratio.mean()),
        "kl_policy_prior_se": float(ratio.std() / math.sqrt(len(ratio))),
        "on_policy_kl_target_policy": dx.is_kl_target_policy(log_score, log_pi, log_pi)
        if torch.isfinite(log_score).any() else math.inf,
        "value": float(value.mean()), "value_se": float(value.std() / math.sqrt(len(value))),
        "distinct_fraction": len(set(texts)) / len(texts),
        "empty_fraction": sum(not t.strip() for t in texts) / len(texts),
        "characters": sum(map(len, texts)) / len(texts),
        "examples": texts[:3],
    }


def reference_row(target: ba.Target, spec: TargetSpec, prior: CausalLM, reference: Reference
                  ) -> dict[str, Any]:
    """Rejection's exact posterior (the pool itself): KL(p‖a) ± se, reward or rate, texts."""
    with torch.no_grad():
        log_prior = prior.log_prob(reference.samples)
    kl = distances(reference, log_prior)
    value = site_value(target, spec, reference.samples)
    texts = reference.samples.text
    return {"kl_target_prior": kl.kl_target_policy, "kl_target_prior_se": kl.kl_target_policy_se,
            "log_z": reference.log_z, "log_z_se": reference.log_z_se,
            "value": float(value.mean()), "value_se": float(value.std() / math.sqrt(len(value))),
            "pool": len(reference.samples), "num_proposed": reference.num_proposed,
            "method": reference.method, "distinct_fraction": len(set(texts)) / len(texts),
            "characters": sum(map(len, texts)) / len(texts), "examples": texts[:3]}


# -- one engine on one target --------------------------------------------------------------------


@dataclass
class Curve:
    """One engine's evaluation points on one target, and how its run went."""

    engine: str
    options: dict[str, Any]
    points: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stopped: str | None = None  # why training ended early (a TrainingError), if it did
    train_seconds: float = 0.0


def engine_options(name: str, overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The engine's own options, then ``overrides["*"]``, then ``overrides[name]``."""
    _, base = ENGINES[name]
    return {**base, **overrides.get("*", {}), **overrides.get(name, {})}


def segment_sizes(cls: type, options: dict[str, Any]) -> tuple[float, int]:
    """Nominal draws per optimizer step (to size segments; the count itself is measured) and
    the step multiple segments end on: whole PPO rollouts, so a resumed segment starts one."""
    probe = cls(**options, progress=False)
    per_step, multiple = probe.batch_size * probe.gradient_accumulation_steps, 1
    if isinstance(probe, KLRL) and probe.algorithm == "ppo":
        multiple = probe.ppo_epochs * probe.ppo_minibatches
    return per_step / multiple, multiple


def _policy_for(cls: type, target: ba.Target, prior: CausalLM, options: dict[str, Any],
                seed: int) -> tuple[CausalLM, dict[str, Any]]:
    """The policy every segment trains, and the options to fit it with. With ``lora`` the
    adapters are made here, once, and the segments train them (``lora`` dropped): each fit
    given ``lora`` would add a new adapter, and the policy passed in runs without them."""
    lora = cls(**options, progress=False).lora
    if lora is None:
        return prior.trainable_copy(), options
    with seeded(seed):  # A is drawn at random, as the engine draws it
        policy = make_policy(target, NO_CONTEXT, prior.trainable_copy(), lora)
    return policy, {k: v for k, v in options.items() if k != "lora"}


def _last_monitor_readings(history: list[dict], before: dict[str, float]) -> dict[str, float]:
    """The divergence monitor's readings (``monitor_*``) at the last step that had any (a step
    with no draw in the support may have none), or ``before`` if no step of ``history`` had."""
    for row in reversed(history):
        readings = {k: v for k, v in row.items() if k.startswith("monitor_")}
        if readings:
            return readings
    return before


def run_engine(name: str, target: ba.Target, spec: TargetSpec, prior: CausalLM,
               reference: Reference, sizes: Sizes, options: dict[str, Any], workdir: Path,
               seed: int, on_point: Callable[[Curve], None]) -> Curve:
    """Train ``name`` in segments up to ``sizes.budget`` drawn samples, measuring between them."""
    cls, _ = ENGINES[name]
    curve = Curve(name, options)
    policy, options = _policy_for(cls, target, prior, options, seed)
    checkpoints = workdir / "checkpoints"
    shutil.rmtree(checkpoints, ignore_errors=True)
    per_step, multiple = segment_sizes(cls, options)
    drawn, steps = 0, 0
    monitor: dict[str, float] = {}  # the divergence monitor's latest readings
    for goal in sizes.evaluation_points():
        if 0 < goal <= drawn:  # the last segment already drew past this point
            continue
        if goal > 0:
            wanted = max(steps + multiple, math.ceil((goal - drawn) / per_step) + steps)
            wanted = math.ceil(wanted / multiple) * multiple
            engine = cls(**{**options, "steps": wanted, "checkpoint_dir": str(checkpoints),
                            "keep_checkpoints": 1, "progress": False, "policy": policy,
                            "eval_samples": sizes.fit_eval_samples, "seed": seed})
            started = time.perf_counter()
            try:
                with counting_draws() as count, warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    history = engine.fit(target).history
                monitor = _last_monitor_readings(history, monitor)
            except EmptySupportError as error:
                # The fit's own final diagnostics found no target mass in its few draws; the
                # segment trained and was checkpointed all the same (measured below).
                if not (checkpoints / f"checkpoint-{wanted:08d}").is_dir():
                    curve.stopped = f"step {steps}–{wanted}: {error}"
                    on_point(curve)
                    break
                curve.warnings.append(f"step {wanted}: fit diagnostics: {error}")
            except TrainingError as error:
                curve.stopped = f"step {steps}–{wanted}: {error}"
                on_point(curve)
                break
            curve.train_seconds += time.perf_counter() - started
            # finish() draws fit_eval_samples for the posterior and as many for its diagnostics.
            drawn += count[0] - 2 * sizes.fit_eval_samples
            steps = wanted
            for w in caught:
                message = f"step ≤ {steps}: {w.category.__name__}: {w.message}"
                if not any(str(w.message) in m for m in curve.warnings):
                    curve.warnings.append(message)
        point = {"samples": drawn, "steps": steps, "train_seconds": curve.train_seconds,
                 "monitor": monitor, **measure(target, spec, policy, reference, sizes.eval_samples, seed + 1)}
        curve.points.append(point)
        on_point(curve)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return curve
