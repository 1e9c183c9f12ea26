"""Real-LM convergence: KL(p‖π) of each policy engine against samples drawn, by the yardstick.

On ``bundled:code-small`` (issue #11) each target p ∝ a·L has a known bound (a hard constraint,
or the PEP8 reward r ≤ 0), so one pool of exact target draws (`exact_reference`, built ONCE per
target) measures every engine at every evaluation point (SPEC §12):
KL(p‖π) ≈ mean(log P − log π) − log Ẑ ± se, which sees the target mass a collapsed policy
misses (its own on-policy estimate, recorded beside it, cannot). Targets:

- ``return``: a·1["return" in the text] (prior rate ≈ 8%), 32 tokens, EOS allowed;
- ``pep8``: a·exp(pep8/0.01), 64 tokens, EOS banned as in `pep8_frontier`;
- ``none``: a·1["None" in the text] (prior rate ≈ 7%), untuned: a check of the defaults.

Engines (``ENGINES``): DPG with its defaults and with ``BEST_DPG_OPTIONS``, off-policy DPG,
KLRL RLOO, KLRL PPO, each trained in segments: ``fit`` with ``steps`` raised each time and one
``checkpoint_dir``, so each segment resumes the last (weights, optimizer, RNG, engine state) and
the run is the one a single ``fit`` would make; the policy is evaluated between segments.
"Samples drawn" counts every ``sample_batch`` row the engine drew while training (proposal
checks included; the final-diagnostics draws of each ``fit`` excluded). The targets, engines,
sizes and segments are defined in real_lm_runs.py; this module runs them, saves and reports.

Goal (#11): KL(p‖π) ≤ 0.1·KL(p‖a) within 20,000 samples with the default options.

``python -m experiments.real_lm_convergence [--quick] [--targets return,pep8] [--engines DPG,RLOO]
[--budget 20000] [--engine-options '{"*": {...}, "RLOO": {...}}']``
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from bayesalign.errors import ConfigError
from bayesalign.inference import exact_reference

from .real_lm_runs import (
    ENGINES,
    PEP8_KL_COEF,
    TARGETS,
    Curve,
    Sizes,
    engine_options,
    load_prior,
    make_target,
    reference_row,
    run_engine,
)
from .real_lm_runs import segment_sizes as segment_sizes  # re-exported: the tests size segments here
from .results import publish, read_results

EXPERIMENT = "real_lm_convergence"
GOAL_FRACTION = 0.1  # the goal: KL(p‖π) ≤ 0.1·KL(p‖a)


# -- the experiment ------------------------------------------------------------------------------


def run(output: Path, quick: bool, *, sizes: Sizes | None = None,
        overrides: dict[str, dict[str, Any]] | None = None, seed: int = 0) -> str:
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    sizes = sizes or Sizes.for_mode(quick)
    overrides = overrides or {}
    unknown = set(overrides) - {"*", *ENGINES}
    if unknown:
        raise ConfigError(f"--engine-options names unknown engines {sorted(unknown)}; "
                          f"known: {sorted(ENGINES)} (or '*' for all)")
    results: dict[str, Any] = {"quick": quick, "sizes": asdict(sizes), "seed": seed,
                               "overrides": overrides, "targets": {}}

    def save(finished: bool) -> str:
        # After every evaluation point, so a run that is stopped leaves the JSON, table and PNG.
        return publish(output, EXPERIMENT, results, finished, render, plot, plot_partial=True)[1]

    for target_name in sizes.targets:
        spec = TARGETS[target_name]
        if sizes.new_tokens is not None:
            spec = replace(spec, new_tokens=sizes.new_tokens)
        prior = load_prior(spec)
        target = make_target(spec, prior)
        started = time.perf_counter()
        reference = exact_reference(target, bound=1.0, num_samples=sizes.reference_samples,
                                    chunk_size=1024, max_proposals=400 * sizes.reference_samples,
                                    seed=seed)
        entry = {"spec": asdict(spec), "reference": reference_row(target, spec, prior, reference),
                 "reference_seconds": time.perf_counter() - started, "curves": {}}
        results["targets"][target_name] = entry
        save(False)
        for name in sizes.engines:
            options = engine_options(name, overrides)

            def on_point(curve: Curve, entry=entry) -> None:
                entry["curves"][curve.engine] = asdict(curve)
                save(False)

            run_engine(name, target, spec, prior, reference, sizes, options,
                       output / target_name / name.replace(" ", "_"), seed, on_point)
    return save(True)


def merge(folders: list[Path], output: Path) -> str:
    """One results.json, table and PNG from runs of other engines (or targets) in parallel,
    e.g. one process per engine: each target's curves side by side, measured by the first
    run's yardstick (the runs must share sizes and seed, hence the same seeded pool)."""
    runs = [read_results(folder) for folder in folders]
    first = runs[0]
    keys = ("quick", "seed")
    for folder, other in zip(folders[1:], runs[1:]):
        same = {k: other[k] == first[k] for k in keys}
        same["yardstick"] = all(
            entry["reference"]["log_z"] == first["targets"][name]["reference"]["log_z"]
            for name, entry in other["targets"].items() if name in first["targets"])
        if not all(same.values()):
            raise ConfigError(f"{folder} differs from {folders[0]} in "
                              f"{[k for k, v in same.items() if not v]}: merge only runs of "
                              "one seed, mode and yardstick")
    merged = {**{k: first[k] for k in (*keys, "sizes", "overrides")}, "targets": {},
              "merged_from": [str(f) for f in folders]}
    for run_ in runs:
        for name, entry in run_["targets"].items():
            into = merged["targets"].setdefault(name, {**entry, "curves": {}})
            into["curves"].update(entry["curves"])
    Path(output).mkdir(parents=True, exist_ok=True)
    return publish(output, EXPERIMENT, merged, all(r["finished"] for r in runs), render, plot,
                   plot_partial=True)[1]


