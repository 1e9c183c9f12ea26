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
checks included; the final-diagnostics draws of each ``fit`` excluded).

Goal (#11): KL(p‖π) ≤ 0.1·KL(p‖a) within 20,000 samples with the default options.

``python -m experiments.real_lm_convergence [--quick] [--targets return,pep8] [--engines DPG,RLOO]
[--budget 20000] [--engine-options '{"*": {...}, "RLOO": {...}}']``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pyro
import torch

import bayesalign as ba
from bayesalign import diagnostics as dx
from bayesalign.errors import ConfigError, EmptySupportError, TrainingError
from bayesalign.inference import DPG, KLRL, exact_reference
from bayesalign.models import CausalLM, scorers
from bayesalign.models.adaptors import BanTokens
from bayesalign.reference import Reference, distances
from bayesalign.seeding import seeded

from .results import read_results, write_results, write_text_atomic

EXPERIMENT = "real_lm_convergence"
GOAL_FRACTION = 0.1  # the goal: KL(p‖π) ≤ 0.1·KL(p‖a)
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


# -- one evaluation point ----------------------------------------------------------------------


def measure(target: ba.Target, spec: TargetSpec, policy: CausalLM, reference: Reference,
            eval_samples: int, seed: int) -> dict[str, Any]:
    """The yardstick's KL(p‖π) and TVD ± se, and from ``eval_samples`` fresh policy draws:
    KL(π‖a) ± se, the on-policy SNIS estimate of KL(p‖π), the reward or constraint rate, and
    what the draws are made of (distinct, empty, length, a few texts)."""
    with torch.no_grad():
        log_pi_pool = policy.log_prob(reference.samples)
        yard = distances(reference, log_pi_pool)
        with seeded(seed):
            draws = policy.sample_batch(eval_samples)
        log_pi = draws.log_q.double()
        log_prior = target.prior().log_prob(draws).double()
        log_score = target.log_score(draws, log_prior=log_prior)
    ratio = log_pi - log_prior
    value = site_value(target, spec, draws)
    texts = draws.text
    return {
        "kl_target_policy": yard.kl_target_policy, "kl_target_policy_se": yard.kl_target_policy_se,
        "tvd": yard.tvd, "tvd_se": yard.tvd_se,
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


def run_engine(name: str, target: ba.Target, spec: TargetSpec, prior: CausalLM,
               reference: Reference, sizes: Sizes, options: dict[str, Any], workdir: Path,
               seed: int, on_point: Callable[[Curve], None]) -> Curve:
    """Train ``name`` in segments up to ``sizes.budget`` drawn samples, measuring between them."""
    cls, _ = ENGINES[name]
    curve = Curve(name, options)
    policy = prior.trainable_copy()
    checkpoints = workdir / "checkpoints"
    shutil.rmtree(checkpoints, ignore_errors=True)
    per_step, multiple = segment_sizes(cls, options)
    drawn, steps = 0, 0
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
                    engine.fit(target)
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
                 **measure(target, spec, policy, reference, sizes.eval_samples, seed + 1)}
        curve.points.append(point)
        on_point(curve)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return curve


# -- the experiment ------------------------------------------------------------------------------


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

    def save(finished: bool) -> dict[str, Any]:
        return publish(output, results, finished)

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
    return render(save(True))


def publish(output: Path, results: dict[str, Any], finished: bool) -> dict[str, Any]:
    """results.json (atomically), its Markdown table and its PNG, after every evaluation point,
    so a run that is stopped leaves all three."""
    saved = write_results(output, EXPERIMENT, finished, results)
    write_text_atomic(output / f"{EXPERIMENT}.md", render(saved) + "\n")
    plot(saved, output / f"{EXPERIMENT}.png")
    return saved


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
    return render(publish(output, merged, all(r["finished"] for r in runs)))


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
            f"0.1·KL(p‖a) | KL(π‖a) | on-policy KL(p‖π) | {what} (Rejection {ref['value']:.4g}) "
            "| distinct / empty | samples/s | divergence warnings |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for engine, curve in entry["curves"].items():
            s, last = summary(entry, curve), curve["points"][-1]
            reached = "not reached" if s["reached"] is None else f"{s['reached']}"
            stopped = " (stopped)" if curve["stopped"] else ""
            diverged = sum(": DivergenceWarning:" in w for w in curve["warnings"])
            parts.append(
                f"| {engine}{stopped} | {s['samples']} | {s['kl']:.3f} ± {s['kl_se']:.3f} | "
                f"{s['fraction']:.0%} | {reached} | {last['kl_policy_prior']:.3f} | "
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
