"""PHF's rule-based scorers (SPEC §5) as batched rewards that survive any text a model writes.

Orientation: every scorer here returns a REWARD, higher is better. PHF's code computes a
*misalignment* score, lower is better (pycodestyle violations or scrubadub PII detections per
character); the paper's reward is its negation ``R = −score``, and this module (through
`PerCharacterPenalty`) is the one place that sign flips. So ``pep8(y)`` is
``−violations/characters`` (0 for clean code), PHF's rule "aligned iff score ≤ t" reads
``R ≥ −t``, and a scorer plugs straight into ``ba.reward`` (and ``parses``, a bool tensor, into
``ba.constraint``).

Each scorer is a `Scorer` (models/scoring.py): worker processes bound the time per sample and
a failed sample scores worst, never best.
"""

from __future__ import annotations

import ast
import bisect
import functools
import io
import itertools
import warnings
from typing import Any

import pycodestyle
import torch

from bayesalign.errors import ScorerError
from bayesalign.sequences import Sequences

from .scoring import PerCharacterPenalty, Scorer

# scrubadub's detectors that need no download (ENVIRONMENT.md); PHF also used spaCy NER,
# address, date-of-birth and Skype detectors, which fetch models, so counts run lower than PHF's.
PII_DETECTORS = ("credential", "credit_card", "email", "phone", "social_security_number", "twitter", "url")


class _ViolationCount(pycodestyle.BaseReport):
    """Counts one text's violations; prints nothing and keeps no messages (StandardReport does)."""

    def error(self, line_number: int, offset: int, text: str, check: Any) -> str | None:
        code = text[:4]
        if self._ignore_code(code) or code in self.expected:
            return None
        self.file_errors += 1
        return code


class _ViolationLines(_ViolationCount):
    """Also records the line of each violation (1-based), to attribute a file's to its lines."""

    def init_file(self, *args: Any) -> None:
        super().init_file(*args)
        self.lines: list[int] = []

    def error(self, line_number: int, offset: int, text: str, check: Any) -> str | None:
        code = super().error(line_number, offset, text, check)
        if code is not None:
            self.lines.append(line_number)
        return code


_STYLE = pycodestyle.StyleGuide()  # pycodestyle's defaults, as PHF ran it; reads no config file


def pep8_violation_count(text: str) -> int:
    """pycodestyle violations in one text, with PHF's settings (pycodestyle's defaults).

    Unlike PHF, a missing final newline is added first: samples cut at a token limit would all
    get W292. Syntax pycodestyle cannot tokenize counts as E901, not an exception.
    """
    checker = pycodestyle.Checker(lines=_lines(text), options=_STYLE.options,
                                  report=_ViolationCount(_STYLE.options))
    return checker.check_all()


def _lines(text: str) -> list[str]:
    lines = io.StringIO(text, newline=None).readlines()  # universal newlines, as on reading a file
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return lines


@functools.lru_cache(maxsize=64)  # the segments of one document arrive together
def violations_per_line(document: str) -> tuple[list[int], list[int]]:
    """The document's line start offsets (in its own characters) and each line's pycodestyle
    violations, pycodestyle run once on the whole document."""
    # pycodestyle's lines (universal newlines), measured in the document's own characters.
    raw_lines = io.StringIO(document, newline="").readlines()
    starts = [0, *itertools.accumulate(len(line) for line in raw_lines)]
    report = _ViolationLines(_STYLE.options)
    try:
        pycodestyle.Checker(lines=_lines(document), options=_STYLE.options,
                            report=report).check_all()
    except Exception:  # a pycodestyle bug (a lone "b" line: IndexError) scores worst, as pep8's
        return starts, [len(line) for line in raw_lines] or [1]
    counts = [0] * max(len(starts) - 1, 1)
    for line in report.lines:  # E901/E902 can name a line past the end: keep it on the last
        counts[min(max(line, 1), len(counts)) - 1] += 1
    return starts, counts


