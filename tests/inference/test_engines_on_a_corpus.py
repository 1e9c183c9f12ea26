"""Sampling engines on a `Corpus` prior, which has no log-probability: Rejection with bound 1 is
filtering the dataset (acceptance = the exact fraction of segments that pass), Importance
weighs segments by the likelihood alone."""

import math

import pytest
import torch
from conftest import no_bad_target, write_corpus

from bayesalign.inference import Importance, Rejection
from bayesalign.models import Corpus


def test_rejection_on_a_corpus_filters_the_dataset(tmp_path):
    corpus = Corpus(write_corpus(tmp_path / "c"), segment="line")
    passing = [s for s in corpus.segments if "bad" not in s]
    exact = len(passing) / len(corpus.segments)  # 78/120
    post = Rejection(num_samples=2000, bound=1.0, chunk_size=512, seed=0).fit(no_bad_target(corpus))
    rate = post.diagnostics.acceptance_rate
    se = math.sqrt(exact * (1 - exact) / post.diagnostics.num_proposed)
    assert abs(rate - exact) < 4 * se  # 4 standard errors: about 0.04 here
    assert all("bad" not in t for t in post.samples.text)
    assert post.diagnostics.moments["no_bad"][0] == pytest.approx(1.0)
    counts = torch.tensor([post.samples.text.count(s) for s in set(post.samples.text)])
    assert len(counts) == len(passing) and counts.min() > 0  # every passing segment is drawn


def test_importance_on_a_corpus_weighs_by_the_likelihood(tmp_path):
    corpus = Corpus(write_corpus(tmp_path / "c"), segment="line")
    post = Importance(num_samples=600, seed=1).fit(no_bad_target(corpus))
    exact = sum("bad" not in s for s in corpus.segments) / len(corpus.segments)  # 78/120
    assert abs(post.diagnostics.log_z - math.log(exact)) < 0.1
