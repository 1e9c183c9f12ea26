"""experiments/priors (quick, tiny random GPT-2): the table and the plot come from results.json."""

from experiments import priors
from experiments.results import read_results


def test_quick_priors_report_every_column(tmp_path):
    report = priors.run(tmp_path, [], seeds=2, quick=True)
    assert (tmp_path / "priors.png").stat().st_size > 5000
    assert (tmp_path / "priors.md").read_text().strip() == report
    results = read_results(tmp_path)
    assert results["experiment"] == "priors" and report == priors.render(results)
    (row,) = results["rows"]
    assert len(row["parse_fractions"]) == 2 and row["whole_samples"] == 256
    assert row["parse_mean"] == sum(row["parse_fractions"]) / 2
    assert "| tiny random GPT-2 | 2 | 0.0 M | 500.0 |" in report
