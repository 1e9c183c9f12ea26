"""DPG and KL-RL (RLOO, PPO) on 2 real processes (gloo, CPU) on a tiny GPT-2 policy.

What is compared: each process draws its own ``POLICY_BATCH`` samples per step under its own
seed (`rank_seed`); one process drawing ``2 × POLICY_BATCH`` per step as the union of those two
streams (`training_draws`, ranks=2: the same samples, in rank order) must log the same loss and
metrics at every step (log Ẑ, ESS, the RLOO baseline's effect on the loss, the divergence
monitor's signals: all computed from the gathered draws) and end with the same weights, within
float tolerance; the two processes must log identical histories and hold identical weights. A
2-process run killed (SIGKILL) after its first checkpoint, or resumed from one, ends
bit-identically to the uninterrupted run. ZeRO-2 (configs/accelerate/deepspeed.yaml) runs the
same curve with the optimizer state partitioned (FSDP is refused: tests/training/test_fsdp.py).
"""

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from two_processes import (
    POLICY_BATCH,
    POLICY_OPTIONS,
    fit_and_save,
    kill_launch_after_first_checkpoint,
    launch_policy_engines,
    low_tokens_target,
    policy_launch,
    policy_run,
)

from bayesalign.errors import DivergenceWarning

ENGINES = ("dpg", "rloo", "ppo")
STEPS = POLICY_OPTIONS["steps"]
TIMING = {"seconds", "samples_per_s", "tokens_per_s", "eta_s", "peak_memory_mb"}
# Observed: at most 5e-6 relative (float32 sums in another order: all-reduced gradients, the
# padded union's forward); a wrong shard, a local RLOO baseline or a local metric moves them by
# > 1e-2.
TOLERANCE = 1e-4


def logged(history: list[dict]) -> list[dict]:
    """The history without its timings."""
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


def assert_close_histories(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) == STEPS
    for step, (x, y) in enumerate(zip(logged(a), logged(b))):
        assert x.keys() == y.keys(), step
        for key in x:
            assert abs(x[key] - y[key]) <= TOLERANCE * max(1.0, abs(y[key])), (step, key, x[key], y[key])


def max_weight_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("two")
    launch_policy_engines(output, [*ENGINES, "cdpg"])
    return output


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("one")
    for name in ENGINES:
        with warnings.catch_warnings():  # the monitor may warn at lr 0.05, as on 2 processes
            warnings.simplefilter("ignore", DivergenceWarning)
            fit_and_save(name, output, rank=0, ranks=2, batch_size=2 * POLICY_BATCH)
    return output


@pytest.mark.parametrize("name", ENGINES)
def test_two_processes_follow_one_process_drawing_both_ranks_samples(two_processes, one_process,
                                                                     name):
    ranks = [policy_run(two_processes, name, rank) for rank in (0, 1)]
    one = policy_run(one_process, name)
    # Each rank drew its own samples; the one process drew their union, in rank order.
    assert len(one["draws"]) == len(ranks[0]["draws"]) == len(ranks[1]["draws"]) > 0
    for first, second, union in zip(ranks[0]["draws"], ranks[1]["draws"], one["draws"]):
        assert len(first) == len(second) == POLICY_BATCH and len(union) == 2 * POLICY_BATCH
        assert not torch.equal(first, second)
        assert torch.equal(union[:POLICY_BATCH, :first.shape[1]], first)
        assert torch.equal(union[POLICY_BATCH:, :second.shape[1]], second)
    # Every logged quantity is the whole step's, so both processes log the same history.
    assert logged(ranks[0]["history"]) == logged(ranks[1]["history"])
    assert_close_histories(ranks[0]["history"], one["history"])
    assert max_weight_difference(ranks[0]["weights"], ranks[1]["weights"]) == 0
    assert max_weight_difference(ranks[0]["weights"], one["weights"]) < TOLERANCE
    initial = low_tokens_target().prior().module.state_dict()
    assert max_weight_difference(one["weights"], initial) > 100 * TOLERANCE  # it trained
    keys = ranks[0]["history"][0].keys()
    assert {"monitor_ess_fraction", "monitor_kl_policy_prior_multiple"} <= keys
    assert ("log_z" in keys) == (name == "dpg")


# DPG reusing each batch (K = 2, clipped) with GDC's proposal swap checked every 2 steps: the
# held batches and the check's draws are each process' own; the 1-process run draws both ranks'.
REUSE = {"updates_per_batch": 2, "ratio_clip": 0.2, "off_policy": True,
         "proposal_update_interval": 2, "proposal_update_samples": 4}


@pytest.fixture(scope="module")
def reuse_runs(tmp_path_factory) -> tuple[Path, Path]:
    two, one = tmp_path_factory.mktemp("reuse_two"), tmp_path_factory.mktemp("reuse_one")
    launch_policy_engines(two, ["dpg"], **REUSE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DivergenceWarning)
        fit_and_save("dpg", one, rank=0, ranks=2, batch_size=2 * POLICY_BATCH,
                     **{**REUSE, "proposal_update_samples": 2 * REUSE["proposal_update_samples"]})
    return two, one


