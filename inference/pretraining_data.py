"""Data for the PHF objectives (SPEC §5): a `Corpus` prior's segments scored by the target's
factor sites, thresholds from quantiles of those scores, and packed token + reward files.

A segment's score is ``R(y) = log L(y)``, the sum of the target's factor sites on the segment
(so the target declared once for DPG or Rejection also drives pretraining). Scores are cached
on disk (SQLite) keyed by the scorer's identity and the segment's content, so a re-run, or a
second objective on the same corpus, scores nothing twice. The token file is ``EOS d1 EOS d2 …``
(as ``bayesalign pretrain`` writes it) with, for conditional training, one control token before
each segment; a float32 file beside it holds each token's segment reward, and the same block
indices read both. With ``eval_every`` set, a corpus that is a training split (``split="train"``)
also gets its held-out complement's tokens (untagged, unscored: held-out loss is the corpus NLL).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bayesalign.errors import ConfigError
from bayesalign.models.corpus_prior import Corpus, origins, vocabulary_digest
from bayesalign.models.pretraining.presets import PRESETS
from bayesalign.models.pretraining.tokens import Blocks, batched, write_tokens
from bayesalign.models.tiny import train_tokenizer
from bayesalign.targets import Target

from .phf_objectives import tag_segments

if TYPE_CHECKING:
    from .pretraining import Pretraining

GOOD_TOKEN, BAD_TOKEN = "<|good|>", "<|bad|>"
_SQL_CHUNK = 500  # keys per SELECT … IN (…): below SQLite's variable limit


def scorer_identity(target: Target, corpus: Corpus) -> str:
    """A digest of what decides a segment's score: the model's code, its simple closure values
    (numbers, strings) and moment λ, and the corpus's encoding. Pass ``scorer_id`` to the engine
    when the scores change without these changing (a retrained reward model)."""
    model = target.model
    try:
        source = inspect.getsource(model)
    except (OSError, TypeError):
        source = getattr(model, "__qualname__", repr(model))
    cells = [c.cell_contents for c in (getattr(model, "__closure__", None) or ())]
    simple = [c if isinstance(c, (int, float, str, bool, tuple)) else type(c).__name__
              for c in cells]
    identity = [target.name, source, repr(simple), repr(sorted(target.lambdas.items())),
                corpus.fingerprint()["encoding"]]
    return hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()[:24]


class ScoreCache:
    """Segment scores on disk, keyed by (scorer identity, SHA-256 of the segment's text and,
    for a corpus with ``segment_context``, of its document and offset)."""

    def __init__(self, path: str | Path, scorer_id: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.scorer_id = scorer_id
        with self._open() as db:
            db.execute("PRAGMA journal_mode=WAL")  # stored in the file: set once
            db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, score REAL)")

    @contextmanager
    def _open(self) -> Iterator[sqlite3.Connection]:
        """One transaction, then close. WAL with synchronous=NORMAL keeps the file consistent
        after a crash without an fsync per commit, which made a cold cache ~25% slower than none."""
        db = sqlite3.connect(self.path)
        try:
            db.execute("PRAGMA synchronous=NORMAL")
            with db:
                yield db
        finally:
            db.close()

    def key(self, text: str, origin: tuple[str, int] | None = None) -> str:
        where = "" if origin is None else f"{_text_digest(origin[0])}\0{origin[1]}\0"
        return hashlib.sha256(f"{self.scorer_id}\0{where}{text}".encode()).hexdigest()

    def get(self, keys: list[str]) -> dict[str, float]:
        found: dict[str, float] = {}
        with self._open() as db:
            for start in range(0, len(keys), _SQL_CHUNK):
                chunk = keys[start:start + _SQL_CHUNK]
                marks = ",".join("?" * len(chunk))
                found.update(db.execute(f"SELECT key, score FROM scores WHERE key IN ({marks})",
                                        chunk).fetchall())
        return found

    def put(self, items: dict[str, float]) -> None:
        with self._open() as db:
            db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?)", items.items())


def score_segments(target: Target, corpus: Corpus, context: Any, texts: list[str],
                   cache: ScoreCache, origin: list[tuple[str, int]] | None = None
                   ) -> tuple[list[float], int]:
    """``log L`` of each segment (cached ones read, the others scored and stored); also how
    many were scored now. ``origin``: each segment's (document, offset), for a corpus with
    ``segment_context``."""
    origin = origin if corpus.segment_context else None
    where = origin or [None] * len(texts)
    keys = [cache.key(t, o) for t, o in zip(texts, where)]
    known = cache.get(keys)
    missing = list(dict.fromkeys(k for k in keys if k not in known))
    if missing:
        row_of = {k: i for i, k in enumerate(keys)}
        rows = [row_of[k] for k in missing]
        batch = corpus.sequences([texts[i] for i in rows],
                                 None if origin is None else [origin[i] for i in rows])
        with torch.no_grad():
            scores = target.log_potential(batch, context)
        fresh = dict(zip(missing, scores.double().cpu().tolist()))
        cache.put(fresh)
        known.update(fresh)
    return [known[k] for k in keys], len(missing)


@dataclass(frozen=True)
class PreparedData:
    """A prepared data folder: tokenizer, ``tokens.bin``, ``rewards.bin`` and ``meta.json``."""

    folder: Path
    tokenizer: Any
    meta: dict

    def blocks(self, block_size: int, seed: int) -> Blocks:
        return Blocks(self.folder / "tokens.bin", np.dtype(self.meta["dtype"]), block_size, seed)

    def heldout_blocks(self, block_size: int) -> Blocks | None:
        """The held-out complement's blocks, for a corpus that is a training split (else None)."""
        if "heldout" not in self.meta:
            return None
        return Blocks(self.folder / "heldout.bin", np.dtype(self.meta["dtype"]), block_size)

    def batch(self, blocks: Blocks, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and per-token rewards of the blocks at training positions ``first …``."""
        rewards = np.memmap(self.folder / "rewards.bin", dtype=np.float32, mode="r")
        indices = blocks.indices(first, size)
        width = blocks.block_size
        rows = np.stack([rewards[i * width:(i + 1) * width + 1] for i in indices])
        return blocks.rows(indices), torch.from_numpy(rows.astype(np.float32))


def prepare(config: Pretraining, target: Target, corpus: Corpus, context: Any,
            tokenizer: Any | None) -> PreparedData:
    """Score, threshold, tag and pack ``corpus`` for ``config.objective`` into a folder keyed by
    everything that decides its content; an existing folder is reused, a new one written then
    renamed. ``tokenizer`` None: a byte-level BPE of the preset's size trained on the corpus."""
    scorer_id = config.scorer_id or scorer_identity(target, corpus)
    identity = {"format": 2, "corpus": corpus.fingerprint(), "scorer": scorer_id,
                "tokenizer": None if tokenizer is None else vocabulary_digest(tokenizer),
                **{k: getattr(config, k) for k in ("objective", "threshold_quantile",
                                                   "drop_token_fraction", "unlikelihood_mode",
                                                   "preset", "seed")},
                "heldout": corpus.split == "train" and config.eval_every is not None}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(config.data_dir)
    folder = root / f"{config.objective}-{digest}"
    if not folder.exists():
        cache = ScoreCache(config.score_cache or root / "scores.sqlite", scorer_id)
        tmp = root / f".tmp-{folder.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            if tokenizer is None:
                tokenizer = train_tokenizer(("".join(d) for d in corpus.documents()),
                                            PRESETS[config.preset].vocab_size)
            else:
                tokenizer = copy.deepcopy(tokenizer)  # control tokens are added to a copy
            if config.objective == "conditional":
                tokenizer.add_special_tokens({"additional_special_tokens": [GOOD_TOKEN, BAD_TOKEN]})
            meta = _write(config, target, corpus, context, tokenizer, cache, tmp)
            meta.update(identity=identity, scorer_id=scorer_id)
            tokenizer.save_pretrained(str(tmp))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return PreparedData(folder, loaded, json.loads((folder / "meta.json").read_text()))


def _write(config: Pretraining, target: Target, corpus: Corpus, context: Any, tokenizer: Any,
           cache: ScoreCache, folder: Path) -> dict:
    """Two streamed passes: score every segment, then write tokens and rewards."""
    scores: list[float] = []
    lengths: list[int] = []  # segments per document
    scored = 0
    for batch in batched(corpus.documents(), max(1, config.score_batch_size // 8)):
        texts = [s for doc in batch for s in doc]
        where = [o for doc in batch for o in origins(doc)] if corpus.segment_context else None
        values, new = score_segments(target, corpus, context, texts, cache, where)
        scores += values
        scored += new
        lengths += [len(doc) for doc in batch]
    if not scores:
        raise ConfigError(f"Corpus {corpus.source.name}: no segment has any text")
    meta = {"segments": len(scores), "documents": len(lengths), "segments_scored_now": scored,
            "score_mean": _finite_mean(scores), "score_min": min(scores), "score_max": max(scores)}
    bounds = np.cumsum([0, *lengths])
    # A document's score is its segments' mean (−inf if one is −inf), as PHF's avg_score.
    doc_scores = [float(np.mean(scores[a:b])) for a, b in zip(bounds, bounds[1:])]
    threshold = _threshold(config, scores, doc_scores, meta)
    dtype = np.dtype(np.uint16 if len(tokenizer) <= 2**16 else np.uint32)
    eos = tokenizer.eos_token_id
    ids = tokenizer.convert_tokens_to_ids
    control = (ids(GOOD_TOKEN), ids(BAD_TOKEN)) if config.objective == "conditional" else None
    generator = torch.Generator().manual_seed(config.seed)  # which segments lose their tag
    count = {"tokens": 1, "documents_kept": 0, "control_tokens": 0}
    with (folder / "tokens.bin").open("wb") as tok, (folder / "rewards.bin").open("wb") as rew:
        np.array([eos], dtype=dtype).tofile(tok)
        np.zeros(1, dtype=np.float32).tofile(rew)
        for doc, first, doc_score in zip(corpus.documents(), bounds, doc_scores):
            if config.objective == "filtering" and not doc_score >= threshold:
                continue
            rewards = scores[first:first + len(doc)]
            # A corpus may contain "<|good|>" or "<|endoftext|>" as text: encode it as text.
            encoded = tokenizer(doc, add_special_tokens=False,
                                split_special_tokens=True)["input_ids"]
            if control is not None:
                tokens = tag_segments(encoded, rewards, threshold=threshold,
                                      good_token_id=control[0], bad_token_id=control[1],
                                      drop_token_fraction=config.drop_token_fraction,
                                      generator=generator)
                count["control_tokens"] += len(tokens) - sum(map(len, encoded))
                per_token = _segment_rewards(tokens, control, encoded, rewards)
            else:
                tokens = [t for seg in encoded for t in seg]
                per_token = [r for seg, r in zip(encoded, rewards) for _ in seg]
            np.array([*tokens, eos], dtype=dtype).tofile(tok)
            np.array([*per_token, rewards[-1]], dtype=np.float32).tofile(rew)
            count["tokens"] += len(tokens) + 1
            count["documents_kept"] += 1
    if count["documents_kept"] == 0:
        raise ConfigError(f"{config.objective}: no document passes the threshold {threshold}")
    if corpus.split == "train" and config.eval_every is not None:
        texts = ("".join(doc) for doc in corpus.heldout().documents())
        count["heldout"] = write_tokens(texts, tokenizer, folder / "heldout.bin", dtype)
        if count["heldout"]["documents"] == 0:
            raise ConfigError(f"--corpus {corpus.source.name}: the heldout split has no text; "
                              "add files or change --heldout-fraction")
    return {**meta, **count, "threshold": threshold, "dtype": dtype.name,
            "vocab_size": len(tokenizer)}


def _threshold(config: Pretraining, scores: list[float], doc_scores: list[float],
               meta: dict) -> float | None:
    """The absolute threshold at ``threshold_quantile`` of the scores (of documents for
    filtering, which keeps whole documents); refused when it cannot separate good from bad."""
    hard = config.objective in ("filtering", "conditional") or (
        config.objective == "unlikelihood" and config.unlikelihood_mode == "hard")
    if config.objective == "awr" and not np.isfinite(scores).all():
        raise ConfigError("awr regresses a value on the scores, and some segments score -inf "
                          "(a constraint); use rwr, filtering or conditional for constraints")
    if config.objective == "unlikelihood" and not hard and not all(-1 <= s <= 0 for s in scores):
        raise ConfigError("unlikelihood_mode='soft' weighs tokens by 1 + R, so every segment "
                          f"score must lie in [-1, 0]; found [{min(scores)}, {max(scores)}]")
    if not hard:
        return None
    unit, values = ("document", doc_scores) if config.objective == "filtering" else ("segment", scores)
    if min(values) == max(values):
        raise ConfigError(f"every one of the {len(values)} {unit}s scores {values[0]}: a threshold "
                          "cannot separate good from bad (degenerate). Check the target's factor "
                          "sites, or use objective 'mle' or 'rwr'")
    # "lower": the threshold is a score that occurs, so -inf (a failed constraint) is allowed.
    threshold = float(np.quantile(values, config.threshold_quantile, method="lower"))
    good = float(np.mean(np.asarray(values) >= threshold))
    if good in (0.0, 1.0):
        raise ConfigError(f"threshold_quantile {config.threshold_quantile} gives threshold "
                          f"{threshold}, which puts every {unit} on one side (ties); choose "
                          "another quantile")
    meta.update(threshold_unit=unit, fraction_good=good)
    return threshold


def _segment_rewards(tokens: list[int], control: tuple[int, int], encoded: list[list[int]],
                     rewards: list[float]) -> list[float]:
    """Each token's segment reward in a tagged stream (a control token belongs to its segment)."""
    out: list[float] = []
    for seg, reward in zip(encoded, rewards):
        if len(out) < len(tokens) and tokens[len(out)] in control:
            out.append(reward)
        out += [reward] * len(seg)
    return out


@functools.lru_cache(maxsize=256)  # a document's segments share one string: hash it once
def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _finite_mean(values: list[float]) -> float | None:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else None
