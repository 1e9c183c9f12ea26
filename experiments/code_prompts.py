"""Code prompts: CDPG's conditional code task (SPEC §2.5) on SmolLM2-135M-Instruct.

For each request x in ``data/code_prompts.json`` (56 requests for small Python functions, a
fixed split: 44 train, 12 held-out) the target is

    p_x(y) ∝ a(y | x) · 1[parses(code(y))] · exp(pep8(code(y)) / kl_coef)

with a = SmolLM2-135M-Instruct, the request as one user turn of its chat template. What is
scored, ``code(y)``, is the body of the answer's first ``` fence (up to its closing fence, or to
the end of an answer cut off by the token limit), else the whole answer. pep8 = −violations per
character ≤ 0, so P/a ≤ 1 and every Z_x lies in [0, 1].

Per held-out prompt we report Ẑ_x (the mean of P/a over prior draws, 0 when none parses) and
the parse rate and PEP8 violations per character of the code from the prior, BestOfN, QRS,
Importance (resampled) and two short fine-tunes trained on the train prompts only: CDPG (DPG with
per-context Ẑ_c) and KLRL-rloo. An engine with nothing to return for a prompt (Importance when
all weights are zero, QRS with no acceptance) is recorded as such, not averaged.

Full mode is sized for 2 CPU cores: 8 prior draws per prompt, 4 outputs per engine, 48 new
tokens, 16 policy steps of 4 samples on one context, only the top 4 of 30 transformer blocks
trained (measured: 36 min wall, 19.5 min of CPU, the cores shared with other jobs). On a GPU
use e.g. 128 draws and 32 outputs per prompt, 128 new tokens, BestOfN n = 16, 500 steps × 64
samples over 8 contexts per step, every layer trained.

``python -m experiments.code_prompts [--quick] [--output DIR]``; quick mode runs a tiny random
GPT-2 on plain-text prompts (4 train, 2 held-out) so the tests exercise every code path.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import pyro
import torch

import bayesalign as ba
from bayesalign.errors import EmptySupportError
from bayesalign.inference import DPG, KLRL, QRS, BestOfN, Importance
from bayesalign.models import CausalLM, scorers
from bayesalign.models.tiny import tiny_causal_lm
from bayesalign.sequences import Sequences

from .cli import experiment_main
from .results import publish, write_text_atomic

PROMPTS = Path(__file__).parent / "data" / "code_prompts.json"
FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.S)
BLOCK = re.compile(r"\.(?:layers|h)\.(\d+)\.")  # a transformer block's index (Llama, GPT-2)
METHODS = ("prior", "BestOfN", "QRS", "Importance", "CDPG", "KLRL-rloo")


@dataclass(frozen=True)
class Sizes:
    train_prompts: int  # training contexts: the first n train prompts
    held_out_prompts: int  # evaluation contexts: the first n held-out prompts
    samples: int  # prior draws per held-out prompt: Ẑ_x, prior rates, Importance's draws
    outputs: int  # samples BestOfN, QRS and each fine-tuned policy return per prompt
    best_of_n: int
    qrs_beta: float  # β_q < 1 accepts more than exact rejection (β_q = 1, since P/a ≤ 1)
    qrs_proposals: int  # prior draws QRS may spend per prompt
    policy_steps: int
    policy_batch: int
    contexts_per_step: int
    trainable_layers: int  # top transformer blocks the fine-tunes train (CPU budget)
    learning_rate: float
    new_tokens: int
    kl_coef: float  # β of exp(pep8/β): violations per char are ~0.001–0.01 on parsed code

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        if quick:
            return cls(4, 3, 16, 4, 2, 0.5, 16, 2, 4, 2, 1, 1e-3, 3, 0.005)
        return cls(44, 12, 8, 4, 4, 0.5, 8, 16, 4, 1, 4, 5e-5, 48, 0.005)


def load_prompts(sizes: Sizes) -> tuple[list[str], list[str]]:
    """The fixed train / held-out split of the project's requests, cut to the mode's sizes."""
    data = json.loads(PROMPTS.read_text())
    return data["train"][: sizes.train_prompts], data["held_out"][: sizes.held_out_prompts]


def load_prior(quick: bool, new_tokens: int) -> CausalLM:
    if quick:
        return tiny_causal_lm(seed=0, initializer_range=0.3, max_new_tokens=new_tokens)
    return CausalLM.from_pretrained("bundled:smollm2-135m-instruct", max_new_tokens=new_tokens)


def code_of(answer: str) -> str:
    """The code an answer gives: its first fenced block (even if cut off), else all of it."""
    match = FENCE.search(answer)
    return match.group(1) if match else answer


def code_target(prior: CausalLM, kl_coef: float) -> ba.Target:
    @ba.target
    def clean_code(prompt):
        y = pyro.sample("y", prior.given(prompt))
        code = [code_of(answer) for answer in y.text]
        ba.constraint("parses", scorers.parses(code))
        ba.reward("pep8", scorers.pep8(code), kl_coef=kl_coef)

    return clean_code


def rates(samples: Sequences) -> dict[str, float]:
    """Parse rate and mean PEP8 violations per character of the samples' code."""
    code = [code_of(answer) for answer in samples.text]
    return {"parse_rate": float(scorers.parses(code).float().mean()),
            "violations_per_char": 0.0 - float(scorers.pep8(code).mean())}  # no −0.0


