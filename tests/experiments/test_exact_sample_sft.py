"""experiments/exact_sample_sft (quick, tiny random GPT-2): maximum likelihood on exact draws,
measured by the yardstick after every epoch."""

import math

from experiments import exact_sample_sft
from experiments.results import read_results


def test_quick_exact_sample_sft_measures_every_epoch(tmp_path):
    report = exact_sample_sft.run(tmp_path, quick=True)
    assert (tmp_path / "exact_sample_sft.md").read_text().strip() == report
    assert (tmp_path / "exact_sample_sft.png").stat().st_size > 5000
    results = read_results(tmp_path)
    assert results["experiment"] == "exact_sample_sft" and results["finished"]
    assert report == exact_sample_sft.render(results)  # the table is the JSON's rendering
    sizes = results["sizes"]
    (pool,) = results["pools"]
    assert 0 < pool["pool"] <= pool["drawn"] == sizes["runs"][0][0]
    assert [e["epoch"] for e in pool["epochs"]] == list(range(sizes["epochs"] + 1))
    start = pool["epochs"][0]
    # Epoch 0 is the prior itself: the yardstick reads KL(p‖a) and KL(π‖a) is zero.
    assert math.isclose(start["kl_target_policy"], results["reference"]["kl_target_prior"],
                        rel_tol=1e-6)
    assert abs(start["kl_policy_prior"]) < 1e-4  # float32 log-probs: 2e-6 measured
    assert pool["epochs"][-1]["kl_policy_prior"] > 0  # training moved the policy