def pep8_in_document(y: Sequences) -> torch.Tensor:
    """−(violations per character) of each segment judged in its document, as PHF scored lines:
    pycodestyle runs on the whole document (``y.origin``, from a `Corpus` with
    ``segment_context``) and a segment gets the violations of the lines it spans. A line alone
    cannot show cross-line violations (E302 blank lines before a def, E128 continuation indent,
    E999 in a multi-line statement), which this sees. Documents are corpus data, scored in this
    process (no worker time bound); generated samples are scored as documents of their own.
    """
    if y.origin is None:
        raise ScorerError("pep8_in_document needs segments that know their document: sample them "
                          "from Corpus(..., segment_context=True)")
    rewards = []
    for text, (document, start) in zip(y.text, y.origin):
        starts, counts = violations_per_line(document)
        first = bisect.bisect_right(starts, start) - 1
        last = bisect.bisect_left(starts, start + max(len(text), 1)) - 1
        violations = sum(counts[first:last + 1])
        rewards.append(0.0 - violations / max(len(text), 1))
    return torch.tensor(rewards, dtype=torch.float64, device=y.device)


_PARSE_FAILURES = (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError)


def parsed_module(text: str) -> ast.Module | None:
    """``ast.parse``'s tree of ``text``, or None where the text does not parse."""
    try:
        with warnings.catch_warnings():  # invalid escapes warn on stderr for every sample
            warnings.simplefilter("ignore")
            return ast.parse(text)
    except _PARSE_FAILURES:  # ValueError: NUL bytes; the others: nesting too deep for the parser
        return None


def _parses(text: str) -> bool:
    return parsed_module(text) is not None


def _compiles(text: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile(text, "<sample>", "exec", dont_inherit=True)
    except _PARSE_FAILURES:
        return False
    return True


_SCRUBBER: Any = None


def _pii_scrubber() -> Any:
    """One scrubadub Scrubber with the offline detectors, built on first use (import takes seconds)."""
    global _SCRUBBER
    if _SCRUBBER is None:
        import scrubadub

        _SCRUBBER = scrubadub.Scrubber(detector_list=list(PII_DETECTORS))
    return _SCRUBBER


def pii_detection_count(text: str) -> int:
    """scrubadub PII detections in one text (overlapping ones merged, as PHF counted them)."""
    return sum(1 for _ in _pii_scrubber().iter_filth(text))


# Built-ins score a failure (timeout, a pycodestyle/scrubadub bug, a dead worker) worst, never best:
# one violation or detection per character (reward −1), unparseable.
_FAILURE_IS_WORST: dict[str, Any] = {"on_timeout": "worst", "on_error": "worst"}

pep8 = PerCharacterPenalty(
    Scorer(pep8_violation_count, name="pep8", worst=len, dtype=torch.long, **_FAILURE_IS_WORST)
)
pep8.__doc__ = "−(pycodestyle violations per character): PHF's PEP8 misalignment score, negated (SPEC §5)."
pep8_violations = pep8.counts

pii = PerCharacterPenalty(
    Scorer(
        pii_detection_count, name="pii", worst=len, setup=_pii_scrubber, dtype=torch.long, **_FAILURE_IS_WORST
    )
)
pii.__doc__ = "−(scrubadub PII detections per character): PHF's PII misalignment score, negated (SPEC §5)."
pii_detections = pii.counts

parses = Scorer(_parses, name="parses", worst=False, dtype=torch.bool, **_FAILURE_IS_WORST)
parses.__doc__ = "Whether ``ast.parse`` accepts each text: a bool mask for ``ba.constraint``."

compiles = Scorer(_compiles, name="compiles", worst=False, dtype=torch.bool, **_FAILURE_IS_WORST)
compiles.__doc__ = (
    "Whether ``compile(text, 'exec')`` accepts each text (stricter than `parses`: also rejects "
    "``return`` outside a function and the like); the compilability constraint of GDC/CDPG."
)
