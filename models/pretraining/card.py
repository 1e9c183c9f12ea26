"""What a pretrained prior reports about itself: unconditional samples, how many of them parse
as Python, and the model card (``MODEL_CARD.md`` for people, ``card.json`` for programs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..causal_lm import CausalLM
from ..scorers import parses

SAMPLES_IN_CARD = 8  # samples kept in card.json; MODEL_CARD.md shows the first 3


def sample_report(prior: CausalLM, num_samples: int, seed: int) -> dict:
    """Draw ``num_samples`` unconditional samples (seeded) and measure how many parse."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        samples = prior.sample_batch(num_samples)
    texts = samples.text
    ended = samples.tokens.eq(prior.eos_token_id).any(-1)
    return {
        "num_samples": num_samples,
        "sample_tokens": prior.max_new_tokens,
        "parse_fraction": float(parses(texts).double().mean()),
        "ended_fraction": float(ended.double().mean()),  # reached EOS within sample_tokens
        "empty_fraction": sum(not t.strip() for t in texts) / num_samples,
        "samples": texts[:SAMPLES_IN_CARD],
    }


def write_card(output: Path, card: dict) -> None:
    """``card.json`` (every figure) and ``MODEL_CARD.md`` (the same, for a reader)."""
    (output / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    split = card["split"]
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
    (output / "MODEL_CARD.md").write_text("\n".join(lines))


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
