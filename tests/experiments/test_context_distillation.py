"""experiments/context_distillation (quick): both distillations move π toward the prompted prior."""

from experiments import context_distillation
from experiments.results import read_results


def test_quick_run_distils_the_prompt(tmp_path):
    assert context_distillation.main(["--quick", "--output", str(tmp_path)]) == 0
    results = read_results(tmp_path)
    prior = results["prior"]
    assert prior["kl"] > 0.1  # the prompt shifts the tiny model's law
    for curve in results["curves"]:
        kl = [p["kl"] for p in curve["points"]]
        # Each distillation closes a real part of the prompt's shift, beyond 3 se.
        assert kl[-1] < prior["kl"] - 3 * (prior["kl_se"] + curve["points"][-1]["kl_se"]), curve
    table = (tmp_path / "context_distillation.md").read_text()
    assert "token-level (a)" in table and "DPG, sequence-level (b)" in table
    assert (tmp_path / "context_distillation.png").stat().st_size > 5000
