"""Context distillation: teach the unprompted code prior what a prompt does (SPEC §13).

A prompt C is a conditioning: the target is p(y | x) = a(y | C ⊕ x), here with a = the bundled
code prior and C a code prefix (``PROMPT``). Two ways to distil it into the unprompted π(y | x):
(a) Askell et al.'s token-level objective (`ContextDistillation`: KL between the prompted and
the unprompted next-token distributions at every position of corpus text, teacher-forced, no
sampling) and (b) the sequence-level one, DPG on the same target (weights a(y | C ⊕ x)/π(y | x)).

Distances are measured on held-out contexts (the first line of held-out definitions of the
corpus) with exact target samples: the target has no factor sites, so draws of the prompted
prior *are* target draws and Z = 1; KL(prompted ‖ π) = E_p[log a(y|C⊕x) − log π(y|x)] with its
standard error (the yardstick of SPEC §12, built once per context and reused for every
checkpoint). The prompt itself sits at 0 by definition; the unprompted prior is the start.
Curves are read from checkpoints: each engine is fitted in segments that resume its run.

``python -m experiments.context_distillation [--quick] [--output DIR]``; quick mode runs a tiny
random GPT-2 on a few texts so the tests exercise every code path.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyro
import torch

import bayesalign as ba
from bayesalign.inference import DPG, ContextDistillation, exact_reference
from bayesalign.models import CausalLM, Corpus, Prompted
from bayesalign.models.tiny import tiny_causal_lm
from bayesalign.reference import Reference, distances

from .cli import experiment_main
from .results import publish

PROMPT = "import os\nimport sys\n"
QUICK_TEXTS = ["def f(x):\n    return x\n", "class A:\n    pass\n", "for i in range(3):\n    i\n",
               "x = [1, 2, 3]\n", "if x:\n    y = 1\n", "while True:\n    break\n"]
QUICK_HELD_OUT = ["def g(y):\n", "class B:\n"]


@dataclass(frozen=True)
class Sizes:
    train_texts: int  # corpus texts the student is trained on
    held_out: int  # held-out contexts the distances are averaged over
    reference_samples: int  # exact target draws per held-out context
    new_tokens: int  # length of the continuations y
    text_tokens: int  # positions of each training text matched by (a)
    segments: int  # evaluation points after step 0
    steps_per_segment: int
    distil_batch: int  # texts per step, (a)
    dpg_batch: int  # samples per step, (b)
    distil_learning_rate: float
    dpg_learning_rate: float  # lower: DPG's weights are noisy (3e-3 diverged on the quick world)

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        if quick:
            return cls(6, 2, 256, 6, 24, 2, 12, 6, 16, 3e-3, 3e-4)
        return cls(256, 8, 256, 24, 48, 4, 25, 16, 32, 3e-4, 1e-5)


def load(sizes: Sizes, quick: bool) -> tuple[CausalLM, list[str], list[str]]:
    """The prior, the training texts and the held-out contexts."""
    if quick:
        lm = tiny_causal_lm(seed=3, initializer_range=0.1, max_new_tokens=sizes.new_tokens)
        return lm, QUICK_TEXTS[:sizes.train_texts], QUICK_HELD_OUT[:sizes.held_out]
    lm = CausalLM.from_pretrained("bundled:code-small", max_new_tokens=sizes.new_tokens)
    # Top-level definitions, as the prior was trained on (segment_python).
    train = Corpus(None, "document", split="train", segment_python=True).segments
    held_out = Corpus(None, "document", split="heldout", segment_python=True).segments
    step = max(1, len(train) // sizes.train_texts)
    # Each text cut to its first text_tokens tokens, so it is also a context DPG can be given
    # (a whole definition can be longer than the model's 256 positions).
    cut = [lm.tokenizer.decode(lm.tokenizer(t)["input_ids"][:sizes.text_tokens])
           for t in train[::step] if t.strip()]
    texts = [t for t in cut if joins_cleanly(lm, t)][:sizes.train_texts]
    contexts = [first_line(t) for t in held_out if first_line(t).strip()]
    stride = max(1, len(contexts) // sizes.held_out)
    return lm, texts, contexts[::stride][:sizes.held_out]


def joins_cleanly(lm: CausalLM, text: str) -> bool:
    """Whether ``PROMPT + text`` tokenises as the prompt's tokens then the text's (what the
    token-level teacher reads); the few texts that do not are left out, not refused."""
    encode = lm.tokenizer
    return encode(PROMPT + text)["input_ids"] == encode(PROMPT)["input_ids"] + encode(text)["input_ids"]


def first_line(text: str) -> str:
    return text.split("\n", 1)[0] + "\n"


def prompted_target(lm: CausalLM) -> ba.Target:
    prompted = Prompted(lm, PROMPT)

    @ba.target
    def prompted_code(context=None):
        pyro.sample("y", prompted.given(context))

    return prompted_code


def held_out_distance(references: list[Reference], policy) -> dict[str, float]:
    """Mean KL(prompted ‖ π) over the held-out contexts, with its standard error."""
    rows = [distances(r, policy.given(r.context).log_prob(r.samples)) for r in references]
    kl = sum(r.kl_target_policy for r in rows) / len(rows)
    se = math.sqrt(sum(r.kl_target_policy_se ** 2 for r in rows)) / len(rows)
    return {"kl": kl, "kl_se": se, "per_context": [r.kl_target_policy for r in rows]}


def curve(name: str, make, target: ba.Target, texts: list[str], references: list[Reference],
          sizes: Sizes, folder: Path, per_step: int) -> dict:
    """Fit in segments resuming one run; distances after each segment."""
    points, started = [], time.perf_counter()
    for segment in range(1, sizes.segments + 1):
        steps = segment * sizes.steps_per_segment
        engine = make(steps=steps, checkpoint_dir=str(folder / name), progress=False)
        posterior = engine.fit(target, contexts=texts)
        point = held_out_distance(references, posterior.policy)
        points.append({"steps": steps, "drawn": steps * per_step, **point})
        print(f"{name}: step {steps}: KL {point['kl']:.3f} ± {point['kl_se']:.3f}", flush=True)
    return {"engine": name, "points": points, "seconds": time.perf_counter() - started,
            "per_step": per_step,
            "samples": posterior.sample(3).text}


def run(output: Path, quick: bool) -> str:
    output.mkdir(parents=True, exist_ok=True)
    sizes = Sizes.for_mode(quick)
    torch.manual_seed(0)
    lm, texts, contexts = load(sizes, quick)
    target = prompted_target(lm)
    references = [exact_reference(target, bound=1, num_samples=sizes.reference_samples,
                                  context=x, seed=i) for i, x in enumerate(contexts)]
    start = held_out_distance(references, lm)
    common = {"eval_samples": 8, "seed": 0}
    curves = [
        curve("token-level (a)", lambda **kw: ContextDistillation(
            batch_size=sizes.distil_batch, max_text_tokens=sizes.text_tokens, eval_contexts=2,
            learning_rate=sizes.distil_learning_rate, **common, **kw),
            target, texts, references, sizes, output / "checkpoints", per_step=0),
        curve("DPG, sequence-level (b)", lambda **kw: DPG(
            batch_size=sizes.dpg_batch, contexts_per_step=4,
            learning_rate=sizes.dpg_learning_rate, **common, **kw),
            target, texts[:8], references, sizes, output / "checkpoints", per_step=sizes.dpg_batch),
    ]
    model = "tiny random GPT-2, quick" if quick else "bundled:code-small"
    return publish(output, "context_distillation", {
        "quick": quick, "model": model, "prompt": PROMPT, "sizes": asdict(sizes),
        "held_out_contexts": contexts, "prior": start, "curves": curves,
    }, True, render, _plot)[1]


def render(results: dict) -> str:
    sizes, prior = results["sizes"], results["prior"]
    lines = [
        f"## Context distillation of the prompt {results['prompt']!r} ({results['model']})",
        "",
        f"KL(prompted ‖ π) on {len(results['held_out_contexts'])} held-out contexts, "
        f"{sizes['reference_samples']} exact target draws each (continuations of "
        f"{sizes['new_tokens']} tokens).",
        "",
        "| π | steps | samples drawn | KL(prompted ‖ π) ± se | share of the shift removed | seconds |",
        "|---|---|---|---|---|---|",
        f"| prior, no prompt | 0 | 0 | {prior['kl']:.3f} ± {prior['kl_se']:.3f} | 0% | 0 |",
    ]
    for c in results["curves"]:
        last = c["points"][-1]
        removed = 1 - last["kl"] / prior["kl"] if prior["kl"] > 0 else math.nan
        drawn = "none (teacher forcing)" if c["per_step"] == 0 else str(last["drawn"])
        lines.append(f"| {c['engine']} | {last['steps']} | {drawn} | {last['kl']:.3f} ± "
                     f"{last['kl_se']:.3f} | {removed:.0%} | {c['seconds']:.0f} |")
    lines.append("| the prompt itself | – | – | 0 (by definition) | 100% | – |")
    return "\n".join(lines)


def _plot(results: dict, path: Path) -> None:
    from bayesalign.app import plots

    fig, (ax,) = plots.figure(1, width=5.5, height=4.0)
    prior = results["prior"]
    for c in results["curves"]:
        steps = [0] + [p["steps"] for p in c["points"]]
        kl = [prior["kl"]] + [p["kl"] for p in c["points"]]
        se = [prior["kl_se"]] + [p["kl_se"] for p in c["points"]]
        ax.errorbar(steps, kl, yerr=[2 * s for s in se], marker="o", capsize=3, label=c["engine"])
    ax.axhline(0.0, color="grey", lw=0.8, ls="--", label="the prompt itself")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("KL(prompted ‖ π), held out (± 2 se)")
    ax.set_title(f"distilling {results['prompt']!r} ({results['model']})", fontsize=9)
    ax.legend(fontsize=7)
    plots.save(fig, path)


def main(argv: list[str] | None = None) -> int:
    return experiment_main(run, __doc__.splitlines()[0], "outputs/context_distillation", argv)


if __name__ == "__main__":
    raise SystemExit(main())
