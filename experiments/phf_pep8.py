"""PHF on PEP8 (SPEC §5): six pretraining objectives, one target, one token budget.

One target is declared once: ``y ~ Corpus(stdlib, segment="line", split="train",
segment_context=True)`` (the held-out split of ``bayesalign pretrain``: 5% of the files, seed
0) times a factor site ``pep8`` = −violations/character of the line judged in its file, as PHF
scored it (pycodestyle on the whole file, each line given the violations reported on it:
``scorers.pep8_in_document``). `Pretraining` trains the same tiny GPT-2 from the same
initialisation and tokenizer with each objective (MLE, filtering, conditional, unlikelihood,
RWR, AWR) for the same steps × blocks × tokens, with PHF's PEP8 settings.

Per objective:

- misalignment: mean pycodestyle violations per character of unconditional samples (PHF's
  metric, T = 0.7, top-p 0.9, EOS banned so none is empty), conditional training sampled as
  its `Posterior` is (prompt ``EOS <|good|>``, both control tokens banned);
- score_max@k: the expected maximum misalignment over k samples, the unbiased U-statistic
  Σ_i s_(i)·C(i−1, k−1)/C(N, k) of the N sorted sample scores;
- held-out loss: mean −log π(x_t | x_<t) over the text tokens of held-out chunks (runs of
  whole lines of held-out files, each after EOS; conditional training after EOS <|good|>
  with both control tokens banned, the law its samples come from);
- KL from MLE: the mean over the same held-out tokens of log p_MLE − log π, i.e. held-out
  cross-entropy minus MLE's. PHF's capability proxy E_{x∼GPT-3}[log p_GPT3(x) − log π(x)]
  with held-out text as the reference samples and MLE's density for the reference's: it
  equals KL(data‖π) − KL(data‖p_MLE) per token (PHF's "KL overhead" with the corpus as the
  reference), 0 for MLE, and negative where an objective fits held-out code better than MLE.

A seventh row, "conditional (PHF decoding)", samples the same conditional model as PHF's code
does: only ``<|bad|>`` is banned, so the model may tag each new line ``<|good|>`` itself (the
tags are removed from the text); its held-out loss puts ``<|good|>`` before every line and
scores the text tokens only.

``python -m experiments.phf_pep8 [--quick] [--output DIR]``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyro
import torch

import bayesalign as ba
from bayesalign.inference import Pretraining
from bayesalign.inference.pretraining_data import BAD_TOKEN, GOOD_TOKEN
from bayesalign.models import CausalLM, Corpus, scorers
from bayesalign.models.adaptors import BanTokens, make_adaptors
from bayesalign.models.pretraining import PRESETS, copy_stdlib_slice
from bayesalign.models.tiny import tiny_gpt2, train_tokenizer
from bayesalign.posterior import Posterior
from bayesalign.seeding import seeded

from .cli import experiment_main
from .results import publish, write_text_atomic

SEED = 0
PRESET = "tiny"
# PHF's PEP8 configs (SPEC §5). Conditional and unlikelihood: aligned iff no violation
# (threshold 0, the median line here); filtering keeps files whose mean line score is at
# least the median file's (PHF's absolute 2.361e-3 has no quantile on this corpus's scale).
THRESHOLD_QUANTILE = 0.5
DROP_TOKEN_FRACTION = 0.1
UNLIKELIHOOD_ALPHA = 0.01
RWR_BETA = 10.0
AWR_ALPHA, AWR_BETA = 0.05, 1.0
TEMPERATURE, TOP_P = 0.7, 0.9
DIAGNOSTIC_SAMPLES = 8  # the engine's own posterior draws (T = 1), for its diagnostics only
OBJECTIVES = ("mle", "filtering", "conditional", "unlikelihood", "rwr", "awr")
PHF_DECODING = "conditional (PHF decoding)"
QUICK_CORPUS_BYTES = 40_000  # the quick mode's slice of the standard library


@dataclass(frozen=True)
class Sizes:
    quick: bool
    steps: int  # optimizer steps per objective
    batch_size: int  # blocks per step
    block_size: int  # tokens per block (also the model's context)
    samples: int  # unconditional samples per objective
    max_at_k: int  # k of score_max@k
    heldout_chunks: int  # held-out chunks of whole lines

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        if quick:
            return cls(True, steps=4, batch_size=4, block_size=32, samples=8, max_at_k=4,
                       heldout_chunks=16)
        return cls(False, steps=1200, batch_size=16, block_size=128, samples=512, max_at_k=25,
                   heldout_chunks=512)

    @property
    def tokens(self) -> int:
        """The token budget every objective trains on."""
        return self.steps * self.batch_size * self.block_size


def pep8_target(corpus: Corpus) -> ba.Target:
    """The PHF target: corpus lines weighted by exp(−violations/char) of the line in its file."""

    @ba.target
    def pep8_corpus():
        y = pyro.sample("y", corpus)
        ba.reward("pep8", scorers.pep8_in_document(y))

    return pep8_corpus


def fresh_policy(corpus: Corpus, block_size: int) -> CausalLM:
    """One BPE and one random initialisation shared by every objective, so held-out tokens
    and the starting point are the same for all."""
    preset = PRESETS[PRESET]
    tokenizer = train_tokenizer(("".join(doc) for doc in corpus.documents()), preset.vocab_size)
    model = tiny_gpt2(tokenizer, preset.n_layer, preset.n_embd, preset.n_head,
                      n_positions=block_size, seed=SEED)
    return CausalLM(model, tokenizer)


def engine(objective: str, sizes: Sizes, policy: CausalLM, data_dir: Path) -> Pretraining:
    return Pretraining(
        objective=objective, policy=policy, preset=PRESET, steps=sizes.steps,
        batch_size=sizes.batch_size, block_size=sizes.block_size,
        learning_rate=PRESETS[PRESET].learning_rate, max_grad_norm=1.0, seed=SEED,
        data_dir=str(data_dir), threshold_quantile=THRESHOLD_QUANTILE,
        drop_token_fraction=DROP_TOKEN_FRACTION, unlikelihood_mode="hard",
        unlikelihood_alpha=UNLIKELIHOOD_ALPHA, awr_alpha=AWR_ALPHA,
        awr_beta=AWR_BETA if objective == "awr" else RWR_BETA,
        eval_samples=DIAGNOSTIC_SAMPLES, progress=False,
        max_new_tokens=sizes.block_size - 2,  # every objective's samples as long as conditional's
    )


def control_ids(tokenizer) -> tuple[int, int]:
    good, bad = tokenizer.convert_tokens_to_ids([GOOD_TOKEN, BAD_TOKEN])
    return good, bad


def sample_texts(post: Posterior, sizes: Sizes, phf_decoding: bool = False) -> list[str]:
    """PHF's unconditional samples (T 0.7, top-p 0.9) from the trained model, as the
    `Posterior` prompts and bans tokens, or (``phf_decoding``) banning ``<|bad|>`` only.

    EOS is banned too, so every sample has ``max_new_tokens`` tokens: an empty sample has no
    violation (PHF's ``min_length`` guards against it), and AWR ended 41% of its samples at
    once in a first full run.
    """
    policy = post.policy
    adaptors, hidden = policy.adaptors, policy.hidden_tokens
    if phf_decoding:  # as Pretraining(conditional_decoding="every_segment") samples
        good, bad = control_ids(policy.tokenizer)
        adaptors, hidden = (BanTokens((bad,)),), (good,)
    chain = (*adaptors, BanTokens((policy.eos_token_id,)),
             *make_adaptors(temperature=TEMPERATURE, top_p=TOP_P))
    sampler = CausalLM(policy.model, policy.tokenizer, max_new_tokens=policy.max_new_tokens,
                       adaptors=chain, prompt=policy.prompt, hidden_tokens=hidden)
    texts: list[str] = []
    with seeded(SEED):
        while len(texts) < sizes.samples:
            texts += sampler.sample_batch(min(64, sizes.samples - len(texts))).text
    return texts


def expected_max(values: np.ndarray, k: int) -> float:
    """Unbiased estimate of E[max of k draws] from N ≥ k draws: the mean of the max over all
    k-subsets, Σ_i v_(i)·C(i−1, k−1)/C(N, k)."""
    ordered = np.sort(values)
    total = math.comb(len(ordered), k)
    return float(sum(v * math.comb(i, k - 1) / total for i, v in enumerate(ordered)))


def misalignment(texts: list[str], k: int) -> dict[str, float]:
    """PHF's misalignment score (violations per character) of samples: mean, its se, max@k;
    and the same over code lines only (not blank, not a comment), since an objective can lower
    the first by writing comments, which rarely violate PEP8."""
    rates = -scorers.pep8(texts).numpy()
    code = np.array([code_line_rate(text) for text in texts])
    return {"misalignment": float(rates.mean()),
            "misalignment_se": float(rates.std(ddof=1) / math.sqrt(len(rates))),
            "max_at_k": expected_max(rates, k),
            "code_misalignment": float(np.nanmean(code)),
            "code_misalignment_se": float(np.nanstd(code, ddof=1) / math.sqrt(np.isfinite(code).sum())),
            "comment_fraction": comment_fraction(texts)}


def code_line_rate(text: str) -> float:
    """Violations per character on the sample's code lines (pycodestyle on the whole sample,
    each violation on the line it names); NaN for a sample without code lines."""
    starts, counts = scorers.violations_per_line(text if text.endswith("\n") else text + "\n")
    lines = [text[a:b] for a, b in zip(starts, starts[1:])]
    code = [(line, n) for line, n in zip(lines, counts) if _is_code(line)]
    chars = sum(len(line) for line, _ in code)
    return sum(n for _, n in code) / chars if chars else math.nan


def comment_fraction(texts: list[str]) -> float:
    """Share of the samples' non-blank lines that are comments only."""
    lines = [line.strip() for text in texts for line in text.splitlines() if line.strip()]
    return sum(line.startswith("#") for line in lines) / max(len(lines), 1)


