"""Preference-model objectives and PMP (SPEC §7, Askell et al. 2021) on a PEP8 preference.

Pairwise accuracy on held-out comparisons against the number of training comparisons, for the
ranked (Bradley–Terry), binary-discrimination and imitation-learning objectives, each trained
from scratch or after preference-model pretraining (PMP). The corpus is Python's standard
library: fine-tuning and test comparisons are pairs of stdlib snippets (whole top-level or
class-level statements), the one with fewer PEP8 violations per character preferred
(`scorers.pep8`); the PMP set is large, automatically built and noisy: pairs of single stdlib
lines from other files, 10% of labels flipped. The backbone is the tiny random GPT-2 of
`models.tiny`: the study compares objectives, not model scale.

``python -m experiments.preference_models [--quick] [--output DIR]``. Quick mode (one seed,
16 and 64 comparisons, few steps) takes 10–20 s on two shared CPU cores; full mode (three
seeds, 32, 128 and 512 comparisons) took 9 minutes there (549 s at load average 4).
"""

from __future__ import annotations

import ast
import random
import statistics
import textwrap
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bayesalign.models import scorers
from bayesalign.models.comparisons import Comparisons, build_comparisons
from bayesalign.models.preference import (
    PreferenceModel,
    pairwise_accuracy,
    train_preference_model,
)
from bayesalign.models.tiny import stdlib_texts, stdlib_tokenizer, tiny_gpt2

from .cli import experiment_main
from .results import publish

OBJECTIVES = ("ranked", "binary", "imitation")
# Rows of the table: imitation is one trained model compared by two normalisations.
ROWS = ("ranked", "binary", "imitation (total)", "imitation (per-token)")
PMP_LABEL_NOISE = 0.1
CORPUS_BYTES = 4_000_000  # of stdlib source: ~230 files, ~1700 fine-tuning snippets, 15% not clean


@dataclass(frozen=True)
class Settings:
    """One run's sizes; every stage uses AdamW at ``learning_rate`` on ``batch_size`` pairs."""

    sizes: tuple[int, ...]  # numbers of fine-tuning comparisons (nested subsets of one draw)
    finetune_steps: int  # optimizer steps on the small set, whatever its size
    pretrain_pairs: int  # comparisons in the PMP set
    pretrain_steps: int  # optimizer steps of PMP
    test_pairs: int  # held-out comparisons (from files used nowhere else)
    seeds: tuple[int, ...]  # each seed redraws the training comparisons and the initial weights
    batch_size: int = 16
    learning_rate: float = 1e-3
    max_chars: int = 240  # longest snippet (~100 tokens of the tiny tokenizer)


QUICK = Settings(sizes=(16, 64), finetune_steps=8, pretrain_pairs=512, pretrain_steps=16,
                 test_pairs=64, seeds=(0,))
FULL = Settings(sizes=(32, 128, 512), finetune_steps=120, pretrain_pairs=8192, pretrain_steps=400,
                test_pairs=512, seeds=(0, 1, 2))


def code_snippets(files: Iterable[str], min_chars: int = 40, max_chars: int = 240) -> list[str]:
    """Whole top-level and class-level statements (with decorators), dedented: valid code,
    so PEP8 counts reflect style rather than where a chunk was cut."""
    snippets = []
    for source in files:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines = source.splitlines(keepends=True)
        nodes = tree.body + [n for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body]
        for node in nodes:
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            snippet = textwrap.dedent("".join(lines[start - 1:node.end_lineno]))
            if min_chars <= len(snippet) <= max_chars:
                snippets.append(snippet)
    return snippets


def code_lines(files: Iterable[str], min_chars: int = 8) -> list[str]:
    """Single non-blank, non-comment source lines without their indentation (trailing kept)."""
    lines = (line.lstrip(" \t") for source in files for line in source.splitlines(keepends=True))
    return [line for line in lines if len(line.strip()) >= min_chars and not line.startswith("#")]