# -- reporting -----------------------------------------------------------------------------------


def summary(entry: dict[str, Any], curve: dict[str, Any]) -> dict[str, Any]:
    """What the table shows for one engine: final KL(p‖π) ± se, the fraction of the way from
    the prior, and the first samples-drawn count at which KL(p‖π) ≤ 0.1·KL(p‖a)."""
    prior_kl = entry["reference"]["kl_target_prior"]
    last = curve["points"][-1]
    reached = next((p["samples"] for p in curve["points"]
                    if p["kl_target_policy"] <= GOAL_FRACTION * prior_kl), None)
    seconds = last["train_seconds"]
    return {"kl": last["kl_target_policy"], "kl_se": last["kl_target_policy_se"],
            "fraction": 1 - last["kl_target_policy"] / prior_kl, "reached": reached,
            "samples": last["samples"],
            "samples_per_s": last["samples"] / seconds if seconds > 0 else math.nan}


def render(results: dict[str, Any]) -> str:
    """The Markdown tables of a results.json's contents (one per target)."""
    sizes = results["sizes"]
    parts = [f"## Real-LM convergence (bundled:code-small{', quick' if results['quick'] else ''}; "
             f"budget {sizes['budget']} samples drawn per engine, yardstick of "
             f"{sizes['reference_samples']} exact target draws)"]
    if not results["finished"]:
        parts.append("\n*(partial: the run is still going or was stopped)*")
    for name, entry in results["targets"].items():
        spec, ref = entry["spec"], entry["reference"]
        what = "constraint rate" if spec["kind"] == "constraint" else "E r (pep8)"
        goal = GOAL_FRACTION * ref["kl_target_prior"]
        parts += [
            "",
            f"### `{name}`: {_describe(spec)}; KL(p‖a) = {ref['kl_target_prior']:.3f} ± "
            f"{ref['kl_target_prior_se']:.3f} (goal KL(p‖π) ≤ {goal:.3f}); Rejection's "
            f"{what} {ref['value']:.4g} ({ref['method']})",
            "",
            f"| engine | samples drawn | KL(p‖π) ± se | fraction of the way | samples to reach "
            f"0.1·KL(p‖a) | KL(π‖a) | KL(π_S‖p) ± se (π off S) | on-policy KL(p‖π) | {what} "
            f"(Rejection {ref['value']:.4g}) | distinct / empty | samples/s | divergence warnings |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for engine, curve in entry["curves"].items():
            s, last = summary(entry, curve), curve["points"][-1]
            reached = "not reached" if s["reached"] is None else f"{s['reached']}"
            stopped = " (stopped)" if curve["stopped"] else ""
            diverged = sum(": DivergenceWarning:" in w for w in curve["warnings"])
            parts.append(
                f"| {engine}{stopped} | {s['samples']} | {s['kl']:.3f} ± {s['kl_se']:.3f} | "
                f"{s['fraction']:.0%} | {reached} | {last['kl_policy_prior']:.3f} | "
                f"{_reverse(last)} | "
                f"{last['on_policy_kl_target_policy']:.3f} | {last['value']:.4g} | "
                f"{last['distinct_fraction']:.2f} / {last['empty_fraction']:.2f} | "
                f"{s['samples_per_s']:.1f} | {diverged} |")
        # What the samples are made of (a win must be read from them): the last point's first
        # draws, and the exact posterior's.
        parts.append("")
        for engine, examples in [("Rejection", ref["examples"]),
                                 *[(e, c["points"][-1]["examples"])
                                   for e, c in entry["curves"].items()]]:
            shown = " · ".join(f"`{json.dumps(t[:60], ensure_ascii=False)}`" for t in examples)
            parts.append(f"- {engine}: {shown}")
    return "\n".join(parts)


def _reverse(point: dict[str, Any]) -> str:
    """KL(π_S‖p) ± se and π's mass off p's support S (— when no draw lay in S)."""
    if point["kl_policy_target_in_support"] is None:
        return f"— ({point['outside_support']:.0%})"
    return (f"{point['kl_policy_target_in_support']:.3f} ± "
            f"{point['kl_policy_target_in_support_se']:.3f} ({point['outside_support']:.0%})")


def _describe(spec: dict[str, Any]) -> str:
    eos = "EOS banned" if spec["ban_eos"] else "EOS allowed"
    if spec["kind"] == "constraint":
        return f"a·1[\"{spec['word']}\" in text], {spec['new_tokens']} tokens, {eos}"
    return f"a·exp(pep8/{PEP8_KL_COEF:g}), {spec['new_tokens']} tokens, {eos}"


def plot(results: dict[str, Any], path: Path) -> Path:
    """KL(p‖π) ± se against samples drawn, one panel per target and one curve per engine, with
    KL(p‖a) (where every engine starts) and the goal 0.1·KL(p‖a) as dashed lines."""
    from bayesalign.app import plots

    targets = results["targets"]
    fig, axes = plots.figure(max(1, len(targets)), width=5.0, height=3.8)
    for ax, (name, entry) in zip(axes, targets.items()):
        prior_kl = entry["reference"]["kl_target_prior"]
        for engine, curve in entry["curves"].items():
            xs = [p["samples"] for p in curve["points"]]
            ys = [p["kl_target_policy"] for p in curve["points"]]
            se = [p["kl_target_policy_se"] for p in curve["points"]]
            (line,) = ax.plot(xs, ys, ".-", label=engine)
            ax.fill_between(xs, [y - e for y, e in zip(ys, se)], [y + e for y, e in zip(ys, se)],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        ax.axhline(prior_kl, color="grey", linestyle="--", linewidth=1, label="KL(p‖a)")
        ax.axhline(GOAL_FRACTION * prior_kl, color="black", linestyle=":", linewidth=1,
                   label="goal 0.1·KL(p‖a)")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_xlabel("samples drawn")
        ax.set_ylabel("KL(p‖π) (exact-sample yardstick)")
        ax.set_title(f"{name}: {_describe(entry['spec'])}", fontsize=8)
        ax.legend(fontsize=7)
    return plots.save(fig, path)


# -- command line --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(f"outputs/{EXPERIMENT}"),
                        help="folder for results.json, the Markdown table and the PNG")
    parser.add_argument("--quick", action="store_true", help="small sizes, as run by the tests")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--targets", help=f"comma-separated, of {sorted(TARGETS)}")
    parser.add_argument("--engines", help=f"comma-separated, of {sorted(ENGINES)}")
    parser.add_argument("--budget", type=int, help="samples drawn per engine")
    parser.add_argument("--eval-every", type=int, help="samples drawn between evaluations")
    parser.add_argument("--reference-samples", type=int, help="exact draws in the yardstick")
    parser.add_argument("--eval-samples", type=int, help="policy draws per evaluation")
    parser.add_argument("--engine-options", type=json.loads, default={},
                        help='JSON {"*": {...}, "ENGINE": {...}}: options over each engine\'s '
                             'own, e.g. \'{"*": {"learning_rate": 1e-5}, "PPO": {"ppo_epochs": 2}}\'')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge", type=Path, nargs="+", metavar="DIR",
                        help="run nothing: merge these runs' results.json into --output")
    args = parser.parse_args(argv)
    if args.merge:
        print(merge(args.merge, args.output))
        return 0
    torch.set_num_threads(args.threads)
    sizes = Sizes.for_mode(args.quick)
    changes = {"targets": _names(args.targets, TARGETS), "engines": _names(args.engines, ENGINES),
               "budget": args.budget, "eval_every": args.eval_every,
               "reference_samples": args.reference_samples, "eval_samples": args.eval_samples}
    sizes = replace(sizes, **{k: v for k, v in changes.items() if v is not None})
    print(run(args.output, args.quick, sizes=sizes, overrides=args.engine_options, seed=args.seed))
    return 0


def _names(given: str | None, known: dict) -> tuple[str, ...] | None:
    if given is None:
        return None
    names = tuple(n.strip() for n in given.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown names {unknown}; known: {sorted(known)}")
    return names


if __name__ == "__main__":
    raise SystemExit(main())