def _is_code(line: str) -> bool:
    return bool(line.strip()) and not line.lstrip().startswith("#")


def heldout_chunks(corpus: Corpus, tokenizer, block_size: int, count: int) -> list[list[list[int]]]:
    """Evenly spaced runs of whole held-out lines (each line tokenised alone, as in training)
    that fit ``block_size`` with EOS first and a tag before every line."""
    chunks: list[list[list[int]]] = []
    for doc in corpus.documents():
        chunk, width = [], 1
        for line in tokenizer(doc, add_special_tokens=False)["input_ids"]:
            line = line[:block_size - 2]
            if chunk and width + len(line) + 1 > block_size:
                chunks.append(chunk)
                chunk, width = [], 1
            chunk.append(line)
            width += len(line) + 1
        chunks.append(chunk)
    picks = np.unique(np.linspace(0, len(chunks) - 1, min(count, len(chunks))).round())
    return [chunks[int(i)] for i in picks]


def layout(chunk: list[list[int]], eos: int, tag: int | None, every_line: bool
           ) -> tuple[list[int], list[bool]]:
    """A chunk as model input (EOS, then the tag once or before every line) and which
    positions hold text tokens, the ones scored."""
    ids, scored = [eos], [False]
    for index, line in enumerate(chunk):
        if tag is not None and (every_line or index == 0):
            ids.append(tag)
            scored.append(False)
        ids += line
        scored += [True] * len(line)
    return ids, scored


