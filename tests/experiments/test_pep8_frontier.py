"""experiments/pep8_frontier (quick, tiny random GPT-2): every engine runs end to end."""

import math

import pytest

from experiments import pep8_frontier
from experiments.results import read_results


def test_quick_frontier_runs_every_engine(tmp_path):
    report = pep8_frontier.run(tmp_path, quick=True)
    assert (tmp_path / "pep8_frontier.png").stat().st_size > 5000
    assert (tmp_path / "pep8_frontier.md").read_text().strip() == report
    results = read_results(tmp_path)
    assert results["experiment"] == "pep8_frontier" and results["finished"]
    assert report == pep8_frontier.render(results)  # the table is the JSON's rendering
    assert [r["engine"] for r in results["rows"]] == [
        "prior", "BestOfN n=4", "Rejection", "Importance", "QRS β_q=0.2", "DPG", "DPG off-policy",
        "RLOO", "PPO"]
    rows = {r["engine"]: r for r in results["rows"]}
    # Exact samplers of p put less mass on PEP8 violations than the prior, at a finite KL.
    assert rows["Rejection"]["violations_per_char"] < rows["prior"]["violations_per_char"]
    assert rows["BestOfN n=4"]["kl_policy_prior"] == pytest.approx(math.log(4) - 3 / 4, abs=1e-12)
    assert all(math.isfinite(r["kl_policy_prior"]) for r in rows.values())
    assert [r["kl_coef"] for r in results["rows"]] == [None, None] + [0.05] * 7
    # Every policy row carries the yardstick's KL(p‖π) ± se, and trained for its budget.
    for name in ("DPG", "DPG off-policy", "RLOO", "PPO"):
        assert rows[name]["kl_target_policy"] > 0 and rows[name]["kl_target_policy_se"] > 0
        assert rows[name]["steps"] >= 24 // 8
    assert "KL(p‖π) ± se (yardstick)" in report
