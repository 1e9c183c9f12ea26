"""experiments/real_lm_convergence: the yardstick's curves per engine on bundled:code-small."""

import math
from dataclasses import replace

import pytest

from bayesalign.errors import ConfigError
from bayesalign.inference import KLRL
from experiments import real_lm_convergence as conv
from experiments.results import read_results


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    output = tmp_path_factory.mktemp("conv")
    report = conv.run(output, quick=True)
    return output, report, read_results(output)


def test_quick_run_writes_the_table_the_json_and_the_plot(quick):
    output, report, results = quick
    assert results["experiment"] == conv.EXPERIMENT and results["finished"]
    assert (output / f"{conv.EXPERIMENT}.md").read_text().strip() == report
    assert report == conv.render(results)
    assert (output / f"{conv.EXPERIMENT}.png").stat().st_size > 5000
    assert list(results["targets"]) == ["return"]
    assert list(results["targets"]["return"]["curves"]) == ["DPG", "RLOO"]
    assert "| DPG | 128 |" in report and "not reached" in report
    assert not any((output / "return").rglob("checkpoint-*"))  # segments' checkpoints removed


def test_step_0_is_the_prior_by_the_yardstick(quick):
    _, _, results = quick
    entry = results["targets"]["return"]
    ref = entry["reference"]
    # A constraint target: log P − log a = 0 on the pool, so KL(p‖a) = −log Ẑ (float32 rounding).
    assert ref["kl_target_prior"] == pytest.approx(-ref["log_z"], abs=1e-4)
    assert ref["value"] == 1.0  # every exact draw meets the constraint
    sizes = results["sizes"]
    for curve in entry["curves"].values():
        start = curve["points"][0]
        assert start["samples"] == 0 and start["steps"] == 0
        assert start["kl_target_policy"] == pytest.approx(ref["kl_target_prior"], abs=1e-4)
        assert start["kl_target_policy_se"] == pytest.approx(ref["log_z_se"], rel=1e-3)
        # π = a: KL(π‖a) on its own draws is 0 up to float32 rounding of log π vs log a.
        assert abs(start["kl_policy_prior"]) < 1e-3
        # The prior's constraint rate on fresh draws agrees with the pool's Ẑ within 3 se.
        z, n = math.exp(ref["log_z"]), sizes["eval_samples"]
        se = math.hypot(math.sqrt(z * (1 - z) / n), z * ref["log_z_se"])
        assert abs(start["value"] - z) <= 3 * se
        # In reverse, a on the constraint's support is p: KL(π_S‖p) = 0 within 3 se, and the
        # mass off the support is the rate's complement.
        assert start["outside_support"] == pytest.approx(1 - start["value"])
        assert abs(start["kl_policy_target_in_support"]) <= (
            3 * start["kl_policy_target_in_support_se"])


def test_curves_are_measured_at_increasing_samples_drawn(quick):
    _, _, results = quick
    for curve in results["targets"]["return"]["curves"].values():
        points = curve["points"]
        samples = [p["samples"] for p in points]
        assert samples == sorted(set(samples)) and samples[-1] >= results["sizes"]["budget"]
        assert [p["steps"] for p in points] == sorted({p["steps"] for p in points})
        # The counted draws are the training batches: 64 per step (fit diagnostics excluded).
        assert all(p["samples"] == 64 * p["steps"] for p in points)
        assert all(math.isfinite(p["kl_target_policy"]) and p["kl_target_policy_se"] > 0
                   for p in points)
        assert len(points[-1]["examples"]) == 3
        assert points[0]["monitor"] == {} and all(isinstance(p["monitor"], dict) for p in points)


def test_points_keep_the_monitors_latest_readings():
    """Kept to calibrate the divergence monitor on real runs: the last step with readings (a
    step without a draw in the support has none), else the readings kept before."""
    from experiments.real_lm_runs import _last_monitor_readings

    history = [{"loss": 1.0, "monitor_ess_fraction": 0.5}, {"loss": 2.0}]
    assert _last_monitor_readings(history, {}) == {"monitor_ess_fraction": 0.5}
    assert _last_monitor_readings([{"loss": 2.0}], {"monitor_ess_fraction": 0.1}) == {
        "monitor_ess_fraction": 0.1}