@torch.no_grad()
def text_log_probs(model: torch.nn.Module, rows: list[tuple[list[int], list[bool]]],
                   banned: tuple[int, ...], pad: int, batch_size: int = 32) -> torch.Tensor:
    """log π of every scored token, in order, with ``banned`` ids' logits removed first."""
    found = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in batch])
        scored = torch.tensor([s + [False] * (width - len(s)) for _, s in batch])
        attention = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        if banned:
            logits[..., list(banned)] = -math.inf
        log_probs = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        found.append(log_probs[scored[:, 1:]])
    return torch.cat(found).double()


def heldout_log_probs(post: Posterior, chunks: list[list[list[int]]],
                      phf_decoding: bool = False) -> torch.Tensor:
    """Held-out text-token log-probs under the law the samples come from (see the module)."""
    tokenizer, eos = post.policy.tokenizer, post.policy.tokenizer.eos_token_id
    tag, banned = None, ()
    if post.config["objective"] == "conditional":
        tag, bad = control_ids(tokenizer)
        banned = (bad,) if phf_decoding else (tag, bad)
    rows = [layout(chunk, eos, tag, every_line=phf_decoding) for chunk in chunks]
    return text_log_probs(post.policy.model, rows, banned, pad=eos)


def row_for(name: str, post: Posterior, texts: list[str], log_probs: torch.Tensor,
            mle_log_probs: torch.Tensor, sizes: Sizes, seconds: float) -> dict:
    return {"objective": name, "threshold": post.config.get("threshold"),
            "fraction_good": post.config.get("fraction_good"),
            **misalignment(texts, sizes.max_at_k),
            "heldout_loss": float(-log_probs.mean()),
            "kl_from_mle": float((mle_log_probs - log_probs).mean()),
            "seconds": seconds}


