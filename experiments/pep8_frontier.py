"""PEP8 frontier: the code prior × a PEP8 reward at several kl_coef values, every engine.

Target (SPEC §1.1): p(y) ∝ a(y)·exp(r(y)/kl_coef) with r = `scorers.pep8` = −violations per
character ≤ 0, so P/a ≤ 1 and Rejection with bound M = 1 is exact (acceptance = Z). For each
engine we report the mean PEP8 violations per character of its samples against KL(π‖a):

- Rejection and Importance (resampled) target p, whose KL(p‖a) = E_p[r]/kl_coef − log Z is
  estimated from the samples and Ẑ; QRS with β_q < 1 follows p_β ∝ min(P, β_q·a), whose KL is
  E[log min(e^{r/β}, β_q)] − log Z_β; BestOfN reports its exact upper bound log n − (n−1)/n;
  the policy engines (DPG, off-policy DPG, RLOO, PPO, each with its default options and a
  budget of ``policy_samples`` drawn samples) report their on-policy estimate
  mean(log π − log a) over fresh draws, and beside it the yardstick's KL(p‖π) ± se (SPEC §12):
  how far the policy is from the exact posterior at its kl_coef, read on Rejection's exact
  samples (the pool the Rejection row shows), so a row that lands near p's point by luck of
  reward alone is told apart from one that reached p.

``python -m experiments.pep8_frontier [--quick] [--output DIR]``; full mode uses
``bundled:code-small`` (train it with ``bayesalign pretrain --preset code-small``), quick mode a
tiny random GPT-2 so the tests exercise every code path in seconds.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyro
import torch

import bayesalign as ba
from bayesalign.inference import DPG, KLRL, QRS, BestOfN, Importance, exact_reference
from bayesalign.models import CausalLM, scorers
from bayesalign.models.adaptors import BanTokens
from bayesalign.models.tiny import tiny_causal_lm
from bayesalign.reference import distances

from .cli import experiment_main
from .real_lm_runs import segment_sizes
from .results import publish


@dataclass(frozen=True)
class Sizes:
    kl_coefs: tuple[float, ...]
    samples: int  # accepted / resampled / best-of-n outputs per sampling engine
    best_of_n: tuple[int, ...]
    qrs_beta: float
    policy_samples: int  # samples each policy engine draws while training (its budget)
    new_tokens: int
    reference_samples: int  # Rejection's exact draws: its row and the yardstick's pool
    policy_batch: int | None = None  # None: the engines' default batch_size

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        if quick:
            return cls((0.05,), 32, (4,), 0.2, 24, 16, 48, policy_batch=8)
        return cls((0.02, 0.01), 256, (4, 16, 64), 0.2, 6400, 64, 1000)


# The policy engines, each with its default options (a user's own target gets these): #11
# asks that the defaults land near the exact posterior, not settings tuned per target.
POLICY_ENGINES: tuple[tuple[str, type, dict], ...] = (
    ("DPG", DPG, {}), ("DPG off-policy", DPG, {"off_policy": True}),
    ("RLOO", KLRL, {"algorithm": "rloo"}), ("PPO", KLRL, {"algorithm": "ppo"}))


def load_prior(quick: bool, new_tokens: int) -> CausalLM:
    """The code prior with EOS banned, so every sample has ``new_tokens`` tokens: violations
    per character score the empty text perfect, and a policy free to stop learns to say
    nothing (seen: an RLOO policy ended most of its samples at once)."""
    base = tiny_causal_lm(seed=0, initializer_range=0.3) if quick else \
        CausalLM.from_pretrained("bundled:code-small")
    return CausalLM(base.model, base.tokenizer, max_new_tokens=new_tokens,
                    adaptors=(BanTokens((base.eos_token_id,)),))


def pep8_target(prior: CausalLM, kl_coef: float) -> ba.Target:
    @ba.target
    def clean_code():
        y = pyro.sample("y", prior)
        ba.reward("pep8", scorers.pep8(y), kl_coef=kl_coef)

    return clean_code


def violations_per_char(samples) -> float:
    """Mean PHF misalignment score (violations per character) of decoded samples."""
    return 0.0 - float(scorers.pep8(samples).mean())  # 0.0 − x: no −0.0 for clean samples


def _gibbs_kl(target: ba.Target, samples, kl_coef: float, log_z: float) -> float:
    """KL(p‖a) = E_p[r]/kl_coef − log Z from samples of p and an estimate of log Z."""
    reward = target.factors(samples)["pep8"].value.double()
    return float(reward.mean() / kl_coef - log_z)


def _row(kl_coef: float | None, engine: str, samples, kl: float, **extra) -> dict:
    return {"kl_coef": kl_coef, "engine": engine, "kl_policy_prior": kl,
            "violations_per_char": violations_per_char(samples),
            "characters": sum(map(len, samples.text)) / len(samples.text), **extra}


def run_reward_only(prior: CausalLM, sizes: Sizes) -> list[dict]:
    """The prior and BestOfN, which read the reward but not kl_coef: drawn once."""
    target = pep8_target(prior, 1.0)
    rows = [_row(None, "prior", prior.sample_batch(sizes.samples), 0.0)]
    for n in sizes.best_of_n:
        bon = BestOfN(n=n, reward="pep8", num_samples=sizes.samples).fit(target)
        rows.append(_row(None, f"BestOfN n={n}", bon.samples, bon.extras["kl_bound"]))
    return rows


def run_engines(prior: CausalLM, kl_coef: float, sizes: Sizes) -> list[dict]:
    """The engines whose target depends on kl_coef."""
    target = pep8_target(prior, kl_coef)
    rows = []

    def add(engine: str, samples, kl: float, **extra) -> None:
        rows.append(_row(kl_coef, engine, samples, kl, **extra))

    reference = exact_reference(target, bound=1.0, num_samples=sizes.reference_samples,
                                chunk_size=4 * sizes.samples,
                                max_proposals=200 * sizes.reference_samples, seed=None)
    exact = reference.samples[:sizes.samples]
    add("Rejection", exact, _gibbs_kl(target, reference.samples, kl_coef, reference.log_z),
        acceptance_rate=len(reference.samples) / reference.num_proposed)
    importance = Importance(num_samples=8 * sizes.samples, resample=True).fit(target)
    add("Importance", importance.sample(sizes.samples),
        _gibbs_kl(target, importance.samples, kl_coef, importance.diagnostics.log_z),
        ess_fraction=importance.diagnostics.ess_fraction)
    qrs = QRS(qrs_beta=sizes.qrs_beta, num_samples=sizes.samples,
              chunk_size=4 * sizes.samples).fit(target)
    reward = target.factors(qrs.samples)["pep8"].value.double()
    log_clip = torch.clamp(reward / kl_coef, max=math.log(sizes.qrs_beta))
    log_z_beta = math.log(qrs.diagnostics.acceptance_rate * sizes.qrs_beta)
    add(f"QRS β_q={sizes.qrs_beta:g}", qrs.samples, float(log_clip.mean() - log_z_beta),
        acceptance_rate=qrs.diagnostics.acceptance_rate)
    for name, cls, options in POLICY_ENGINES:
        samples, kl, measured = _fit_policy(target, prior, reference, cls, options, sizes)
        add(name, samples, kl, **measured)
    return rows


def _fit_policy(target: ba.Target, prior: CausalLM, reference, cls: type, options: dict,
                sizes: Sizes) -> tuple[Any, float, dict[str, Any]]:
    """One policy engine at its defaults for ``sizes.policy_samples`` drawn samples: its
    samples, on-policy KL(π‖a), and the yardstick's KL(p‖π) ± se."""
    if sizes.policy_batch is not None:
        options = {**options, "batch_size": sizes.policy_batch}
    per_step, multiple = segment_sizes(cls, options)
    steps = math.ceil(sizes.policy_samples / per_step / multiple) * multiple
    policy = prior.trainable_copy()
    posterior = cls(**options, steps=steps, policy=policy, eval_samples=sizes.samples,
                    progress=False).fit(target)
    with torch.no_grad():
        yard = distances(reference, policy.log_prob(reference.samples))
    return (posterior.sample(sizes.samples), posterior.diagnostics.kl_policy_prior,
            {"kl_target_policy": yard.kl_target_policy,
             "kl_target_policy_se": yard.kl_target_policy_se, "steps": steps})


