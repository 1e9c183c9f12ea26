"""experiments/tradeoff (quick): the typical-set slope is −β within 5% (SPEC §8.1, §10 item 10)."""

import math

import pytest
from conftest import brute_force_toy_a

from experiments import tradeoff
from experiments.results import read_results

LOG_Z_MINUS_ENTROPY = -1.8197650573  # SPEC §10, trade-off at β = 1
REWARD = 1.5745035924  # E_p* r, SPEC §10 at β = 1


def test_spec_oracles_are_what_brute_force_computes():
    world = brute_force_toy_a(1.0)
    assert math.log(world["z"]) - world["entropy_p"] == pytest.approx(LOG_Z_MINUS_ENTROPY, abs=1e-9)
    assert world["reward"] == pytest.approx(REWARD, abs=1e-9)


def test_typical_corpora_slope_is_minus_kl_coef():
    for kl_coef in tradeoff.KL_COEFS:
        fit = tradeoff.typical_corpora(kl_coef, corpus_size=100, corpora=4000, epsilon=0.01, seed=0)
        assert fit.typical > 100
        assert fit.slope == pytest.approx(-kl_coef, rel=0.05)
        assert fit.pearson < -0.95
        # On the typical set |Ā + R̄/β − (log Z − H(q))| ≤ ε exactly (SPEC §8.1).
        assert fit.identity_gap <= 0.01 + 1e-9
    world = brute_force_toy_a(1.0)
    log_z_minus_entropy = tradeoff.typical_corpora(1.0, 100, 4000, 0.01, 0).log_z_minus_entropy
    assert log_z_minus_entropy == pytest.approx(LOG_Z_MINUS_ENTROPY, abs=1e-9)
    assert log_z_minus_entropy == pytest.approx(math.log(world["z"]) - world["entropy_p"], abs=1e-12)


def test_quick_run_writes_table_and_figure(tmp_path):
    report = tradeoff.main(["--quick", "--output", str(tmp_path)])
    assert report == 0
    table = (tmp_path / "tradeoff.md").read_text()
    assert "slope" in table
    assert (tmp_path / "tradeoff.png").stat().st_size > 5000
    results = read_results(tmp_path)
    assert results["experiment"] == "tradeoff" and results["finished"] and results["quick"]
    assert table.strip() == tradeoff.render(results)  # the table is the JSON's rendering
    fits = results["typical"]["fits"]
    assert [f["kl_coef"] for f in fits] == list(tradeoff.KL_COEFS)
    for fit in fits:  # the run's corpora are the test's: 4000 in quick mode, seed 0
        assert fit == vars(tradeoff.typical_corpora(fit["kl_coef"], 100, 4000, 0.01, 0))
    assert [p["adaptor"] for p in results["adaptors"]["points"]] == list(tradeoff.ADAPTORS)
    ancestral = next(p for p in results["adaptors"]["points"] if p["adaptor"] == "ancestral")
    assert ancestral["reward"] == pytest.approx(REWARD, abs=1e-9)
    assert ancestral["reward"] == pytest.approx(brute_force_toy_a(1.0)["reward"], abs=1e-12)
    code = results["code"]
    assert [p["adaptor"] for p in code["points"]] == list(tradeoff.CODE_ADAPTORS)
    corpora = code["sizes"]["samples"] // code["sizes"]["corpus_size"]
    assert all(len(p["corpus_a"]) == len(p["corpus_r"]) == corpora for p in code["points"])
    assert all(math.isfinite(v) for v in code["trend"].values())
    points = tradeoff.adaptor_points(1.0)
    ancestral = next(p for p in points if p["adaptor"] == "ancestral")
    assert ancestral["reward"] == pytest.approx(REWARD, abs=1e-9)  # E_p* r, SPEC §10
