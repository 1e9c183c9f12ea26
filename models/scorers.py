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
import io
import warnings
from typing import Any

import pycodestyle
import torch

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


_STYLE = pycodestyle.StyleGuide()  # pycodestyle's defaults, as PHF ran it; reads no config file


def pep8_violation_count(text: str) -> int:
    """pycodestyle violations in one text, with PHF's settings (pycodestyle's defaults).

    Unlike PHF, a missing final newline is added first: samples cut at a token limit would all
    get W292. Syntax pycodestyle cannot tokenize counts as E901, not an exception.
    """
    lines = io.StringIO(text, newline=None).readlines()  # universal newlines, as on reading a file
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    checker = pycodestyle.Checker(lines=lines, options=_STYLE.options, report=_ViolationCount(_STYLE.options))
    return checker.check_all()


_PARSE_FAILURES = (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError)


def _parses(text: str) -> bool:
    try:
        with warnings.catch_warnings():  # invalid escapes warn on stderr for every sample
            warnings.simplefilter("ignore")
            ast.parse(text)
    except _PARSE_FAILURES:  # ValueError: NUL bytes; the others: nesting too deep for the parser
        return False
    return True


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
