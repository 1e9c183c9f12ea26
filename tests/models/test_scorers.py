"""PHF scorers (SPEC §5): reward orientation, known counts, and bounded time on garbage text."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import sys
import time

import pytest
import torch

from bayesalign.errors import BayesAlignError, ConfigError, ScorerError, ScorerTimeoutError
from bayesalign.models import scorers
from bayesalign.models.corpus_prior import origins
from bayesalign.models.scoring import Scorer
from bayesalign.sequences import Sequences


@pytest.fixture(autouse=True, scope="module")
def no_network():
    """Scrubadub must work offline: any connection attempt fails loudly (workers inherit this)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a scorer tried to reach the network")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        patch.setattr(socket, "getaddrinfo", refuse)
        yield


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("x = 1\n", 0),
        ("x=1\n", 1),  # E225
        ("import os, sys\n", 1),  # E401
        ("if True:\n\tx = 1\n", 1),  # W191: tab indentation
        ("x = '" + "a" * 80 + "'\n", 1),  # E501: 86 > 79 characters
        ("x = 1  \n", 1),  # W291: trailing whitespace
        ("def f():\n    return 1\ndef g():\n    return 2\n", 1),  # E302
        ("x = 1", 0),  # the missing final newline is added, not counted (W292)
        ("", 0),
        ("def f(:\n", 1),  # E901: pycodestyle reports what it cannot tokenize
    ],
)
def test_pep8_violation_counts(text, count):
    assert scorers.pep8_violations([text]) == [count]


def test_pep8_is_a_reward_per_character():
    clean, dirty, dirtier = "x = 1\n", "x=1\n", "x=1;y=2\n"
    reward = scorers.pep8([clean, dirty, dirtier, ""])
    assert reward.dtype == torch.float64 and reward.shape == (4,)
    assert reward[0] == 0 and not torch.signbit(reward[0])  # 0.0, not −0.0
    assert reward[1] == -1 / len(dirty)
    assert reward[0] > reward[1] > reward[2]
    assert reward[3] == 0


def test_pep8_in_document_gives_each_segment_the_violations_of_its_lines():
    segments = ["import os\n", "def f():\n", "    return 1\n", "x=1\n"]
    y = Sequences(tokens=torch.zeros(4, 1, dtype=torch.long), _text=segments,
                  origin=origins(segments))
    # In the file: E302 on the def (no 2 blank lines), E305 and E225 on 'x=1' (3 in all, as
    # pycodestyle counts the whole file). Alone, the def line is clean and the indented return
    # is E113 (unexpected indentation): isolated lines get both wrong.
    assert scorers.pep8_in_document(y).tolist() == [0.0, -1 / 9, 0.0, -2 / 4]
    assert scorers.pep8_violations(["".join(segments)]) == [3]
    assert scorers.pep8_violations(segments) == [0, 0, 1, 1]
    with pytest.raises(ScorerError, match="segment_context=True"):
        scorers.pep8_in_document(Sequences(tokens=torch.zeros(1, 1, dtype=torch.long), _text=["x"]))


def test_a_document_pycodestyle_crashes_on_scores_worst():
    """pycodestyle raises IndexError on a lone string-prefix line ("b"); the segment then gets
    one violation per character (reward −1, pep8's worst), never a clean score."""
    segments = ["b\n"]
    y = Sequences(tokens=torch.zeros(1, 1, dtype=torch.long), _text=segments,
                  origin=origins(segments))
    assert scorers.pep8_in_document(y).tolist() == [-1.0]


def test_parses_and_compiles():
    texts = ["def f(x):\n    return x + 1\n", "def f(:\n", "x = 1\x00\n", "return 1\n", ""]
    assert scorers.parses(texts).tolist() == [True, False, False, True, True]
    # compile() also rejects what only the compiler checks (`return` outside a function).
    assert scorers.compiles(texts).tolist() == [True, False, False, False, True]
    assert scorers.parses("x = 1").dtype == torch.bool


def test_pii_detects_contact_details_not_clean_text():
    texts = ["write to jane.doe@example.com", "call 415-555-0132 today", "see https://example.com/a", "cats"]
    assert scorers.pii_detections(texts) == [1, 1, 1, 0]
    reward = scorers.pii(texts)
    assert (reward[:3] < 0).all() and reward[3] == 0
    assert reward[0] == -1 / len(texts[0])


def test_sequences_are_scored_through_their_decoder():
    vocab = ["x", "=", " ", "1", "\n"]
    tokens = torch.tensor([[0, 2, 1, 2, 3, 4], [0, 1, 3, 4, 4, 4]])
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])

    def decode(rows):
        return ["".join(vocab[t] for t in row) for row in rows]

    y = Sequences(tokens, mask, decoder=decode)
    assert scorers.pep8(y).tolist() == scorers.pep8(["x = 1\n", "x=1\n"]).tolist()
    assert scorers.parses(y).tolist() == [True, True]
    with pytest.raises(ScorerError, match="decoder"):
        scorers.pep8(Sequences(tokens, mask))


def test_inputs_are_a_str_or_a_list_of_str():
    assert scorers.pep8_violations("x=1\n") == [1]
    assert scorers.pep8([]).shape == (0,)
    with pytest.raises(ScorerError, match="sample 1 is a int"):
        scorers.pep8(["x = 1\n", 3])


