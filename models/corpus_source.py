"""Where a corpus's text comes from: which files, which of them are held out, and their documents.

The one corpus source of the `Corpus` prior (``corpus_prior.py``), and so of ``bayesalign
pretrain``, whose MLE run is `Pretraining` on a `Corpus` target. A corpus is the running
interpreter's standard library (tests excluded), local ``.py`` /
``.txt`` / ``.json`` / ``.jsonl`` files or a folder of them, or a dataset saved with
``save_to_disk``. The held-out split is by file, so held-out loss measures generalisation to
unseen modules rather than to unseen lines of seen ones; one file or a saved dataset has no
files to hold out, so there the unit is the record (a row, a paragraph, a Python segment).

Text is read with ``datasets.load_dataset(..., streaming=True)``: tokenisation is a sequential
pass, so streaming reads each file once, writes no Arrow copy of the corpus into the user's
cache, and works for corpora larger than memory; the random access training needs is served by
the token file that pass writes (``pretraining/tokens.py``).
"""

from __future__ import annotations

import ast
import hashlib
import random
import shutil
import sys
import sysconfig
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bayesalign.errors import ConfigError

# Suffix → the ``datasets`` builder that reads it.
LOADERS = {".py": "text", ".txt": "text", ".json": "json", ".jsonl": "json"}
TEXT_COLUMNS = ("text", "content")  # a JSON record's text, in order of preference
_SNIFF_BYTES = 8192
_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
NOT_STDLIB = {"test", "tests", "idle_test", "site-packages", "dist-packages"}  # folders left out


@dataclass(frozen=True)
class CorpusSource:
    """Text files to pretrain on, or a saved ``datasets`` dataset; ``name`` is what cards cite."""

    name: str
    files: tuple[Path, ...] = ()
    dataset_dir: Path | None = None

    @property
    def split_unit(self) -> str:
        """What the held-out split draws: whole files when there are several, else records."""
        return "file" if len(self.files) > 1 else "record"

    def fingerprint(self) -> dict:
        """Enough to notice that the corpus changed since its tokens were written."""
        return {"corpus": self.name, "corpus_files": len(self.files),
                "corpus_bytes": sum(f.stat().st_size for f in self.files)}


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library sources, tests excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        path for path in root.rglob("*.py")
        if not (NOT_STDLIB & set(path.relative_to(root).parts[:-1]))
        and not path.name.startswith("test_")
    )


def copy_stdlib_slice(folder: Path, max_bytes: int) -> Path:
    """Standard-library modules (a seeded choice, ``max_bytes`` in all) copied into ``folder``:
    a small real corpus for tests and benchmarks."""
    files = stdlib_files()
    random.Random(0).shuffle(files)
    total = 0
    for i, path in enumerate(files):
        if total + path.stat().st_size <= max_bytes:
            shutil.copy(path, folder / f"{i:04d}_{path.name}")
            total += path.stat().st_size
    return folder


