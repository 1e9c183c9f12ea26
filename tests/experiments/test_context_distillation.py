"""experiments/context_distillation (quick): both distillations move π toward the prompted prior."""

from experiments import context_distillation
from experiments.results import read_results


def test_quick_run_distils_the_prompt(tmp_path):
    assert context_distillation.main(["--quick", "--output", str(tmp_path)]) == 0
    results = read_results(tmp_path)
    prior = results["prior"]
    assert prior["kl"] > 0.1  # the prompt shifts the tiny model's law
    token_level, dpg = results["curves"]
    assert [p["steps"] for p in token_level["points"]] == [12, 24]
    # Teacher forcing closes a real part of the prompt's shift on held-out contexts, beyond
    # 3 se (DPG's convergence is tested in tests/inference/test_prompted_distillation.py).
    last = token_level["points"][-1]
    assert last["kl"] < prior["kl"] - 3 * (prior["kl_se"] + last["kl_se"]), token_level
    assert dpg["points"][-1]["drawn"] == 24 * results["sizes"]["dpg_batch"]
    table = (tmp_path / "context_distillation.md").read_text()
    assert "token-level (a)" in table and "DPG, sequence-level (b)" in table
    assert (tmp_path / "context_distillation.png").stat().st_size > 5000