def test_a_lora_run_trains_and_measures_one_adapter_across_segments(tmp_path):
    """With lora= the segments train one adapter and the curve measures it: a fit given lora=
    adds a new adapter each time, and the policy object it was given runs the base model."""
    sizes = replace(conv.Sizes.for_mode(True), engines=("DPG",))
    overrides = {"DPG": {"lora": {"rank": 4}, "learning_rate": 1e-2}}
    conv.run(tmp_path, quick=True, sizes=sizes, overrides=overrides)
    points = read_results(tmp_path)["targets"]["return"]["curves"]["DPG"]["points"]
    assert abs(points[0]["kl_policy_prior"]) < 1e-3  # B = 0: π = a at step 0
    assert [p["kl_policy_prior"] > 0.01 for p in points[1:]] == [True] * (len(points) - 1)


def test_engine_options_merge_and_segments_end_on_whole_ppo_rollouts():
    overrides = {"*": {"learning_rate": 1e-5}, "DPG best": {"baseline": False}}
    assert conv.engine_options("DPG best", overrides) == {"baseline": False,
                                                          "learning_rate": 1e-5}
    assert conv.engine_options("PPO", overrides) == {"algorithm": "ppo", "learning_rate": 1e-5}
    assert conv.segment_sizes(KLRL, {"algorithm": "ppo", "ppo_epochs": 2}) == (32.0, 2)
    assert conv.segment_sizes(KLRL, {"algorithm": "rloo", "batch_size": 16}) == (16.0, 1)


def test_unknown_engines_and_targets_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown engines \['nope'\]"):
        conv.run(tmp_path, quick=True, overrides={"nope": {}})
    with pytest.raises(ConfigError, match=r"unknown names \['DGP'\]"):
        conv.main(["--quick", "--engines", "DGP", "--output", str(tmp_path)])


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    output = tmp_path_factory.mktemp("conv_full")
    conv.run(output, quick=False)
    return read_results(output)


@pytest.mark.slow
def test_full_run_measures_every_engine_on_every_target(full):
    assert full["finished"] and list(full["targets"]) == ["return", "pep8", "none"]
    for entry in full["targets"].values():
        assert list(entry["curves"]) == list(conv.ENGINES)
        prior_kl = entry["reference"]["kl_target_prior"]
        for curve in entry["curves"].values():
            start = curve["points"][0]
            assert abs(start["kl_target_policy"] - prior_kl) <= 1e-3
            assert curve["stopped"] or curve["points"][-1]["samples"] >= 20_000


@pytest.mark.slow
@pytest.mark.xfail(reason="issue #11: not yet reached with the default options", strict=False)
def test_full_run_reaches_the_goal_with_default_options(full):
    for entry in full["targets"].values():
        for curve in entry["curves"].values():
            assert conv.summary(entry, curve)["reached"] is not None


def test_runs_of_one_engine_each_merge_into_one_table(quick, tmp_path):
    from experiments.results import write_results

    _, _, results = quick
    folders = []
    for engine in ("DPG", "RLOO"):
        entry = results["targets"]["return"]
        part = {**results, "targets": {"return": {**entry, "curves": {
            engine: entry["curves"][engine]}}}}
        del part["experiment"], part["finished"]
        folders.append(tmp_path / engine)
        folders[-1].mkdir()
        write_results(folders[-1], conv.EXPERIMENT, True, part)
    report = conv.merge(folders, tmp_path / "merged")
    assert report == conv.render(results)  # the same table as one run of both engines
    assert (tmp_path / "merged" / f"{conv.EXPERIMENT}.png").is_file()
    write_results(folders[1], conv.EXPERIMENT, True, {**part, "seed": 1})
    with pytest.raises(ConfigError, match=r"differs from .*DPG in \['seed'\]"):
        conv.merge(folders, tmp_path / "again")