def find_corpus(path: str | Path | None) -> CorpusSource:
    """The corpus at ``path`` (``None``: the standard library); ``ConfigError`` if it has no text."""
    if path is None:
        root = sysconfig.get_paths()["stdlib"]
        name = f"Python {sys.version.split()[0]} standard library ({root}), tests excluded"
        return CorpusSource(name, tuple(stdlib_files()))
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise ConfigError(f"--corpus {path}: no such file or folder")
    if path.is_dir() and any((path / marker).exists() for marker in _DATASET_MARKERS):
        return CorpusSource(str(path), dataset_dir=path)
    if path.is_dir():
        candidates = sorted(p for p in path.rglob("*") if p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
    else:
        candidates = [path]
    files = tuple(p for p in candidates if p.suffix in LOADERS and _is_text(p))
    if not files:
        raise ConfigError(
            f"--corpus {path}: no usable text ({len(candidates)} file(s), none a non-empty "
            f"{'/'.join(LOADERS)} text file); pass a folder of such files or a dataset saved "
            "with save_to_disk"
        )
    return CorpusSource(str(path), files)


def _is_text(path: Path) -> bool:
    """Non-empty and without NUL bytes at its start (binary files and UTF-16 have them)."""
    with path.open("rb") as f:
        head = f.read(_SNIFF_BYTES)
    return bool(head.strip()) and b"\0" not in head


def split_files(files: Sequence[Path], seed: int, heldout_fraction: float) -> dict[str, list[Path]]:
    """A seeded, order-independent choice of held-out files (at least one; at least one left)."""
    order = sorted(files)
    random.Random(seed).shuffle(order)
    count = min(max(1, round(heldout_fraction * len(order))), len(order) - 1)
    return {"train": sorted(order[count:]), "heldout": sorted(order[:count])}


def is_heldout_record(seed: int, index: int, heldout_fraction: float) -> bool:
    """A record's side of the split from a hash of (seed, index): no count needed to stream."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


def documents(corpus: CorpusSource, part: str, seed: int, heldout_fraction: float,
              segment_python: bool = True) -> Iterator[str]:
    """Stream the documents of the ``part`` ("train" or "heldout") split of ``corpus``."""
    if corpus.split_unit == "file":
        files = split_files(corpus.files, seed, heldout_fraction)[part]
        for suffixes in ((".py",), (".txt",), (".json", ".jsonl")):
            group = [f for f in files if f.suffix in suffixes]
            for text in _stream(group, corpus.name):
                yield from _documents(text, suffixes[0], segment_python, whole=True)
        return
    if corpus.dataset_dir is not None:
        records = _stream_saved(corpus.dataset_dir)
    else:
        suffix = corpus.files[0].suffix
        records = (doc for text in _stream(list(corpus.files), corpus.name)
                   for doc in _documents(text, suffix, segment_python, whole=False))
    for index, text in enumerate(records):
        if is_heldout_record(seed, index, heldout_fraction) == (part == "heldout"):
            yield text


def _stream(files: list[Path], corpus_name: str) -> Iterator[str]:
    """Each file's text (``.py``/``.txt``) or each JSON record's text, streamed by ``datasets``."""
    if not files:
        return
    import datasets

    builder = LOADERS[files[0].suffix]
    options = {"sample_by": "document", "encoding_errors": "replace"} if builder == "text" else {}
    stream = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                   streaming=True, **options)
    for example in stream:
        yield _text_of(example, corpus_name)


def _stream_saved(dataset_dir: Path) -> Iterator[str]:
    import datasets

    dataset = datasets.load_from_disk(str(dataset_dir))
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset and len(dataset) != 1:
            raise ConfigError(f"--corpus {dataset_dir}: a DatasetDict needs a 'train' split, "
                              f"found {sorted(dataset)}")
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    for example in dataset.to_iterable_dataset():
        yield _text_of(example, str(dataset_dir))


def _text_of(example: dict, corpus_name: str) -> str:
    for column in TEXT_COLUMNS:
        if isinstance(example.get(column), str):
            return example[column]
    raise ConfigError(f"--corpus {corpus_name}: a record has no string column named "
                      f"{' or '.join(TEXT_COLUMNS)} (columns: {sorted(example)})")


def _documents(text: str, suffix: str, segment_python: bool, whole: bool) -> list[str]:
    """A file's documents: Python segments, or the text itself (its paragraphs as records)."""
    if suffix == ".py" and segment_python:
        return python_segments(text)
    if suffix == ".txt" and not whole:
        return [p for p in text.split("\n\n") if p.strip()]
    return [text] if text.strip() else []


def python_segments(source: str) -> list[str]:
    """Top-level ``def``/``class`` blocks (with decorators and the comments just above) and the
    runs of statements between them.

    Training on segments separated by EOS teaches the model where complete top-level code ends,
    so unconditional samples are whole definitions that can parse, not 300-line files cut off
    mid-docstring. Source that does not parse stays one document.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old sources
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return [source] if source.strip() else []
    lines = source.splitlines(keepends=True)
    cuts = {0, len(lines)}
    previous_end = 0
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
            while start > previous_end and lines[start - 1].lstrip().startswith("#"):
                start -= 1
            cuts |= {start, node.end_lineno}
            previous_end = node.end_lineno
    bounds = sorted(cuts)
    segments = ("".join(lines[a:b]).strip("\n") for a, b in zip(bounds, bounds[1:]))
    return [segment + "\n" for segment in segments if segment.strip()]