def top_layers_policy(prior: CausalLM, layers: int) -> CausalLM:
    """A trainable copy of the prior whose top ``layers`` transformer blocks alone train."""
    policy = prior.trainable_copy()
    named = list(policy.module.named_parameters())
    last = max(int(m.group(1)) for name, _ in named if (m := BLOCK.search(name)))
    for name, parameter in named:
        match = BLOCK.search(name)
        parameter.requires_grad_(match is not None and int(match.group(1)) > last - layers)
    return policy


def fine_tune(target: ba.Target, prior: CausalLM, train: list[str],
              sizes: Sizes) -> dict[str, CausalLM]:
    """CDPG and KLRL-rloo on the train prompts only; returns the trained policies."""
    settings = {"steps": sizes.policy_steps, "batch_size": sizes.policy_batch,
                "learning_rate": sizes.learning_rate,
                "contexts_per_step": sizes.contexts_per_step, "eval_samples": 1, "seed": 0,
                "progress": False}
    engines = {"CDPG": lambda policy: DPG(baseline=True, policy=policy, **settings),
               "KLRL-rloo": lambda policy: KLRL(algorithm="rloo", policy=policy, **settings)}
    policies = {}
    for name, engine in engines.items():
        policy = top_layers_policy(prior, sizes.trainable_layers)
        engine(policy).fit(target, contexts=train)
        policies[name] = policy
    return policies


def evaluate_prompt(target: ba.Target, prior: CausalLM, policies: dict[str, CausalLM],
                    prompt: str, sizes: Sizes) -> list[dict]:
    """One held-out prompt: Ẑ_x, then each method's rates (None where it returned nothing)."""
    draws = prior.given(prompt).sample_batch(sizes.samples)
    z_hat = float(target.log_potential(draws, prompt).exp().mean())
    rows = []

    def add(method: str, samples: Sequences | None, note: str = "", kl: float | None = None):
        found = rates(samples) if samples is not None else {"parse_rate": None,
                                                             "violations_per_char": None}
        rows.append({"prompt": prompt, "z_hat": z_hat, "method": method, **found,
                     "kl_policy_prior": kl, "note": note})

    add("prior", draws, kl=0.0)
    bon = BestOfN(n=sizes.best_of_n, num_samples=sizes.outputs).fit(target, prompt)
    add("BestOfN", bon.samples, kl=bon.extras["kl_bound"])
    try:
        qrs = QRS(qrs_beta=sizes.qrs_beta, num_samples=sizes.outputs,
                  chunk_size=sizes.qrs_proposals, max_proposals=sizes.qrs_proposals)
        post = qrs.fit(target, prompt)
        add("QRS", post.samples, f"acceptance {post.diagnostics.acceptance_rate:.2f}")
    except EmptySupportError:
        add("QRS", None, f"none accepted of {sizes.qrs_proposals}")
    try:
        importance = Importance(num_samples=sizes.samples, resample=True).fit(target, prompt)
        add("Importance", importance.samples, f"ESS {importance.diagnostics.ess:.1f}")
    except EmptySupportError:
        add("Importance", None, f"all {sizes.samples} weights zero")
    for name, policy in policies.items():
        samples = policy.given(prompt).sample_batch(sizes.outputs)
        kl = samples.log_q - prior.given(prompt).log_prob(samples).double()
        add(name, samples, kl=float(kl.mean()))
    return rows