@dataclass
class Data:
    test: Comparisons
    finetune: list[Comparisons]  # one nested draw per seed, of max(sizes) pairs
    pretrain: list[Comparisons]  # one per seed
    shorter_wins: float  # test accuracy of "prefer the shorter snippet", a baseline


def build_data(settings: Settings, score_fn: Callable) -> Data:
    """Split stdlib files three ways (test snippets, fine-tuning snippets, PMP lines)."""
    files = stdlib_texts(CORPUS_BYTES)
    test_snippets = code_snippets(files[0::5], max_chars=settings.max_chars)
    finetune_snippets = code_snippets(files[1::5] + files[2::5], max_chars=settings.max_chars)
    lines = code_lines(files[3::5] + files[4::5])
    # Four lines per PMP pair leave plenty of untied pairs and keep scoring short.
    lines = random.Random(0).sample(lines, min(len(lines), 4 * settings.pretrain_pairs))
    test = build_comparisons(test_snippets, score_fn, settings.test_pairs, seed=10_000)
    longer = torch.tensor([len(c) < len(r) for c, r in zip(test.chosen, test.rejected)])
    ties = torch.tensor([len(c) == len(r) for c, r in zip(test.chosen, test.rejected)])
    return Data(
        test=test,
        finetune=[build_comparisons(finetune_snippets, score_fn, max(settings.sizes), seed=s)
                  for s in settings.seeds],
        pretrain=[build_comparisons(lines, score_fn, settings.pretrain_pairs,
                                    label_noise=PMP_LABEL_NOISE, seed=s) for s in settings.seeds],
        shorter_wins=float(longer.double().mean() + 0.5 * ties.double().mean()),
    )


def accuracies(model: PreferenceModel, objective: str, test: Comparisons) -> dict[str, float]:
    """Held-out pairwise accuracy per table row (imitation: total and per-token log-likelihood)."""
    if objective != "imitation":
        return {objective: pairwise_accuracy(model, test)}
    model.scoring = "log_likelihood"
    result = {}
    for normalise, row in (("total", "imitation (total)"), ("per_token", "imitation (per-token)")):
        model.normalise = normalise
        result[row] = pairwise_accuracy(model, test)
    return result


def run_seed(settings: Settings, data: Data, seed: int, index: int) -> dict[tuple[str, bool, int], float]:
    """Accuracy per (row, PMP, number of comparisons) for one seed; 0 comparisons = before fine-tuning."""
    tokenizer = stdlib_tokenizer()
    train = {"batch_size": settings.batch_size, "learning_rate": settings.learning_rate, "seed": seed}
    results = {}
    for objective in OBJECTIVES:
        initial = PreferenceModel(tiny_gpt2(tokenizer, seed=seed), tokenizer, seed=seed)
        pretrained, _ = train_preference_model(initial.clone(), data.pretrain[index], objective,
                                               steps=settings.pretrain_steps, **train)
        for with_pmp, start in ((False, initial), (True, pretrained)):
            for row, value in accuracies(start, objective, data.test).items():
                results[row, with_pmp, 0] = value
            for n in settings.sizes:
                model, _ = train_preference_model(start.clone(), data.finetune[index][:n], objective,
                                                  steps=settings.finetune_steps, **train)
                for row, value in accuracies(model, objective, data.test).items():
                    results[row, with_pmp, n] = value
    return results


def run(output: Path, quick: bool, score_fn: Callable | None = None) -> str:
    torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation on shared cores
    started = time.perf_counter()
    settings = QUICK if quick else FULL
    output.mkdir(parents=True, exist_ok=True)
    data = build_data(settings, score_fn or scorers.pep8)
    per_seed = [run_seed(settings, data, seed, i) for i, seed in enumerate(settings.seeds)]
    columns = (0, *settings.sizes)
    summary = {key: [r[key] for r in per_seed] for key in per_seed[0]}
    seconds = time.perf_counter() - started
    return publish(output, "preference_models", {
        "quick": quick, "settings": asdict(settings), "seconds": seconds,
        "test_pairs": len(data.test), "pmp_label_noise": PMP_LABEL_NOISE,
        "shorter_wins": data.shorter_wins,
        "accuracy": [{"objective": row, "pmp": with_pmp, "comparisons": n,
                      "per_seed": summary[row, with_pmp, n]}
                     for row in ROWS for with_pmp in (False, True) for n in columns]},
        True, render, _plot)[1]


