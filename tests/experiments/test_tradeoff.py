"""experiments/tradeoff (quick): the typical-set slope is −β within 5% (SPEC §8.1, §10 item 10)."""

import pytest

from experiments import tradeoff


def test_typical_corpora_slope_is_minus_kl_coef():
    for kl_coef in tradeoff.KL_COEFS:
        fit = tradeoff.typical_corpora(kl_coef, corpus_size=100, corpora=4000, epsilon=0.01, seed=0)
        assert fit.typical > 100
        assert fit.slope == pytest.approx(-kl_coef, rel=0.05)
        assert fit.pearson < -0.95
        # On the typical set |Ā + R̄/β − (log Z − H(q))| ≤ ε exactly (SPEC §8.1).
        assert fit.identity_gap <= 0.01 + 1e-9
    assert tradeoff.typical_corpora(1.0, 100, 4000, 0.01, 0).log_z_minus_entropy == pytest.approx(
        -1.8197650573, abs=1e-9)


def test_quick_run_writes_table_and_figure(tmp_path):
    report = tradeoff.main(["--quick", "--output", str(tmp_path)])
    assert report == 0
    assert "slope" in (tmp_path / "tradeoff.md").read_text()
    assert (tmp_path / "tradeoff.png").stat().st_size > 5000
    points = tradeoff.adaptor_points(1.0)
    ancestral = next(p for p in points if p["adaptor"] == "ancestral")
    assert ancestral["reward"] == pytest.approx(1.5745035924, abs=1e-9)  # E_p* r, SPEC §10