def run(output: Path, quick: bool) -> str:
    output.mkdir(parents=True, exist_ok=True)
    sizes = Sizes.for_mode(quick)
    train, held_out = load_prompts(sizes)
    prior = load_prior(quick, sizes.new_tokens)
    target = code_target(prior, sizes.kl_coef)
    rows: list[dict] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        policies = fine_tune(target, prior, train, sizes)
        for index, prompt in enumerate(held_out):
            rows += evaluate_prompt(target, prior, policies, prompt, sizes)
            # Written after every prompt, so a stopped full run keeps what it measured.
            report = publish(output, "code_prompts", {
                "quick": quick, "sizes": asdict(sizes), "train_prompts": train,
                "summary": summary(rows), "rows": rows}, index == len(held_out) - 1, render,
                _plot)[1]
            _write_csv(rows, output / "code_prompts.csv")
    return report


def summary(rows: list[dict]) -> list[dict]:
    """Per method: means over the held-out prompts where it returned samples."""
    out = []
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        found = [r for r in mine if r["parse_rate"] is not None]
        kls = [r["kl_policy_prior"] for r in found if r["kl_policy_prior"] is not None]
        out.append({
            "method": method, "prompts": f"{len(found)}/{len(mine)}",
            "parse_rate": _mean([r["parse_rate"] for r in found]),
            "violations_per_char": _mean([r["violations_per_char"] for r in found]),
            "kl_policy_prior": _mean(kls),
        })
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _cell(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render(results: dict) -> str:
    """The Markdown tables of a results.json's contents."""
    rows, sizes = results["rows"], results["sizes"]
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    z_hats = [next(r["z_hat"] for r in rows if r["prompt"] == p) for p in prompts]
    model = "tiny random GPT-2, quick" if results["quick"] else "SmolLM2-135M-Instruct"
    lines = [f"## Code prompts ({model}; {len(prompts)} held-out prompts, {sizes['new_tokens']} "
             f"new tokens, kl_coef {sizes['kl_coef']:g}, {sizes['samples']} prior draws and "
             f"{sizes['outputs']} outputs per prompt)", "",
             f"Mean Ẑ_x {_mean(z_hats):.3f}; Ẑ_x = 0 on {sum(z == 0 for z in z_hats)} of "
             f"{len(prompts)} prompts.", "",
             "| method | prompts with samples | parse rate | PEP8 violations / char | KL(π‖a) |",
             "|---|---|---|---|---|"]
    for s in results["summary"]:
        lines.append(f"| {s['method']} | {s['prompts']} | {_cell(s['parse_rate'], 3)} | "
                     f"{_cell(s['violations_per_char'], 4)} | {_cell(s['kl_policy_prior'], 3)} |")
    lines += ["", "Per held-out prompt: parse rate / violations per char (— : no samples).", "",
              "| function | Ẑ_x | " + " | ".join(METHODS) + " |",
              "|---|---|" + "---|" * len(METHODS)]
    for prompt, z_hat in zip(prompts, z_hats):
        cells = []
        for method in METHODS:
            r = next(r for r in rows if r["prompt"] == prompt and r["method"] == method)
            cells.append("—" if r["parse_rate"] is None
                         else f"{r['parse_rate']:.2f} / {r['violations_per_char']:.4f}")
        lines.append(f"| {_function_name(prompt)} | {z_hat:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _function_name(prompt: str) -> str:
    match = re.search(r"`([^`(]+)", prompt)
    return match.group(1) if match else prompt[:24]


def _write_csv(rows: list[dict], path: Path) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


def _plot(results: dict, path: Path) -> None:
    from bayesalign.app import plots

    stats = results["summary"]
    names = [s["method"] for s in stats]
    fig, axes = plots.figure(2, width=5.0, height=3.8)
    for ax, key, label in ((axes[0], "parse_rate", "parse rate"),
                           (axes[1], "violations_per_char", "PEP8 violations / char")):
        values = [math.nan if s[key] is None else s[key] for s in stats]
        ax.bar(names, values, color=["grey"] + ["tab:blue"] * 3 + ["tab:orange"] * 2)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle("Held-out code prompts: means over prompts")
    plots.save(fig, path)


def main(argv: list[str] | None = None) -> int:
    return experiment_main(run, __doc__.splitlines()[0], "outputs/code_prompts", argv)


if __name__ == "__main__":
    raise SystemExit(main())