def render(results: dict) -> str:
    """The Markdown table of a results.json's contents."""
    settings = results["settings"]
    accuracy = _per_seed(results)
    rows = list(dict.fromkeys(a["objective"] for a in results["accuracy"]))
    columns = list(dict.fromkeys(a["comparisons"] for a in results["accuracy"]))
    seeds = len(settings["seeds"])
    lines = [
        f"## Preference models: held-out pairwise accuracy ({results['test_pairs']} stdlib "
        "snippet pairs)",
        "",
        "Preference: fewer PEP8 violations per character (pycodestyle). Backbone: a *tiny, randomly "
        "initialised* GPT-2 (2 layers × 64 dims, 512-token BPE); a real PM starts from a pretrained "
        "LM, so absolute accuracies here say little; the comparison of objectives is the point. "
        f"PMP: {settings['pretrain_steps']} steps on {settings['pretrain_pairs']} single-line "
        f"comparisons from other files with {results['pmp_label_noise']:.0%} of labels flipped. "
        f"Fine-tuning: {settings['finetune_steps']} steps of {settings['batch_size']} pairs "
        "whatever the set size; column 0 is before fine-tuning. "
        + (f"Mean ± sd over {seeds} seeds. " if seeds > 1 else "One seed. ")
        + f"Baseline \"the shorter snippet wins\": {results['shorter_wins']:.3f}.",
        "",
        "| objective | PMP | " + " | ".join(str(n) for n in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for row in rows:
        for with_pmp in (False, True):
            cells = [_cell(accuracy[row, with_pmp, n]) for n in columns]
            lines.append(f"| {row} | {'yes' if with_pmp else 'no'} | " + " | ".join(cells) + " |")
    lines += ["", f"Runtime: {results['seconds']:.0f} s ({'quick' if results['quick'] else 'full'}"
              " mode, CPU, one thread)."]
    return "\n".join(lines)


def _per_seed(results: dict) -> dict[tuple[str, bool, int], list[float]]:
    """The accuracies per seed, keyed by (objective, PMP, comparisons) as `run_seed` keys them."""
    return {(a["objective"], a["pmp"], a["comparisons"]): a["per_seed"]
            for a in results["accuracy"]}


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _plot(results: dict, path: Path) -> None:
    from bayesalign.app import plots

    per_seed = _per_seed(results)
    sizes = results["settings"]["sizes"]
    fig, (ax,) = plots.figure(1, width=6.0, height=4.2)
    for k, row in enumerate(ROWS):
        for with_pmp in (False, True):
            values = [per_seed[row, with_pmp, n] for n in sizes]
            means = [statistics.mean(v) for v in values]
            errors = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            ax.errorbar(sizes, means, yerr=errors, color=f"C{k}", marker="o", capsize=3,
                        linestyle="-" if with_pmp else "--",
                        label=f"{row}, {'PMP' if with_pmp else 'no PMP'}")
    ax.axhline(0.5, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("training comparisons")
    ax.set_ylabel("held-out pairwise accuracy")
    ax.set_title("PM objectives on a PEP8 preference (tiny random GPT-2)", fontsize=10)
    ax.legend(fontsize=6.5, ncol=2)
    plots.save(fig, path)


def main(argv: list[str] | None = None) -> int:
    return experiment_main(run, __doc__.splitlines()[0], "outputs/preference_models", argv)


if __name__ == "__main__":
    raise SystemExit(main())
