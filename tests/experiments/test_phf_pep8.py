"""experiments/phf_pep8 (quick, a 40 kB stdlib slice): every PHF objective trains end to end on one
target, and the metrics are well formed."""

import json
import math

import numpy as np

from experiments import phf_pep8
from experiments.results import read_results

ROWS = [*phf_pep8.OBJECTIVES[:3], phf_pep8.PHF_DECODING, *phf_pep8.OBJECTIVES[3:]]


def test_quick_run_measures_every_objective(tmp_path):
    report = phf_pep8.run(tmp_path, quick=True)
    assert (tmp_path / "phf_pep8.png").stat().st_size > 5000
    assert (tmp_path / "phf_pep8.md").read_text().strip() == report
    results = read_results(tmp_path)
    assert results["experiment"] == "phf_pep8" and results["finished"]
    assert report == phf_pep8.render(results)  # the table is the JSON's rendering
    assert [r["objective"] for r in results["rows"]] == ROWS
    for r in results["rows"]:
        rate, se = r["misalignment"], r["misalignment_se"]
        assert math.isfinite(rate) and rate >= 0 and se >= 0
        assert all(math.isfinite(r[k]) for k in ("max_at_k", "heldout_loss", "kl_from_mle"))
        # the max of k samples is at least their mean (up to the table's rounding, as before)
        assert round(r["max_at_k"], 4) >= round(rate, 4)
        code_rate = r["code_misalignment"]
        assert math.isfinite(code_rate) and code_rate >= 0 and 0 <= r["comment_fraction"] <= 1
    samples = json.loads((tmp_path / "samples.json").read_text())
    assert list(samples) == ["mle", "filtering", "conditional", phf_pep8.PHF_DECODING,
                             "unlikelihood", "rwr", "awr"]
    assert all(len(texts) == 8 for texts in samples.values())
    texts = [t for name in ("conditional", phf_pep8.PHF_DECODING) for t in samples[name]]
    assert not any("<|good|>" in t or "<|bad|>" in t for t in texts)


def test_expected_max_matches_enumeration_of_subsets():
    from itertools import combinations

    values = np.array([0.3, 0.1, 0.7, 0.2, 0.5])
    exact = np.mean([max(s) for s in combinations(values, 3)])
    assert math.isclose(phf_pep8.expected_max(values, 3), exact)
    assert math.isclose(phf_pep8.expected_max(values, 1), values.mean())


def test_code_line_rate_counts_only_code_lines_in_their_sample():
    # 'x=1' is E225 alone and E225 + E305 after a function; comments and blank lines don't count.
    assert phf_pep8.code_line_rate("# note\nx=1\n") == 1 / 4
    assert phf_pep8.code_line_rate("def f():\n    return 1\nx=1") == 2 / 25
    assert math.isnan(phf_pep8.code_line_rate("# only a comment\n\n"))
    assert phf_pep8.comment_fraction(["# a\nx = 1\n\n", "#b\n"]) == 2 / 3
