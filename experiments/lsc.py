"""LSC vs raw reward sum: two code properties, KL-regularised RL, satisfaction at matched KL.

Wang et al. (ICML 2024, SPEC §6) turn each reward into log P(good) = log σ(r − r_ref), r_ref the
0.85 quantile of the prior's rewards, so a sum of utilities is log P(good on all properties):
an AND that should lift the worst property at a given KL(π‖a) more than summing raw rewards.
Here the properties of code samples from the prior are r1 = `scorers.pep8` (−violations/char)
and r2 = `scorers.parses` as 0/1. Both rewards are divided by their prior standard deviation
before either sum (the LSC assumes logit-scale rewards; raw PEP8 spans ~0.02, so it would
vanish next to a 0/1 parse), so the two methods see the same rewards and differ only in the
transform. KLRL (RLOO) is trained on each sum at several kl_coef; a property is satisfied by a
sample when r_i > r_i^ref (better than 85% of the prior), and the worst property is the lower
of the two satisfaction rates. The methods are compared at matched KL by interpolating each
method's curve (the prior is KL 0 on both).

The prior samples exactly ``new_tokens`` tokens (EOS banned): with EOS allowed, RLOO learns
within 20 steps to stop at once, and the empty text parses and is PEP8-clean. Full mode uses
``bundled:code-small`` at 32 tokens, where 4.7% of prior samples parse and the PEP8 reference
(−0.0089) lies below the 12% of clean samples (at 16–24 tokens it is 0, which no sample beats);
quick mode a tiny random GPT-2 so the tests exercise every code path in seconds.

``python -m experiments.lsc [--quick] [--output DIR]``
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyro
import torch

import bayesalign as ba
from bayesalign.inference import KLRL
from bayesalign.models import CausalLM, scorers
from bayesalign.sequences import Sequences

from .cli import experiment_main
from .pep8_frontier import load_prior
from .results import publish

PROPERTIES = ("pep8", "parses")
METHODS = ("raw", "lsc")
REFERENCE_QUANTILE = 0.85


@dataclass(frozen=True)
class Sizes:
    new_tokens: int
    reference_samples: int  # prior draws for r_ref, the reward scales and the prior's row
    kl_coefs: dict[str, tuple[float, ...]]  # per method: LSC utilities are bounded above by 0
    steps: int
    batch: int
    learning_rate: float
    eval_samples: int  # policy draws for satisfaction and KL(π‖a)

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        if quick:
            return cls(16, 64, {"raw": (1.0,), "lsc": (1.0,)}, 2, 8, 1e-3, 32)
        return cls(32, 1024, {"raw": (4.0, 1.0, 0.25), "lsc": (1.0, 0.25, 0.0625)}, 80, 16,
                   5e-5, 512)


@dataclass(frozen=True)
class Calibration:
    """Per-property reference r_ref (LSC's centre) and prior standard deviation (the unit)."""

    reference: torch.Tensor  # [property]
    scale: torch.Tensor  # [property]


def property_rewards(y: Sequences) -> torch.Tensor:
    """``[batch, property]`` rewards, higher is better: −PEP8 violations/char, parses as 0/1."""
    return torch.stack([scorers.pep8(y).double(), scorers.parses(y).double()], dim=-1)


def calibrate(prior_rewards: torch.Tensor) -> Calibration:
    """r_ref = the prior's 0.85 quantile per property (SPEC §6); unit = the prior's std (1 where
    the prior never varies, which gives no scale)."""
    reference = ba.reference_reward(prior_rewards.T, quantile=REFERENCE_QUANTILE)
    std = prior_rewards.std(0)
    return Calibration(reference, torch.where(std > 0, std, 1.0))


def utility(rewards: torch.Tensor, method: str, calibration: Calibration) -> torch.Tensor:
    """Raw: Σ r_i/s_i. LSC: Σ log σ((r_i − r_i^ref)/s_i) = log P(every property good)."""
    scaled = rewards / calibration.scale
    if method == "raw":
        return scaled.sum(-1)
    return ba.log_sigmoid_centered(scaled, calibration.reference / calibration.scale).sum(-1)


def aligned_target(prior: CausalLM, method: str, calibration: Calibration,
                   kl_coef: float) -> ba.Target:
    @ba.target
    def code_with_two_properties():
        y = pyro.sample("y", prior)
        ba.reward(method, utility(property_rewards(y), method, calibration), kl_coef=kl_coef)

    return code_with_two_properties


def summarise(rewards: torch.Tensor, calibration: Calibration) -> dict[str, float]:
    """Satisfaction r_i > r_i^ref per property, the worst of them, and each mean raw reward."""
    satisfied = (rewards > calibration.reference).double().mean(0)
    means = rewards.mean(0)
    row = {f"sat_{name}": float(satisfied[i]) for i, name in enumerate(PROPERTIES)}
    row |= {f"mean_{name}": float(means[i]) for i, name in enumerate(PROPERTIES)}
    row["worst"] = float(satisfied.min())
    return row


def train(prior: CausalLM, method: str, calibration: Calibration, kl_coef: float,
          sizes: Sizes) -> dict:
    engine = KLRL(algorithm="rloo", steps=sizes.steps, batch_size=sizes.batch,
                  learning_rate=sizes.learning_rate, eval_samples=sizes.eval_samples,
                  seed=0, progress=False)
    start = time.perf_counter()
    post = engine.fit(aligned_target(prior, method, calibration, kl_coef))
    return {"method": method, "kl_coef": kl_coef, "kl": post.diagnostics.kl_policy_prior,
            "seconds": time.perf_counter() - start,
            **summarise(property_rewards(post.samples), calibration)}


def at_kl(rows: list[dict], method: str, key: str, kl: float) -> float:
    """``key`` of ``method``'s curve (prior at KL 0, then its runs) linearly interpolated at kl."""
    curve = sorted((r for r in rows if r["method"] in (method, "prior")), key=lambda r: r["kl"])
    return float(np.interp(kl, [r["kl"] for r in curve], [r[key] for r in curve]))


def matched(rows: list[dict]) -> list[dict]:
    """Both methods at each run's KL that lies inside both curves' KL range."""
    reach = min(max(r["kl"] for r in rows if r["method"] == m) for m in METHODS)
    kls = sorted(r["kl"] for r in rows if r["method"] in METHODS and 0 < r["kl"] <= reach)
    return [{"kl": kl, **{f"{m}_{key}": at_kl(rows, m, key, kl) for m in METHODS
                          for key in ("worst", "sat_pep8", "sat_parses")}} for kl in kls]


def run(output: Path, quick: bool) -> str:
    output.mkdir(parents=True, exist_ok=True)
    sizes = Sizes.for_mode(quick)
    prior = load_prior(quick, sizes.new_tokens)
    start = time.perf_counter()
    runs = sum(len(sizes.kl_coefs[m]) for m in METHODS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        prior_rewards = property_rewards(prior.sample_batch(sizes.reference_samples))
        calibration = calibrate(prior_rewards)
        rows = [{"method": "prior", "kl_coef": float("nan"), "kl": 0.0, "seconds": 0.0,
                 **summarise(prior_rewards, calibration)}]
        for method in METHODS:
            for kl_coef in sizes.kl_coefs[method]:
                rows.append(train(prior, method, calibration, kl_coef, sizes))
                # Written after every run, so a long full run that is stopped keeps its rows.
                report = publish(output, "lsc", _results(
                    rows, calibration, sizes, quick, time.perf_counter() - start),
                    len(rows) == runs + 1, render, _plot)[1]
    return report


def _results(rows: list[dict], calibration: Calibration, sizes: Sizes, quick: bool,
             seconds: float) -> dict:
    both = all(any(r["method"] == m for r in rows) for m in METHODS)
    return {"quick": quick, "sizes": asdict(sizes), "seconds": seconds,
            "reference_quantile": REFERENCE_QUANTILE,
            "calibration": {"properties": PROPERTIES, "reference": calibration.reference,
                            "scale": calibration.scale},
            "rows": rows, "matched": matched(rows) if both else []}


def render(results: dict) -> str:
    """The Markdown tables of a results.json's contents."""
    sizes, calibration = results["sizes"], results["calibration"]
    prior = "tiny random GPT-2, quick" if results["quick"] else "bundled:code-small"
    lines = [f"## LSC vs raw sum ({prior}, {sizes['new_tokens']} new tokens, KLRL-RLOO "
             f"{sizes['steps']} steps × {sizes['batch']}, {sizes['eval_samples']} eval samples, "
             f"{results['seconds']:.0f} s)", "",
             f"r_ref (prior {results['reference_quantile']:g} quantile): PEP8 "
             f"{calibration['reference'][0]:.4f}, parses {calibration['reference'][1]:g};"
             f" unit (prior std): PEP8 {calibration['scale'][0]:.4f}, parses "
             f"{calibration['scale'][1]:.3f}", "",
             "| method | kl_coef | KL(π‖a) nats | sat PEP8 | sat parses | worst | "
             "mean PEP8 reward | parse rate | s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['method']} | {r['kl_coef']:g} | {r['kl']:.3f} | {r['sat_pep8']:.3f}"
                     f" | {r['sat_parses']:.3f} | {r['worst']:.3f} | {r['mean_pep8']:.4f} | "
                     f"{r['mean_parses']:.3f} | {r['seconds']:.0f} |")
    if results["matched"]:
        lines += ["", "Matched KL (each curve interpolated linearly from the prior at KL 0):", "",
                  "| KL(π‖a) | raw: worst | LSC: worst | LSC − raw | raw: PEP8 / parses | "
                  "LSC: PEP8 / parses |", "|---|---|---|---|---|---|"]
        for p in results["matched"]:
            lines.append(f"| {p['kl']:.3f} | {p['raw_worst']:.3f} | {p['lsc_worst']:.3f} | "
                         f"{p['lsc_worst'] - p['raw_worst']:+.3f} | {p['raw_sat_pep8']:.3f} / "
                         f"{p['raw_sat_parses']:.3f} | {p['lsc_sat_pep8']:.3f} / "
                         f"{p['lsc_sat_parses']:.3f} |")
    return "\n".join(lines)


def _plot(results: dict, path: Path) -> None:
    from bayesalign.app import plots

    rows = results["rows"]
    fig, axes = plots.figure(3, width=4.0, height=3.6)
    titles = {"sat_pep8": "PEP8 better than r_ref", "sat_parses": "parses",
              "worst": "worst property (AND)"}
    for ax, (key, title) in zip(axes, titles.items(), strict=True):
        for method, colour in zip(METHODS, ("tab:orange", "tab:blue"), strict=True):
            curve = sorted((r for r in rows if r["method"] in (method, "prior")),
                           key=lambda r: r["kl"])
            ax.plot([r["kl"] for r in curve], [r[key] for r in curve], "o-", color=colour,
                    label="raw sum" if method == "raw" else "LSC sum")
        ax.set(title=title, xlabel="KL(π‖a) nats", ylabel="fraction of samples")
    axes[0].legend()
    plots.save(fig, path)


def main(argv: list[str] | None = None) -> int:
    return experiment_main(run, __doc__.splitlines()[0], "outputs/lsc", argv)


if __name__ == "__main__":
    raise SystemExit(main())
