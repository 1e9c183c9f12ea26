"""PHF pretraining throughput: conditional training against plain MLE, and the score cache.

    python bench/phf_throughput.py --preset tiny --steps 10 --repeats 11 --threads 1

(a) Tokens/s of `Pretraining(objective="conditional")` against `Pretraining(objective="mle")`:
the same fresh GPT-2 preset (conditional adds its two control-token rows to the vocabulary), the
same block size and micro-batch, the same corpus (``--corpus-bytes`` of standard-library modules,
a seeded choice, cut into lines) and the same PEP8 target. Only training steps count: the data
is prepared (scored, tagged, packed) by one untimed warm-up fit of each objective, and each
timed fit drops its first ``--warmup`` steps; a fit's figure is its median step's tokens/s in
the engine's history (the same tokens per step for both). Fits alternate (mle, conditional,
mle, …) so that load from other jobs falls on both alike; medians over ``--repeats``, with the
ratio of the medians and the median of the per-round ratios.

(b) Segments/s of scoring those lines with the PEP8 target (pycodestyle in worker processes)
through the on-disk score cache, cold (a new SQLite file: every distinct line scored, then
stored) and warm (the same file again: every score read), beside calling the target directly
with no cache. Batches of ``--score-batch`` lines, as data preparation sends them.

(c) Segments/s of the PEP8 factor on each line judged alone (`scorers.pep8`, worker
processes), against each line judged in its file (`scorers.pep8_in_document` on a corpus with
``segment_context``: pycodestyle once per file, in this process), no cache, the per-file memo
cleared before each round.
"""

from __future__ import annotations

import argparse
import statistics
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
import transformers

import bayesalign as ba
from bayesalign.inference import Pretraining
from bayesalign.inference.pretraining_data import ScoreCache, score_segments, scorer_identity
from bayesalign.models import Corpus, scorers
from bayesalign.models.corpus_prior import origins
from bayesalign.models.pretraining import copy_stdlib_slice
from bayesalign.targets import NO_CONTEXT


def pep8_target(corpus: Corpus) -> ba.Target:
    @ba.target
    def clean_code():
        y = pyro.sample("y", corpus)
        ba.reward("pep8", scorers.pep8_in_document(y) if corpus.segment_context else scorers.pep8(y))

    return clean_code


def training_tokens_per_s(engine: Pretraining, target: ba.Target, warmup: int) -> float:
    """The median step's tokens/s in the fit's history, after the first ``warmup`` steps (the
    median, not the mean: a step that another job's burst slowed says nothing of the engine)."""
    return statistics.median(row["tokens_per_s"] for row in engine.fit(target).history[warmup:])


