"""How far trained policies are from a rare-constraint target on the code prior, bracketed: the
KL(σ‖π) and KL(π‖σ) intervals that log Z's two-sided bounds give, next to the exact-sample
yardstick's KL(σ‖π), for the prior and for a DPG and an RLOO policy (issue #12's last table).

The target is `experiments.smc_code`'s (`smc_code.rare_target`: same pilot, seed and banned
tokens): σ(y) ∝ a(y)·1[y is not empty]·1[y holds no banned token], prior acceptance ≤ 2% in full
mode. For each q (the prior, DPG's policy,
RLOO's policy, trained on ``steps × batch_size`` draws with the engines' default options):

- IWAE bounds on log Z with K = ``k`` draws of q (`log_z_bounds`: ``runs`` replicates below,
  one replicate per exact target draw above) and the KL brackets they give (SPEC §11):
  KL(q‖σ) ∈ [LB − ELBO, UB − ELBO], KL(σ‖q) ∈ [EUBO − UB, EUBO − LB];
- the yardstick (SPEC §12): KL(σ‖q) ± se on the same pool of exact draws (Rejection, bound 1);
- the share of q's draws that meet the constraint. Where q breaks the constraint at all,
  KL(q‖σ) = ∞ (q puts mass where σ has none), and the ELBO and that bracket say so.

``python -m experiments.policy_brackets [--quick] [--output DIR]``; full mode uses
``bundled:code-small``, quick mode smc_code's tiny random GPT-2.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bayesalign.evaluation import evaluate
from bayesalign.inference import DPG, KLRL, exact_reference, log_z_bounds

from . import smc_code
from .cli import experiment_main
from .results import publish, write_results


@dataclass(frozen=True)
class Sizes:
    steps: int  # optimizer steps of each learned engine
    batch_size: int  # draws per step
    k: int  # IWAE's K: draws of q per bound replicate
    runs: int  # replicates of the lower bound
    exact: int  # exact target draws: the yardstick's pool and the upper bound's replicates
    eval_samples: int  # draws of q for its constraint rate (and the engines' diagnostics)

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        if quick:
            return cls(steps=2, batch_size=8, k=8, runs=4, exact=8, eval_samples=32)
        return cls(steps=100, batch_size=32, k=32, runs=32, exact=128, eval_samples=512)


def trained_policies(target: Any, sizes: Sizes) -> dict[str, Any]:
    """The prior (None: `log_z_bounds`' default q) and the policies DPG and RLOO train on it."""
    shared = {"steps": sizes.steps, "batch_size": sizes.batch_size,
              "eval_samples": sizes.eval_samples, "seed": 1, "progress": False}
    return {"prior": None,
            "DPG": DPG(**shared).fit(target).policy,
            "RLOO": KLRL(algorithm="rloo", **shared).fit(target).policy}


def bracket_row(name: str, target: Any, q: Any, reference: Any, sizes: Sizes,
                drawn: int) -> dict:
    """One q's bounds, KL brackets, yardstick and constraint rate."""
    bounds = log_z_bounds(target, q, num_samples=sizes.k, num_runs=sizes.runs,
                          exact_samples=reference, seed=30_000)
    law = target.prior() if q is None else q
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(40_000)
        draws = law.sample_batch(sizes.eval_samples)
    # The yardstick's on-policy half and the constraint rate read the same draws.
    yardstick = evaluate(target, draws, law=law.log_prob, policy=law,
                         eval_samples=sizes.eval_samples, reference=reference)
    allowed = torch.isfinite(target.log_potential(draws)).double().mean()
    return {"policy": name, "samples_drawn": drawn,
            "log_z_lower": bounds.log_z_lower, "log_z_upper": bounds.log_z_upper,
            "elbo": bounds.elbo, "eubo": bounds.eubo,
            "kl_target_q": [bounds.kl_target_q.low, bounds.kl_target_q.high],
            "kl_target_q_se": [bounds.kl_target_q.low_se, bounds.kl_target_q.high_se],
            "kl_q_target": [bounds.kl_q_target.low, bounds.kl_q_target.high],
            "yardstick_kl_target_q": yardstick.reference_kl_target_policy,
            "yardstick_kl_target_q_se": yardstick.reference_kl_target_policy_se,
            "allowed_rate": float(allowed)}


def run(output: Path, quick: bool) -> str:
    output.mkdir(parents=True, exist_ok=True)
    target_sizes, sizes = smc_code.Sizes.for_mode(quick), Sizes.for_mode(quick)
    prior = smc_code.load_prior(quick, target_sizes.new_tokens)
    target, banned, pilot_acceptance = smc_code.rare_target(prior, target_sizes)
    reference = exact_reference(target, bound=1.0, num_samples=sizes.exact,
                                max_proposals=10_000 * sizes.exact, seed=20_000)
    results: dict[str, Any] = {"quick": quick, "sizes": asdict(sizes),
                               "target_sizes": asdict(target_sizes), "banned": banned,
                               "pilot_acceptance": pilot_acceptance,
                               "reference_log_z": reference.log_z,
                               "reference_log_z_se": reference.log_z_se, "rows": []}
    for name, q in trained_policies(target, sizes).items():
        drawn = 0 if q is None else sizes.steps * sizes.batch_size
        results["rows"].append(bracket_row(name, target, q, reference, sizes, drawn))
        write_results(output, "policy_brackets", False, results)  # a stopped run keeps its rows
    return publish(output, "policy_brackets", results, True, render)[1]


def _interval(ends: list[float]) -> str:
    return "[" + ", ".join(f"{e:.3f}" if math.isfinite(e) else ("∞" if e > 0 else "-∞")
                           for e in ends) + "]"


def render(results: dict) -> str:
    """The Markdown table of a results.json's contents."""
    sizes, target_sizes = results["sizes"], results["target_sizes"]
    lines = ["| policy | samples drawn | KL(σ‖π) bracket | KL(σ‖π), yardstick ± se | "
             "KL(π‖σ) bracket | log Z bounds | π meets the constraint |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(
            f"| {r['policy']} | {r['samples_drawn']:,} | {_interval(r['kl_target_q'])} | "
            f"{r['yardstick_kl_target_q']:.3f} ± {r['yardstick_kl_target_q_se']:.3f} | "
            f"{_interval(r['kl_q_target'])} | {_interval([r['log_z_lower'], r['log_z_upper']])} | "
            f"{r['allowed_rate']:.1%} |")
    title = ("## Trained policies bracketed on a rare constraint ("
             + ("tiny random GPT-2, quick" if results["quick"] else "bundled:code-small")
             + f", {target_sizes['new_tokens']} tokens, IWAE K = {sizes['k']}, "
             f"{sizes['runs']} lower / {sizes['exact']} upper replicates)")
    note = (f"Banned tokens: {len(results['banned'])} (pilot acceptance "
            f"{results['pilot_acceptance']:.3f}); log Z from the exact pool's Rejection: "
            f"{results['reference_log_z']:.3f} ± {results['reference_log_z_se']:.3f}. "
            "KL(π‖σ) is ∞ for a π that breaks the constraint with any probability.")
    return "\n".join([title, "", *lines, "", note])


def main(argv: list[str] | None = None) -> int:
    return experiment_main(run, __doc__.splitlines()[0], "outputs/policy_brackets", argv)


if __name__ == "__main__":
    raise SystemExit(main())
