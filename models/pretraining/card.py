"""What a prior pretrained by ``bayesalign pretrain`` reports about itself: its corpus and split,
held-out loss curve, how many of its unconditional samples parse and read as Python, and the model card
(``MODEL_CARD.md`` for people, ``card.json`` for programs)."""

from __future__ import annotations

import io
import json
import keyword
import math
import shlex
import sys
import tokenize
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bayesalign.seeding import seeded
from bayesalign.sequences import Sequences

from ..causal_lm import CausalLM
from ..corpus_prior import Corpus
from ..corpus_source import split_files
from ..scorers import parsed_module, parses

SAMPLES_IN_CARD = 8  # samples kept in card.json; MODEL_CARD.md shows the first 3
# The yardstick of a prior that writes Python: short samples read whole (as drawn, whether they
# ended with EOS or were cut), not prefixes of long ones.
WHOLE_SAMPLES, WHOLE_SAMPLE_TOKENS = 256, 64


def sample_report(samples: Sequences, eos_token_id: int, sample_tokens: int) -> dict:
    """How many unconditional samples parse, reach EOS, or are empty (and the first few)."""
    texts = samples.text
    ended = samples.tokens.eq(eos_token_id).any(-1)
    return {
        "num_samples": len(texts),
        "sample_tokens": sample_tokens,
        "parse_fraction": float(parses(texts).double().mean()),
        "ended_fraction": float(ended.double().mean()),  # reached EOS within sample_tokens
        "empty_fraction": sum(not t.strip() for t in texts) / len(texts),
        "samples": texts[:SAMPLES_IN_CARD],
    }


def reads_as_python(text: str) -> bool:
    """Whether Python's own tokenizer finds a keyword (``def``, ``return``, ``import``, ...) as
    code, not inside a string or comment, before the text stops being tokenizable."""
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.NAME and keyword.iskeyword(token.string):
                return True
    except (tokenize.TokenError, SyntaxError, ValueError):  # read up to the first bad token
        pass
    return False


def parses_to_code(text: str) -> bool:
    """Whether ``ast.parse`` accepts the text and finds a statement in it: a blank or
    comment-only sample parses but is not code."""
    module = parsed_module(text)
    return module is not None and bool(module.body)


def whole_sample_report(policy: CausalLM, seed: int) -> dict:
    """How many of `WHOLE_SAMPLES` unconditional samples of at most `WHOLE_SAMPLE_TOKENS`
    tokens (fewer where the model's context, after its one-token start, is shorter) parse to
    code and read as Python, drawn with ``seed``."""
    tokens = min(WHOLE_SAMPLE_TOKENS, policy.model.config.n_positions - 1)
    lm = CausalLM(policy.model, policy.tokenizer, max_new_tokens=tokens)
    with seeded(seed):
        samples = lm.sample_batch(WHOLE_SAMPLES)
    texts = samples.text
    parsed = [parses_to_code(t) for t in texts]
    ended = samples.tokens.eq(policy.eos_token_id).any(-1).tolist()
    return {
        "num_samples": len(texts),
        "sample_tokens": tokens,
        "parse_fraction": sum(parsed) / len(texts),
        "python_fraction": sum(map(reads_as_python, texts)) / len(texts),
        "ended_fraction": sum(ended) / len(texts),
        "empty_fraction": sum(not t.strip() for t in texts) / len(texts),
        "parsing_samples": [t for t, ok in zip(texts, parsed) if ok][:SAMPLES_IN_CARD],
    }