def interleaved(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each run's rate in each of ``repeats`` rounds, the runs alternating within a round."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            rates[name].append(run())
    return rates


def report(rates: dict[str, list[float]], unit: str, baseline: str) -> None:
    """Each run's median and range, and its ratio to ``baseline``: of the medians, and the
    median of the per-round ratios (the two agree when the load stayed steady)."""
    base = statistics.median(rates[baseline])
    print(f"{'':<26}{'median ' + unit:>18}{'min':>10}{'max':>10}"
          f"{'ratio of medians':>18}{'paired ratio':>14}   (to {baseline})")
    for name, values in rates.items():
        paired = statistics.median(v / b for v, b in zip(values, rates[baseline]))
        print(f"{name:<26}{statistics.median(values):>18.0f}{min(values):>10.0f}"
              f"{max(values):>10.0f}{statistics.median(values) / base:>18.3f}{paired:>14.3f}")


def training_throughput(args: argparse.Namespace, target: ba.Target, data_dir: Path) -> None:
    shared = {"preset": args.preset, "batch_size": args.batch_size, "block_size": args.block_size,
              "data_dir": str(data_dir), "progress": False, "eval_samples": 1,
              "max_new_tokens": 4, "seed": 0}
    engines = {objective: Pretraining(objective=objective, steps=args.steps, **shared)
               for objective in ("mle", "conditional")}
    for objective in engines:  # prepares each objective's data (cached in data_dir) untimed
        Pretraining(objective=objective, steps=1, **shared).fit(target)
    block, batch = engines["mle"].block_size, engines["mle"].batch_size
    print(f"(a) training: preset {args.preset}, {batch} blocks × {block} tokens per step, "
          f"{args.steps} steps per fit, first {args.warmup} dropped, {args.repeats} fits each")
    rates = interleaved({f"Pretraining[{name}]": (lambda e=engine: training_tokens_per_s(
        e, target, args.warmup)) for name, engine in engines.items()}, args.repeats)
    report(rates, "tokens/s", "Pretraining[mle]")


def scoring_throughput(args: argparse.Namespace, corpus: Corpus, target: ba.Target,
                       folder: Path) -> None:
    texts = corpus.segments
    batches = [texts[i:i + args.score_batch] for i in range(0, len(texts), args.score_batch)]
    scorer_id = scorer_identity(target, corpus)

    def no_cache() -> float:
        started = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                target.log_potential(corpus.sequences(batch), NO_CONTEXT)
        return len(texts) / (time.perf_counter() - started)

    def through(cache: ScoreCache) -> float:
        started = time.perf_counter()
        for batch in batches:
            score_segments(target, corpus, NO_CONTEXT, batch, cache)
        return len(texts) / (time.perf_counter() - started)

    caches: list[ScoreCache] = []

    def cold() -> float:
        caches.append(ScoreCache(folder / f"scores-{len(caches)}.sqlite", scorer_id))
        return through(caches[-1])

    no_cache()  # starts the scorer's worker processes
    print(f"(b) scoring: {len(texts)} lines ({len(set(texts))} distinct), batches of "
          f"{args.score_batch}, PEP8 target, {args.repeats} rounds")
    rates = interleaved({"no cache": no_cache, "cold cache": cold,
                         "warm cache": lambda: through(caches[-1])}, args.repeats)
    report(rates, "segments/s", "cold cache")


def context_scoring_throughput(args: argparse.Namespace, path: Path) -> None:
    in_file = Corpus(path, segment="line", segment_context=True)
    documents = list(in_file.documents())
    texts = [s for doc in documents for s in doc]
    where = [o for doc in documents for o in origins(doc)]
    spans = range(0, len(texts), args.score_batch)
    corpora = {"line alone (workers)": Corpus(path, segment="line"), "line in its file": in_file}

    def rate(corpus: Corpus) -> float:
        target = pep8_target(corpus)
        scorers.violations_per_line.cache_clear()
        started = time.perf_counter()
        with torch.no_grad():
            for i in spans:
                origin = where[i:i + args.score_batch] if corpus.segment_context else None
                target.log_potential(corpus.sequences(texts[i:i + args.score_batch], origin),
                                     NO_CONTEXT)
        return len(texts) / (time.perf_counter() - started)

    print(f"(c) PEP8 in context: {len(texts)} lines of {len(documents)} files, batches of "
          f"{args.score_batch}, no cache, {args.repeats} rounds")
    rates = interleaved({name: (lambda c=corpus: rate(c)) for name, corpus in corpora.items()},
                        args.repeats)
    report(rates, "segments/s", "line alone (workers)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "code-small"])
    parser.add_argument("--batch-size", type=int, default=16, help="blocks per step")
    parser.add_argument("--block-size", type=int, default=None, help="tokens per block (preset's)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed fit")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of a fit not timed")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--corpus-bytes", type=int, default=300_000)
    parser.add_argument("--score-batch", type=int, default=256, help="lines per scoring call")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--skip", choices=["training", "scoring"], help="run only the other part")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    # The Pareto-k̂ warning on 1 posterior sample is not the benchmark.
    warnings.filterwarnings("ignore", category=UserWarning)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}, Python {sysconfig.get_python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "corpus").mkdir()
        path = copy_stdlib_slice(Path(tmp) / "corpus", args.corpus_bytes)
        corpus = Corpus(path, segment="line")
        target = pep8_target(corpus)
        if args.skip != "training":
            training_throughput(args, target, Path(tmp) / "data")
        if args.skip != "scoring":
            scoring_throughput(args, corpus, target, Path(tmp))
            context_scoring_throughput(args, path)


if __name__ == "__main__":
    main()
