"""`Corpus` prior: segments partition documents, seeded sampling, no log-prob (the sampling
engines on a corpus are tested in tests/inference/test_engines_on_a_corpus.py)."""


import pytest
import torch
from conftest import no_bad_target, write_corpus

from bayesalign.errors import ConfigError, NoLogProbError
from bayesalign.models import Corpus
from bayesalign.models.corpus_prior import partition


@pytest.mark.parametrize("segment,text,expected", [
    ("line", "\n\na = 1\n\nb = 2\n", ["\n\na = 1\n\n", "b = 2\n"]),
    ("sentence", "One. Two!  Three?\nFour", ["One. ", "Two!  ", "Three?\n", "Four"]),
    ("document", "x\n\ny\n", ["x\n\ny\n"]),
])
def test_segments_partition_the_document(segment, text, expected):
    assert partition(text, segment) == expected
    assert "".join(partition(text, segment)) == text
    assert partition("  \n\n", segment) == []


def test_segment_context_gives_each_draw_its_document_and_offset(tmp_path):
    folder = write_corpus(tmp_path / "c")
    files = {f.read_text() for f in folder.iterdir()}
    corpus = Corpus(folder, segment="line", segment_context=True)
    draws = corpus.sample_batch(32)
    for text, (document, start) in zip(draws.text, draws.origin):
        assert document in files and document[start:start + len(text)] == text
    assert draws[[3, 5]].origin == [draws.origin[3], draws.origin[5]]
    assert corpus.fingerprint() != Corpus(folder, segment="line").fingerprint()
    assert Corpus(folder, segment="line").sample_batch(2).origin is None
    with pytest.raises(ConfigError, match="segment_context: pass each segment's"):
        corpus.sequences(["k = 1\n"])


def test_sampling_is_seeded_and_covers_the_segments(tmp_path):
    corpus = Corpus(write_corpus(tmp_path / "c"), segment="line")
    assert len(corpus.segments) == 120
    torch.manual_seed(0)
    first = corpus.sample_batch(64)
    torch.manual_seed(0)
    again = corpus.sample_batch(64)
    assert first.text == again.text and torch.equal(first.tokens, again.tokens)
    assert set(first.text) <= set(corpus.segments) and first.log_q is None
    decoded = first.decoder(first.token_lists())
    assert decoded == first.text  # the byte encoding round-trips


def test_corpus_has_no_log_prob(tmp_path):
    corpus = Corpus(write_corpus(tmp_path / "c"))
    with pytest.raises(NoLogProbError, match="no log-probability"):
        corpus.log_prob(corpus.sample_batch(2))
    with pytest.raises(NoLogProbError, match="Rejection with a bound"):
        no_bad_target(corpus).log_score(corpus.sample_batch(2))


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ConfigError, match="segment must be one of"):
        Corpus(write_corpus(tmp_path / "c"), segment="word")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("  \n\n")
    with pytest.raises(ConfigError, match="no usable text"):
        Corpus(tmp_path / "empty")
