"""SMC on the code prior: a rare banned-token constraint, SMC with and without its prefix twist
against Rejection and Importance at the same number of LM forward tokens.

Target (SPEC §11): p(y) ∝ a(y)·1[y is not empty]·1[y holds no banned token], the second declared
with ``ba.prefix_constraint`` (every engine sees the constraint; SMC also prunes prefixes with
it). The banned tokens are the prior's most frequent ones on a pilot batch, added until at most
``acceptance`` of the pilot samples are non-empty and avoid them all, so the prior's acceptance
is small (≤ 2% in full mode). An empty sample (EOS first) would meet any banned-token
constraint, and today's prior writes one 2.3% of the time, so the target leaves it out. Each
method gets
``particles × new_tokens`` forward tokens per run (SMC: one position per particle per step,
finished particles included; Importance and Rejection: ``particles`` prior draws of
``new_tokens``), over ``runs`` seeds:

- ESS per 1000 forward tokens (Rejection: exact samples accepted), and log Ẑ ± its se over runs
  against a reference from Importance with ``reference_factor``× the samples;
- the bounds' gap (upper − lower, `log_z_bounds` with Rejection's exact draws, K = ``particles``)
  of IWAE from the prior, of SMC / conditional SMC with the prefix twist, and of twisted SMC /
  conditional SMC with the learned twist alone: how wide the bracket of log Z is. IWAE's lower
  end is −∞ whenever a replicate has no allowed draw.

SMC's ESS is that of its final weights; after a resampling event equal weights hide how few
distinct ancestors remain, so it is an optimistic count.

The learned twists are `NextTokenTwist` heads (one log ψ per next token, from the prior's hidden
state before it) trained by CTL (`TwistLearning`, positives from ``twist_exact`` Rejection
draws): one alone (trained and run without the prefix factor), one on top of the prefix twist
(trained and run with it: it learns the chance a clean prefix stays clean). SMC hands them the
hidden states of its own forward passes, so their runs — the twisted proposal's included — cost
the same forward tokens as SMC without a twist; their training's forward tokens (and the exact
draws') are reported beside the table, paid once for every run.

``python -m experiments.smc_code [--quick] [--output DIR]``; full mode uses
``bundled:code-small``, quick mode a tiny random GPT-2 so the tests exercise every path in seconds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import pyro
import torch

import bayesalign as ba
from bayesalign.errors import EmptySupportError
from bayesalign.inference import SMC, Importance, Rejection, TwistLearning, log_z_bounds
from bayesalign.inference.twists import NextTokenTwist
from bayesalign.models import CausalLM
from bayesalign.models.tiny import tiny_causal_lm

from .cli import experiment_main
from .results import publish, write_results


@dataclass(frozen=True)
class Sizes:
    new_tokens: int
    particles: int  # N: SMC particles, Importance / Rejection draws per run
    runs: int  # seeded repeats of each method
    pilot: int  # prior draws that choose the banned tokens
    acceptance: float  # the pilot's acceptance the banned set must reach (at most)
    reference_factor: int  # Importance reference: this many times the samples of all runs
    exact: int  # Rejection's exact draws for the upper bound
    twist_steps: int  # CTL optimizer steps of each learned twist
    twist_batch: int  # prior draws (negatives) and exact draws (positives) per CTL step
    twist_exact: int  # Rejection's exact draws the positives are taken from

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        if quick:
            return cls(6, 16, 2, 128, 0.1, 4, 8, 3, 8, 8)
        return cls(16, 64, 10, 2048, 0.02, 100, 32, 300, 64, 512)


def load_prior(quick: bool, new_tokens: int) -> CausalLM:
    base = tiny_causal_lm(seed=0, initializer_range=0.3) if quick else \
        CausalLM.from_pretrained("bundled:code-small")
    return CausalLM(base.model, base.tokenizer, max_new_tokens=new_tokens)


def banned_tokens(prior: CausalLM, sizes: Sizes) -> tuple[list[int], float]:
    """The most frequent tokens of a pilot batch (by how many samples hold them), greedily,
    until at most ``sizes.acceptance`` of the pilot is non-empty and avoids them all; and that
    fraction."""
    pilot = prior.sample_batch(sizes.pilot)
    holds = torch.zeros(len(pilot), prior.vocab_size, dtype=torch.bool)
    rows = torch.arange(len(pilot))[:, None].expand_as(pilot.tokens)
    holds[rows[pilot.mask], pilot.tokens[pilot.mask]] = True
    holds[:, prior.eos_token_id] = False  # EOS stays allowed: a sample may always end
    banned, clean = [], non_empty(pilot, prior.eos_token_id)
    while clean.float().mean() > sizes.acceptance:
        token = int((holds & clean[:, None]).sum(0).argmax())
        banned.append(token)
        clean &= ~holds[:, token]
    return banned, float(clean.float().mean())


def non_empty(s: ba.Sequences, eos_token_id: int) -> torch.Tensor:
    """Rows holding a token other than EOS (a non-empty sample does not start with EOS)."""
    return s.mask[:, 0] & (s.tokens[:, 0] != eos_token_id)


def constrained_target(prior: CausalLM, banned: list[int]) -> ba.Target:
    banned_ids = torch.tensor(banned)

    def allowed(s: ba.Sequences) -> torch.Tensor:
        return ~(torch.isin(s.tokens, banned_ids) & s.mask).any(-1)

    @ba.target
    def no_banned_tokens():
        y = pyro.sample("y", prior)
        ba.constraint("non_empty", non_empty(y, prior.eos_token_id))
        ba.prefix_constraint("no_banned", y, allowed)

    return no_banned_tokens


def rare_target(prior: CausalLM, sizes: Sizes) -> tuple[ba.Target, list[int], float]:
    """The experiment's target, its banned tokens and the pilot's acceptance, from a pilot drawn
    under seed 0 (the caller's RNG state is left as it was): what policy_brackets reuses."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        banned, pilot_acceptance = banned_tokens(prior, sizes)
    return constrained_target(prior, banned), banned, pilot_acceptance


def _runs(method, runs: int) -> tuple[list[float], list[float]]:
    """log Ẑ and ESS of ``runs`` seeded runs; a run with every weight at zero is Ẑ = 0, ESS 0."""
    log_z, ess = [], []
    for seed in range(runs):
        try:
            z, e = method(seed)
        except EmptySupportError:
            z, e = -math.inf, 0.0
        log_z.append(z)
        ess.append(e)
    return log_z, ess


def _summary(name: str, log_z: list[float], ess: list[float], tokens: int) -> dict:
    """Mean log Ẑ over runs, and log of the mean Ẑ (the unbiased estimate) with its se."""
    z = torch.tensor(log_z, dtype=torch.float64).exp()
    mean = float(z.mean())
    se = float(z.std() / math.sqrt(len(z))) if len(z) > 1 else math.nan
    return {"method": name, "log_z_hat": math.log(mean) if mean > 0 else -math.inf,
            "log_z_hat_se": se / mean if mean > 0 else math.nan,
            "zero_runs": int((z == 0).sum()), "ess": sum(ess) / len(ess),
            "ess_per_1k_tokens": 1000 * sum(ess) / len(ess) / tokens, "tokens": tokens}


def learned_twists(target: ba.Target, prior: CausalLM, sizes: Sizes) -> tuple[dict, int]:
    """The two CTL-trained next-token twists (alone; on top of the prefix twist) and the LM
    forward tokens their training cost: the exact draws' proposals, and per step the negatives'
    draw plus one pass over negatives and positives."""
    exact = Rejection(num_samples=sizes.twist_exact, max_proposals=10_000 * sizes.twist_exact,
                      seed=50_000).fit(target)
    twists = {}
    for name, prefix_factors in (("alone", False), ("with prefix twist", True)):
        twists[name] = TwistLearning(
            steps=sizes.twist_steps, batch_size=sizes.twist_batch, exact_samples=exact.samples,
            prefix_factors=prefix_factors, twist=NextTokenTwist(prior), seed=1, progress=False,
        ).fit(target)
    proposals = exact.diagnostics.num_proposed
    tokens = sizes.new_tokens * (proposals + 2 * 3 * sizes.twist_steps * sizes.twist_batch)
    return twists, tokens


def run(output: Path, quick: bool) -> str:
    output.mkdir(parents=True, exist_ok=True)
    sizes = Sizes.for_mode(quick)
    prior = load_prior(quick, sizes.new_tokens)
    n, tokens = sizes.particles, sizes.particles * sizes.new_tokens
    target, banned, pilot_acceptance = rare_target(prior, sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = Importance(num_samples=sizes.reference_factor * sizes.runs * n,
                               seed=10_000).fit(target).diagnostics
        twists, twist_tokens = learned_twists(target, prior, sizes)
        results = {"quick": quick, "sizes": asdict(sizes), "banned": banned,
                   "pilot_acceptance": pilot_acceptance, "reference_log_z": reference.log_z,
                   "reference_log_z_se": reference.log_z_se, "twist_training_tokens": twist_tokens,
                   "rows": []}

        def smc(**options):
            def method(seed: int) -> tuple[float, float]:
                d = SMC(num_particles=n, seed=seed, **options).fit(target).diagnostics
                return d.log_z, d.ess
            return method

        def importance(seed: int) -> tuple[float, float]:
            d = Importance(num_samples=n, seed=seed).fit(target).diagnostics
            return d.log_z, d.ess

        def rejection(seed: int) -> tuple[float, float]:
            post = Rejection(num_samples=n, max_proposals=n, chunk_size=n, seed=seed).fit(target)
            return math.log(post.diagnostics.acceptance_rate), float(len(post.samples))

        alone, on_prefix = twists["alone"], twists["with prefix twist"]
        methods = {"Importance (prior)": importance, "Rejection": rejection,
                   "SMC, no twist": smc(prefix_factors=False),
                   "SMC, learned twist": smc(twist=alone, prefix_factors=False),
                   "SMC, learned twist, twisted proposal": smc(twist=alone, prefix_factors=False,
                                                               proposal="twisted"),
                   "SMC, prefix twist": smc(),
                   "SMC, prefix twist, twisted proposal": smc(proposal="twisted"),
                   "SMC, prefix + learned twist": smc(twist=on_prefix),
                   "SMC, prefix + learned twist, twisted proposal": smc(twist=on_prefix,
                                                                        proposal="twisted")}
        for name, method in methods.items():
            results["rows"].append(_summary(name, *_runs(method, sizes.runs), tokens))
            write_results(output, "smc_code", False, results)  # a stopped run keeps its rows
        exact = Rejection(num_samples=sizes.exact, max_proposals=10_000 * sizes.exact,
                          seed=20_000).fit(target).samples
        for key, method, engine in (("bounds_iwae", "iwae", None),
                                    ("bounds_smc", "smc", None),
                                    ("bounds_learned", "smc", SMC(twist=alone, prefix_factors=False,
                                                                  proposal="twisted"))):
            bounds = log_z_bounds(target, num_samples=n, num_runs=sizes.runs,
                                  exact_samples=exact, method=method, smc=engine)
            results[key] = {"lower": bounds.log_z_lower, "upper": bounds.log_z_upper,
                            "gap": bounds.gap}
    return publish(output, "smc_code", results, True, render, _plot)[1]


def render(results: dict) -> str:
    """The Markdown table of a results.json's contents."""
    sizes = results["sizes"]
    lines = ["| method | ESS / 1000 forward tokens | log Ẑ (mean Ẑ over runs) ± se | runs at Ẑ = 0 |",
             "|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['method']} | {r['ess_per_1k_tokens']:.3g} | "
                     f"{r['log_z_hat']:.3f} ± {r['log_z_hat_se']:.3f} | {r['zero_runs']} |")
    title = ("## SMC on a rare constraint (" + ("tiny random GPT-2, quick" if results["quick"]
                                                else "bundled:code-small")
             + f", {sizes['new_tokens']} tokens, N = {sizes['particles']}, "
             f"{sizes['runs']} runs per method)")
    notes = [
        f"Banned tokens: {len(results['banned'])} (pilot acceptance "
        f"{results['pilot_acceptance']:.3f}). Reference log Z (Importance, "
        f"{sizes['reference_factor']}× all runs' samples): {results['reference_log_z']:.3f} ± "
        f"{results['reference_log_z_se']:.3f}."]
    notes.append(f"Learned twists: {sizes['twist_steps']} CTL steps × {sizes['twist_batch']} draws "
                 f"each, {results['twist_training_tokens']:,} forward tokens of training and "
                 "exact draws in all (paid once; each run above costs the tokens in its row).")
    for key, name in (("bounds_iwae", "IWAE, prior"), ("bounds_smc", "SMC / conditional SMC, "
                      "prefix twist"), ("bounds_learned", "twisted SMC / conditional SMC, "
                                        "learned twist")):
        b = results[key]
        notes.append(f"Bounds on log Z ({name}, K = {sizes['particles']}): [{b['lower']:.3f}, "
                     f"{b['upper']:.3f}], gap {b['gap']:.3f}.")
    return "\n".join([title, "", *lines, "", *"\n\n".join(notes).splitlines()])


def _plot(results: dict, path: Path) -> None:
    from bayesalign.app import plots

    fig, (ess_ax, z_ax) = plots.figure(2)
    rows, ticks = results["rows"], range(len(results["rows"]))
    labels = [r["method"] for r in rows]
    ess_ax.bar(ticks, [r["ess_per_1k_tokens"] for r in rows], color="tab:blue")
    ess_ax.set_ylabel("ESS per 1000 forward tokens")
    finite = [math.isfinite(r["log_z_hat"]) for r in rows]
    z_ax.errorbar([i for i, f in zip(ticks, finite) if f],
                  [r["log_z_hat"] for r, f in zip(rows, finite) if f],
                  yerr=[r["log_z_hat_se"] for r, f in zip(rows, finite) if f], fmt="o", capsize=3)
    z_ax.axhline(results["reference_log_z"], color="tab:red", linewidth=0.8,
                 label="reference log Z (Importance)")
    for key, colour, label in (("bounds_smc", "tab:gray", "SMC bounds, prefix twist"),
                               ("bounds_learned", "tab:green",
                                "SMC bounds, learned twist, twisted proposal")):
        bounds = results[key]
        if math.isfinite(bounds["lower"]) and math.isfinite(bounds["upper"]):
            z_ax.axhspan(bounds["lower"], bounds["upper"], color=colour, alpha=0.2, label=label)
    z_ax.set_ylabel("log Ẑ (mean Ẑ over runs) ± se")
    z_ax.legend(fontsize=7)
    for ax in (ess_ax, z_ax):
        ax.set_xticks(ticks, labels, rotation=30, ha="right", fontsize=7)
    plots.save(fig, path)


def main(argv: list[str] | None = None) -> int:
    return experiment_main(run, __doc__.splitlines()[0], "outputs/smc_code", argv)


if __name__ == "__main__":
    raise SystemExit(main())
