"""experiments/policy_brackets (quick, tiny random GPT-2): the prior and the DPG and RLOO
policies are bracketed on smc_code's target, and the brackets agree with the yardstick."""

import math

from experiments import policy_brackets
from experiments.results import read_results


def test_quick_policy_brackets_bracket_every_policy(tmp_path):
    report = policy_brackets.run(tmp_path, quick=True)
    assert (tmp_path / "policy_brackets.md").read_text().strip() == report
    results = read_results(tmp_path)
    assert results["experiment"] == "policy_brackets" and results["finished"]
    assert report == policy_brackets.render(results)  # the table is the JSON's rendering
    rows = {r["policy"]: r for r in results["rows"]}
    assert list(rows) == ["prior", "DPG", "RLOO"]
    assert rows["prior"]["samples_drawn"] == 0 and rows["DPG"]["samples_drawn"] == 16
    for r in rows.values():
        # The yardstick's KL(σ‖π) lies in the bracket, up to 3 se of each end and of itself.
        (low, high), (low_se, high_se) = r["kl_target_q"], r["kl_target_q_se"]
        slack = 3 * r["yardstick_kl_target_q_se"]
        assert low - 3 * low_se - slack <= r["yardstick_kl_target_q"], r
        assert r["yardstick_kl_target_q"] <= high + 3 * high_se + slack, r
        assert r["log_z_lower"] <= r["log_z_upper"]
        # Each q here breaks the constraint sometimes, so KL(π‖σ) is infinite at both ends.
        assert r["allowed_rate"] < 1 and r["kl_q_target"] == [math.inf, math.inf], r