def test_draw_reuse_and_off_policy_dpg_follow_one_process(reuse_runs):
    two, one = reuse_runs
    ranks, single = [policy_run(two, "dpg", rank) for rank in (0, 1)], policy_run(one, "dpg")
    # The reused steps' metrics and the swap check are the whole step's: one history for both.
    assert logged(ranks[0]["history"]) == logged(ranks[1]["history"])
    assert_close_histories(ranks[0]["history"], single["history"])
    assert max_weight_difference(ranks[0]["weights"], ranks[1]["weights"]) == 0
    assert max_weight_difference(ranks[0]["weights"], single["weights"]) < TOLERANCE
    rows = ranks[0]["history"]
    assert [row["batch_update"] for row in rows] == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert all("kl_target_policy_check" in rows[i] for i in (1, 3))
    assert "clipped_fraction" in rows[1]


@pytest.mark.slow
def test_a_killed_two_process_dpg_with_a_replay_pool_resumes_bit_identically(tmp_path):
    """Each process' pool and held batch are in its own engine state, so a run SIGKILLed after
    its first checkpoint resumes to the uninterrupted run's histories and weights."""
    options = {"steps": 20, "replay_size": 8, "replay_fraction": 0.5, "updates_per_batch": 2}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    launch_policy_engines(whole, ["dpg"], **options)
    kill_launch_after_first_checkpoint(policy_launch(killed, ["dpg"], **options),
                                       killed / "dpg" / "checkpoints", steps=options["steps"])
    launch_policy_engines(killed, ["dpg"], **options)
    for rank in (0, 1):
        after, uninterrupted = policy_run(killed, "dpg", rank), policy_run(whole, "dpg", rank)
        assert logged(after["history"]) == logged(uninterrupted["history"])
        assert max_weight_difference(after["weights"], uninterrupted["weights"]) == 0
    assert logged(policy_run(whole, "dpg", 0)["history"]) == logged(
        policy_run(whole, "dpg", 1)["history"])


def test_cdpg_processes_train_on_the_same_contexts(two_processes):
    # Process 0 draws each step's context for all: the gathered weights are one context's.
    ranks = [policy_run(two_processes, "cdpg", rank) for rank in (0, 1)]
    assert logged(ranks[0]["history"]) == logged(ranks[1]["history"])
    assert max_weight_difference(ranks[0]["weights"], ranks[1]["weights"]) == 0
    assert any("monitor_log_z_drift_se" in row for row in ranks[0]["history"])


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_bit_identically(two_processes, tmp_path):
    """PPO killed by SIGKILL after its first checkpoint (mid-rollout: each process' rollout is
    in its own engine state); DPG and RLOO resumed from the uninterrupted run's first checkpoint."""
    resumed = tmp_path / "resumed"
    kill_launch_after_first_checkpoint(policy_launch(resumed, ["ppo"], steps=50),
                                       resumed / "ppo" / "checkpoints", steps=50)
    for name in ("dpg", "rloo"):
        first = sorted((two_processes / name / "checkpoints").glob("checkpoint-*"))[0]
        shutil.copytree(first, resumed / name / "checkpoints" / first.name)
    launch_policy_engines(resumed, ENGINES)
    for name in ENGINES:
        for rank in (0, 1):
            after, uninterrupted = policy_run(resumed, name, rank), policy_run(two_processes, name, rank)
            assert logged(after["history"]) == logged(uninterrupted["history"])
            assert max_weight_difference(after["weights"], uninterrupted["weights"]) == 0
            assert after["draws"] == [] or len(after["draws"]) < len(uninterrupted["draws"])


@pytest.mark.slow
def test_zero2_partitions_the_optimizer_and_follows_the_same_curve(one_process, tmp_path):
    launch_policy_engines(tmp_path, ENGINES, config="deepspeed")
    parameters = sum(p.numel() for p in low_tokens_target().prior().module.parameters())
    for name in ENGINES:
        ranks = [policy_run(tmp_path, name, rank) for rank in (0, 1)]
        assert_close_histories(ranks[0]["history"], policy_run(one_process, name)["history"])
        assert max_weight_difference(ranks[0]["weights"], ranks[1]["weights"]) == 0
        assert max_weight_difference(ranks[0]["weights"], policy_run(one_process, name)["weights"]
                                     ) < TOLERANCE
        # Each process holds half of the fp32 master weights (ZeRO-2), in its own file.
        state = tmp_path / name / "checkpoints" / f"checkpoint-{STEPS:08d}" / "deepspeed" / "state"
        shares = []
        for rank in (0, 1):
            saved = torch.load(state / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                               weights_only=False)["optimizer_state_dict"]
            assert int(saved["zero_stage"]) == 2
            shares.append(sum(p.numel() for p in saved["single_partition_of_fp32_groups"]))
        assert shares[0] == shares[1] == -(-parameters // 2)