def run(output: Path, quick: bool) -> str:
    output.mkdir(parents=True, exist_ok=True)
    sizes = Sizes.for_mode(quick)
    prior = load_prior(quick, sizes.new_tokens)
    rows: list[dict] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rows += run_reward_only(prior, sizes)
        for index, kl_coef in enumerate(sizes.kl_coefs):
            rows += run_engines(prior, kl_coef, sizes)
            # Written after every kl_coef, so a long full run that is stopped keeps its rows.
            report = publish(output, "pep8_frontier",
                             {"quick": quick, "sizes": asdict(sizes), "rows": rows},
                             index == len(sizes.kl_coefs) - 1, render, _plot)[1]
    return report


def render(results: dict) -> str:
    """The Markdown table of a results.json's contents."""
    rows, sizes = results["rows"], results["sizes"]
    baseline = next(r["violations_per_char"] for r in rows if r["engine"] == "prior")
    lines = ["| kl_coef | engine | PEP8 violations / char | × fewer than prior | KL(π‖a) nats | "
             "KL(p‖π) ± se (yardstick) | characters |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = baseline / r["violations_per_char"] if r["violations_per_char"] > 0 else math.inf
        kl_coef = "—" if r["kl_coef"] is None else f"{r['kl_coef']:g}"
        yard = (f"{r['kl_target_policy']:.3f} ± {r['kl_target_policy_se']:.3f}"
                if "kl_target_policy" in r else "—")
        lines.append(f"| {kl_coef} | {r['engine']} | {r['violations_per_char']:.4f} | "
                     f"{ratio:.2f} | {r['kl_policy_prior']:.3f} | {yard} | "
                     f"{r['characters']:.0f} |")
    title = ("## PEP8 frontier (" + ("tiny random GPT-2, quick" if results["quick"]
                                     else "bundled:code-small")
             + f", EOS banned: {sizes['new_tokens']} tokens per sample, {sizes['samples']} "
             f"samples per engine; policies at their default options, "
             f"{sizes['policy_samples']} samples drawn in training; yardstick of "
             f"{sizes['reference_samples']} exact draws)")
    return "\n".join([title, "", *lines])


def _plot(results: dict, path: Path) -> None:
    from bayesalign.app import plots

    # One curve per engine; BestOfN's n and QRS's β_q vary along a curve.
    points = [{"engine": re.sub(r" (n|β_q)=\S+", "", r["engine"]),
               "kl_policy_prior": r["kl_policy_prior"],
               "reward": -r["violations_per_char"], "label": _point_label(r)}
              for r in results["rows"]]
    plots.plot_reward_kl_frontier(points, path, symlog_kl=True)


def _point_label(row: dict) -> str:
    """β for the engines that target p_β, the engine's own parameter (n=…) for the others."""
    if row["kl_coef"] is not None:
        return f"β={row['kl_coef']:g}"
    return row["engine"].partition(" ")[2]


def main(argv: list[str] | None = None) -> int:
    return experiment_main(run, __doc__.splitlines()[0], "outputs/pep8_frontier", argv)


if __name__ == "__main__":
    raise SystemExit(main())
