"""Compare pretrained code priors by what their cards and their samples say: tokens seen,
held-out perplexity, and how many whole samples parse and read as Python over several seeds,
with the held-out loss against tokens seen in a plot (issue #13 item 5).

Each prior is a folder ``bayesalign pretrain`` wrote (its ``card.json`` and weights). The
default compares the bundled prior with nothing else; the README's table compares it with the
first bundled prior, which lives in git history::

    git archive b853533 models/bundled/code-small | tar -x -C /tmp/first
    python -m experiments.priors --priors models/bundled/code-small \
        /tmp/first/models/bundled/code-small

The parse rate is the card's (`whole_sample_report`: 256 samples of at most 64 tokens, a
sample parses when ``ast.parse`` finds a statement in it), drawn under ``--seeds`` seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bayesalign.models import CausalLM
from bayesalign.models.bundled import CODE_SMALL_DIR
from bayesalign.models.pretraining.card import whole_sample_report
from bayesalign.models.tiny import tiny_causal_lm

from .results import publish

EXPERIMENT = "priors"


def measure(folder: Path, seeds: int) -> dict:
    """One prior's card figures and its whole-sample rates under seeds 0 .. ``seeds`` − 1."""
    card = json.loads((folder / "card.json").read_text())
    prior = CausalLM.from_pretrained(str(folder))
    name = f"{folder.name}, {card['steps']:,} steps"
    return _row(name, card, [whole_sample_report(prior, seed) for seed in range(seeds)])


def _row(name: str, card: dict, reports: list[dict]) -> dict:
    parse = [r["parse_fraction"] for r in reports]
    python = [r["python_fraction"] for r in reports]
    return {"prior": name, "steps": card["steps"], "tokens_seen": card["tokens_seen"],
            "heldout_perplexity": card["heldout_perplexity"],
            "heldout_curve": card["heldout_curve"],
            "tokens_per_step": card["tokens_seen"] / card["steps"],
            "safetensors_bytes": card["model"]["safetensors_bytes"],
            "parse_fractions": parse, "parse_mean": statistics.mean(parse),
            "python_mean": statistics.mean(python),
            "whole_samples": reports[0]["num_samples"], "sample_tokens": reports[0]["sample_tokens"]}


def quick_row() -> dict:
    """A tiny random GPT-2 and a made-up card: every path of the report in a second."""
    prior = tiny_causal_lm(seed=0, initializer_range=0.3)
    card = {"steps": 2, "tokens_seen": 64, "heldout_perplexity": 500.0,
            "heldout_curve": [[0, 6.5], [2, 6.2]], "model": {"safetensors_bytes": 1}}
    return _row("tiny random GPT-2", card, [whole_sample_report(prior, s) for s in range(2)])


def run(output: Path, priors: list[Path], seeds: int, quick: bool = False) -> str:
    output.mkdir(parents=True, exist_ok=True)
    rows = [quick_row()] if quick else [measure(folder, seeds) for folder in priors]
    return publish(output, EXPERIMENT, {"quick": quick, "rows": rows}, True, render, _plot)[1]


def render(results: dict) -> str:
    """The Markdown table of a results.json's contents."""
    rows = results["rows"]
    first = rows[0]
    lines = [f"## Code priors ({first['whole_samples']} whole samples of ≤ "
             f"{first['sample_tokens']} tokens per seed)", "",
             "| prior | steps | tokens seen | held-out perplexity | whole samples that parse, "
             "mean (per seed) | read as Python | safetensors |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        per_seed = ", ".join(f"{p:.1%}" for p in r["parse_fractions"])
        lines.append(f"| {r['prior']} | {r['steps']:,} | {r['tokens_seen'] / 1e6:.1f} M | "
                     f"{r['heldout_perplexity']:.1f} | {r['parse_mean']:.1%} ({per_seed}) | "
                     f"{r['python_mean']:.0%} | {r['safetensors_bytes'] / 1e6:.1f} MB |")
    return "\n".join(lines)


def _plot(results: dict, path: Path) -> None:
    from bayesalign.app import plots

    fig, (ax,) = plots.figure(1, width=5.0)
    for r in results["rows"]:
        tokens = [step * r["tokens_per_step"] / 1e6 for step, _ in r["heldout_curve"]]
        ax.plot(tokens, [loss for _, loss in r["heldout_curve"]], marker=".", label=r["prior"])
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_ylim(top=5.5)
    ax.legend(fontsize=7)
    plots.save(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(f"outputs/{EXPERIMENT}"),
                        help="folder for results.json, the Markdown table and the PNG")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny random GPT-2 instead of the priors, as run by the tests")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--priors", type=Path, nargs="+", default=[CODE_SMALL_DIR],
                        metavar="DIR", help="folders bayesalign pretrain wrote (default: the "
                        "bundled prior)")
    parser.add_argument("--seeds", type=int, default=5, help="sampling seeds per prior")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(run(args.output, args.priors, args.seeds, args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