def _garbage() -> dict[str, str]:
    rng = random.Random(0)
    return {
        "binary": bytes(rng.getrandbits(8) for _ in range(20_000)).decode("utf-8", errors="replace"),
        "nul bytes": "x = 1\x00\ny = 2\n" * 100,
        "1 MB of code": "def f(a,b):\n    return a+b\n" * 40_000,
        "nested brackets": "(" * 100_000,
        "deep expression": "x = " + "1+" * 100_000 + "1\n",
        "deep unary": "x = " + "-" * 100_000 + "1\n",
        "unterminated triple quote": 'x = """abc\n' * 3,
        "unterminated string": "x = 'abc\n",
        "1 MB line": "x = " + "a" * 1_000_000 + "\n",
        "digits": "".join(rng.choice("0123456789 -+()") for _ in range(100_000)),
        "lone surrogate": "x = '\ud800'\n",
    }


@pytest.mark.parametrize("name", ["pep8", "pii", "parses", "compiles"])
def test_garbage_gets_a_score_within_the_time_bound(name):
    texts = list(_garbage().values())
    scorer = getattr(scorers, name)
    start = time.monotonic()
    values = scorer(texts)
    elapsed = time.monotonic() - start
    assert values.shape == (len(texts),)
    assert not values.double().isnan().any()
    # Each sample is cut to max_chars and bounded by the 2 s timeout; 10 s covers scrubadub's import.
    assert elapsed < 10 + 2 * len(texts)


def _slow_on_backtracking(text: str) -> float:
    # Catastrophic backtracking runs in C: no signal can interrupt it, only killing the process.
    return float(re.match(r"(a+)+$", text) is not None) if text.startswith("a") else float(len(text))


def test_a_sample_past_the_timeout_is_killed_and_scored_worst():
    scorer = Scorer(_slow_on_backtracking, timeout=0.3, on_timeout="worst", worst=-1.0, workers=1)
    texts = ["xx", "a" * 60 + "b", "xyz"]
    start = time.monotonic()
    assert scorer(texts).tolist() == [2.0, -1.0, 3.0]
    assert time.monotonic() - start < 5
    assert scorer(["xyzw"]).tolist() == [4.0]  # the replacement worker answers in order
    scorer.close()


def test_a_timeout_can_raise_naming_the_sample():
    scorer = Scorer(_slow_on_backtracking, timeout=0.3)
    with pytest.raises(ScorerTimeoutError, match="sample 1 .*timeout=0.3") as caught:
        scorer(["xx", "a" * 60 + "b"])
    assert isinstance(caught.value, BayesAlignError)
    scorer.close()


class _Interrupted(Exception):
    pass


def _interrupt(signum, frame):
    raise _Interrupted


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs SIGALRM")
def test_an_interrupted_call_leaves_no_stale_answers():
    scorer = Scorer(_slow_on_backtracking, timeout=5.0)
    previous = signal.signal(signal.SIGALRM, _interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(_Interrupted):
            scorer(["xx", "a" * 60 + "b", "xyz"])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert scorer(["xyzw", "y"]).tolist() == [4.0, 1.0]
    scorer.close()


def _fails_on_boom(text: str) -> float:
    if text == "boom":
        raise ValueError("cannot score this")
    if text == "exit":
        os._exit(3)
    return float("nan") if text == "nan" else float(len(text))


@pytest.mark.parametrize("timeout", [2.0, None], ids=["workers", "in-process"])
def test_a_failing_function_raises_naming_the_sample(timeout):
    scorer = Scorer(_fails_on_boom, timeout=timeout)
    with pytest.raises(ScorerError, match="sample 2 .*ValueError: cannot score this"):
        scorer(["a", "bb", "boom"])
    with pytest.raises(ScorerError, match="sample 0 .*NaN"):
        scorer(["nan"])
    scorer.close()


def test_a_dead_worker_is_an_error_or_the_worst_score():
    with pytest.raises(ScorerError, match="sample 1 .*died \\(exit code 3\\)"):
        Scorer(_fails_on_boom)(["a", "exit", "bb"])
    scorer = Scorer(_fails_on_boom, on_error="worst", worst=len, parallel_threshold=2, workers=2)
    assert scorer(["a", "exit", "bb", "boom", "ccc"]).tolist() == [1.0, 4.0, 2.0, 4.0, 3.0]
    scorer.close()


def test_batches_over_the_threshold_match_one_process():
    texts = [f"x{'=' if i % 3 else ' = '}{i}\n" * (1 + i % 4) for i in range(80)]
    spread = Scorer(scorers.pep8_violation_count, parallel_threshold=8, workers=2)
    here = Scorer(scorers.pep8_violation_count, timeout=None)
    assert spread(texts).tolist() == here(texts).tolist()
    spread.close()


@pytest.mark.skipif(sys.platform != "linux", reason="spawned workers need a picklable function")
def test_a_lambda_is_a_scorer():
    assert Scorer(lambda text: text.count("x"), worst=0.0)(["xx", "y"]).tolist() == [2.0, 0.0]


def test_max_chars_truncates_before_scoring():
    scorer = Scorer(len, max_chars=5, timeout=None)
    assert scorer(["abcdefgh", "ab"]).tolist() == [5.0, 2.0]


@pytest.mark.parametrize(
    "options",
    [{"on_timeout": "worst"}, {"on_error": "skip", "worst": 0.0}, {"timeout": 0}, {"max_chars": 0}],
)
def test_bad_options_are_config_errors(options):
    with pytest.raises(ConfigError):
        Scorer(len, **options)