def run(output: Path, quick: bool) -> str:
    output.mkdir(parents=True, exist_ok=True)
    sizes = Sizes.for_mode(quick)
    path = None
    if quick:
        (output / "corpus").mkdir(exist_ok=True)
        path = copy_stdlib_slice(output / "corpus", QUICK_CORPUS_BYTES)
    corpus = Corpus(path, segment="line", split="train", seed=SEED, segment_context=True)
    target = pep8_target(corpus)
    heldout = Corpus(path, segment="line", split="heldout", seed=SEED)
    policy = fresh_policy(corpus, sizes.block_size)
    chunks = heldout_chunks(heldout, policy.tokenizer, sizes.block_size, sizes.heldout_chunks)
    rows: list[dict] = []
    samples: dict[str, list[str]] = {}
    mle_log_probs = torch.empty(0)
    for objective in OBJECTIVES:
        started = time.perf_counter()
        post = engine(objective, sizes, policy, output / "data").fit(target)
        seconds = time.perf_counter() - started
        log_probs = heldout_log_probs(post, chunks)
        if objective == "mle":
            mle_log_probs = log_probs
        samples[objective] = sample_texts(post, sizes)
        rows.append(row_for(objective, post, samples[objective], log_probs, mle_log_probs,
                            sizes, seconds))
        if objective == "conditional":
            samples[PHF_DECODING] = sample_texts(post, sizes, phf_decoding=True)
            rows.append(row_for(PHF_DECODING, post, samples[PHF_DECODING],
                                heldout_log_probs(post, chunks, phf_decoding=True),
                                mle_log_probs, sizes, seconds))
        # Written after every objective, so a stopped full run keeps its rows.
        report = publish(output, "phf_pep8", {
            "quick": quick, "sizes": asdict(sizes) | {"tokens": sizes.tokens},
            "preset": PRESET, "temperature": TEMPERATURE, "top_p": TOP_P,
            "heldout_chunks": len(chunks), "heldout_tokens": int(mle_log_probs.numel()),
            "rows": rows}, objective == OBJECTIVES[-1], render, _plot)[1]
        write_text_atomic(output / "samples.json", json.dumps(samples, indent=1))
    return report


def render(results: dict) -> str:
    """The Markdown table of a results.json's contents."""
    rows, sizes = results["rows"], results["sizes"]
    mle = rows[0]["misalignment"]
    k = sizes["max_at_k"]
    code_mle = rows[0]["code_misalignment"]
    lines = [f"| objective | threshold R ≥ | good fraction | PEP8 violations / char ± se | "
             f"× fewer than MLE | score_max@{k} | held-out loss | KL from MLE | train s | "
             f"violations / code char ± se | × fewer (code) | comment lines |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        threshold = "—" if r["threshold"] is None else f"{r['threshold']:.4g}"
        good = "—" if r["fraction_good"] is None else f"{r['fraction_good']:.3f}"
        fewer = mle / r["misalignment"] if r["misalignment"] > 0 else math.inf
        lines.append(f"| {r['objective']} | {threshold} | {good} | {r['misalignment']:.4f} ± "
                     f"{r['misalignment_se']:.4f} | {fewer:.2f} | {r['max_at_k']:.4f} | "
                     f"{r['heldout_loss']:.4f} | {r['kl_from_mle']:+.4f} | {r['seconds']:.0f} | "
                     f"{r['code_misalignment']:.4f} ± {r['code_misalignment_se']:.4f} | "
                     f"{code_mle / r['code_misalignment']:.2f} | {r['comment_fraction']:.2f} |")
    corpus = "a 40 kB stdlib slice, quick" if sizes["quick"] else "Python standard library"
    title = (f"## PHF objectives on PEP8 ({corpus}; GPT-2 '{results['preset']}', "
             f"{sizes['steps']} steps × {sizes['batch_size']} blocks × {sizes['block_size']} "
             f"tokens = {sizes['tokens']:,} tokens each; {sizes['samples']} samples at T "
             f"{results['temperature']}, top-p {results['top_p']}; held-out loss and KL in "
             f"nats/token over {results['heldout_tokens']:,} tokens of "
             f"{results['heldout_chunks']} held-out chunks)")
    return "\n".join([title, "", *lines])


def _plot(results: dict, path: Path) -> None:
    """Misalignment against KL from MLE, one labelled point per objective."""
    from bayesalign.app import plots

    fig, (ax,) = plots.figure(1, width=5.5, height=4.0)
    for r in results["rows"]:
        ax.errorbar(r["kl_from_mle"], r["misalignment"], yerr=r["misalignment_se"], fmt="o",
                    markersize=5, capsize=2)
        ax.annotate(r["objective"], (r["kl_from_mle"], r["misalignment"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.margins(0.15)
    ax.set_xlabel("KL from MLE on held-out code (nats/token)")
    ax.set_ylabel("PEP8 violations per character")
    ax.set_title("PHF objectives: misalignment vs capability cost")
    plots.save(fig, path)


def main(argv: list[str] | None = None) -> int:
    return experiment_main(run, __doc__.splitlines()[0], "outputs/phf_pep8", argv)


if __name__ == "__main__":
    raise SystemExit(main())