def model_card(output: Path, posterior: Any, corpus: Corpus, options: dict,
               command: str | None = None) -> dict:
    """Every figure of the card of an MLE run (``posterior`` of `Pretraining` on ``corpus``, a
    training split; ``options``: the engine's, as JSON), for `write_card`."""
    config, history, policy = posterior.config, posterior.history, posterior.policy
    model, heldout = policy.model, config["heldout"]
    counts = {"train": {"documents": config["documents"], "tokens": config["tokens"]},
              "heldout": heldout}
    source = corpus.source
    if source.split_unit == "file":
        split = split_files(source.files, corpus.seed, corpus.heldout_fraction)
        units = {part: len(split[part]) for part in ("train", "heldout")}
    else:
        units = {part: counts[part]["documents"] for part in ("train", "heldout")}
    curve = [[row["step"], row["heldout_loss"]] for row in history if "heldout_loss" in row]
    curve.append([options["steps"], config["heldout_loss"]])
    processes = config["sharding"]["processes"]
    tokens_seen = (options["steps"] * options["gradient_accumulation_steps"] * processes
                   * options["batch_size"] * options["block_size"])
    return {
        "model": {"architecture": type(model).__name__, "preset": options["preset"],
                  "n_layer": model.config.n_layer, "n_embd": model.config.n_embd,
                  "n_head": model.config.n_head, "vocab_size": len(policy.tokenizer),
                  "n_positions": model.config.n_positions,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "safetensors_bytes": (output / "model.safetensors").stat().st_size},
        "corpus": source.name,
        "split": {"unit": source.split_unit, **units, "seed": corpus.seed,
                  "heldout_fraction": corpus.heldout_fraction},
        "documents": {part: counts[part]["documents"] for part in ("train", "heldout")},
        "tokens": {part: counts[part]["tokens"] for part in ("train", "heldout")},
        "steps": options["steps"],
        "tokens_seen": tokens_seen,
        "epochs": tokens_seen / counts["train"]["tokens"],
        "heldout_loss": curve[-1][1],
        "heldout_perplexity": perplexity(curve[-1][1]),
        "heldout_loss_initial": curve[0][1],
        "heldout_curve": curve,
        **sample_report(posterior.samples, policy.eos_token_id, policy.max_new_tokens),
        "whole_samples": whole_sample_report(policy, options["seed"]),
        "training_wall_time_s": sum(row["seconds"] for row in history),
        "device": config["device"],
        "processes": processes,
        "sharding": config["sharding"],
        "command": command or shlex.join(sys.argv),
        "config": options,
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in ("bayesalign", "torch", "transformers", "tokenizers", "datasets", "accelerate"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_card(output: Path, card: dict) -> None:
    """``card.json`` (every figure) and ``MODEL_CARD.md`` (the same, for a reader)."""
    (output / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    split, whole = card["split"], card["whole_samples"]
    lines = [
        f"# {output.name}: a GPT-2 prior pretrained with `bayesalign pretrain`",
        "",
        f"A {card['model']['n_layer']}-layer, {card['model']['n_embd']}-wide GPT-2 "
        f"({card['model']['parameters']:,} parameters, vocabulary {card['model']['vocab_size']}, "
        f"context {card['model']['n_positions']}) trained from scratch by next-token maximum "
        "likelihood. Load it with `CausalLM.from_pretrained(path)` or transformers' "
        "`AutoModelForCausalLM` / `AutoTokenizer` (local files only).",
        "",
        "| | |",
        "|---|---|",
        f"| corpus | {card['corpus']} |",
        f"| held-out split (by {split['unit']}) | {split['train']} train / {split['heldout']} "
        f"held-out {split['unit']}s |",
        f"| documents (train / held-out) | {card['documents']['train']:,} / "
        f"{card['documents']['heldout']:,} |",
        f"| tokens (train / held-out) | {card['tokens']['train']:,} / "
        f"{card['tokens']['heldout']:,} |",
        f"| steps × batch × block | {card['steps']} × {card['config']['batch_size']} × "
        f"{card['config']['block_size']} |",
        f"| tokens seen | {card['tokens_seen']:,} ({card['epochs']:.2f} epochs) |",
        f"| held-out loss (nats/token) | {card['heldout_loss']:.3f} "
        f"(step 0: {card['heldout_loss_initial']:.3f}) |",
        f"| held-out perplexity | {card['heldout_perplexity']:.2f} |",
        f"| unconditional samples that `ast.parse` | {card['parse_fraction']:.1%} of "
        f"{card['num_samples']} (≤ {card['sample_tokens']} tokens; "
        f"{card['ended_fraction']:.0%} ended with EOS, {card['empty_fraction']:.0%} empty) |",
        f"| whole samples (≤ {whole['sample_tokens']} tokens) that parse / read as Python | "
        f"{whole['parse_fraction']:.1%} / {whole['python_fraction']:.1%} of "
        f"{whole['num_samples']} ({whole['ended_fraction']:.0%} ended with EOS, "
        f"{whole['empty_fraction']:.0%} empty; parse = `ast.parse` finds a statement, so blank "
        "and comment-only texts do not count; read as Python = a keyword outside strings and "
        "comments) |",
        f"| training wall time | {card['training_wall_time_s']:.0f} s "
        f"({card['tokens_seen'] / max(card['training_wall_time_s'], 1e-9):,.0f} tokens/s) |",
        f"| device | {card['device']} |",
        "",
        "Command:",
        "",
        "```",
        card["command"],
        "```",
        "",
        "## Intended use and limits",
        "",
        "A small prior for alignment experiments (a(y) in bayesalign's targets), not a code "
        "assistant: its samples look like Python and often do not mean anything. Python sources "
        "were cut into top-level definitions separated by EOS (`segment_python`), so an "
        "unconditional sample is one definition or one run of module-level statements. "
        "Samples may reproduce fragments of the training corpus under its own licence.",
        "",
        "## Unconditional samples",
        "",
    ]
    for i, sample in enumerate(card["samples"][:3]):
        lines += [f"Sample {i + 1} ({'parses' if bool(parses(sample)[0]) else 'does not parse'}):", "",
                  "````python", sample.rstrip("\n"), "````", ""]
    parsing = whole["parsing_samples"][:3]
    lines += ["## Whole samples that parse", "",
              *([] if parsing else [f"None of the {whole['num_samples']} parsed.", ""])]
    for sample in parsing:
        lines += ["````python", sample.rstrip("\n"), "````", ""]
    (output / "MODEL_CARD.md").write_text("\n".join(lines))


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
