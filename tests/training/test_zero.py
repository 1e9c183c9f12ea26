"""``bayesalign pretrain`` under configs/accelerate/deepspeed.yaml (ZeRO-2) on 2 real processes
(gloo, CPU): each process holds half of the Adam state, the loss curve is the 1-process one, a
killed run resumes bit-identically, bf16 training ends with fp32 master weights, the optimizer
can live on the CPU (offload), and unsupported or conflicting DeepSpeed settings are refused."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from two_processes import (
    BATCH,
    LOSS_TOLERANCE,
    OPTIONS,
    ROOT,
    STEPS,
    corpus,
    history,
    launch_two_processes_mle,
    max_difference,
    one_process_run,
    ranks_that_checkpointed,
)

from bayesalign.errors import ConfigError
from bayesalign.inference.pretraining_run import pretrain
from bayesalign.training.zero import ZeroPlan, engine_config, plan_from_launch

__all__ = ["corpus", "one_process_run"]  # fixtures, used by name


def deepspeed_state(output: Path, step: int = STEPS) -> Path:
    return output / "training" / "checkpoints" / f"checkpoint-{step:08d}" / "deepspeed" / "state"


@pytest.fixture(scope="module")
def zero2_run(corpus, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("zero2")
    launch_two_processes_mle(corpus, output, config="deepspeed")
    return output


def adam_moments_per_rank(output: Path) -> list[int]:
    """Elements of exp_avg each process checkpointed (DeepSpeed's per-rank optimizer files)."""
    counts = []
    for rank in (0, 1):
        saved = torch.load(deepspeed_state(output) / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                           weights_only=False)
        states = saved["optimizer_state_dict"]["base_optimizer_state"]["state"].values()
        counts.append(sum(state["exp_avg"].numel() for state in states))
    return counts


def test_zero2_partitions_adam_state_and_follows_the_one_process_loss_curve(zero2_run,
                                                                           one_process_run):
    card = json.loads((zero2_run / "card.json").read_text())
    assert card["processes"] == 2 and card["sharding"]["launch"] == "deepspeed_zero2"
    assert ranks_that_checkpointed(zero2_run) == {"rng-0.pt", "rng-1.pt"}
    parameters = sum(t.numel() for t in load_file(str(zero2_run / "model.safetensors")).values())
    assert adam_moments_per_rank(zero2_run) == [parameters // 2, parameters - parameters // 2]
    curve = history(zero2_run)
    for column in ("loss", "heldout_loss"):
        assert max_difference(curve, history(one_process_run), column) < LOSS_TOLERANCE
    assert float(curve[0]["loss"]) - float(curve[-1]["loss"]) > 0.1  # it learned


def test_zero2_resumes_its_checkpoint_bit_identically(corpus, zero2_run, tmp_path):
    interrupted = tmp_path / "interrupted"
    shutil.copytree(zero2_run / "training", interrupted / "training")
    shutil.rmtree(interrupted / "training" / "checkpoints" / f"checkpoint-{STEPS:08d}")
    launch_two_processes_mle(corpus, interrupted, config="deepspeed")  # resumes at step 4
    resumed, expected = (load_file(str(out / "model.safetensors")) for out in (interrupted, zero2_run))
    assert resumed.keys() == expected.keys()
    assert all(bool((resumed[k] == expected[k]).all()) for k in resumed)
    assert [row["loss"] for row in history(interrupted)] == [row["loss"] for row in history(zero2_run)]


def test_a_deepspeed_checkpoint_is_not_resumed_without_deepspeed(corpus, zero2_run, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(zero2_run / "training", moved / "training")
    with pytest.raises(ConfigError, match="written with DeepSpeed.*resume it with a DeepSpeed launch"):
        pretrain(corpus=corpus, output=moved, batch_size=BATCH, **OPTIONS)


def test_bf16_training_ends_with_fp32_master_weights(corpus, one_process_run, tmp_path):
    output = tmp_path / "bf16"
    launch_two_processes_mle(corpus, output, "deepspeed", "--mixed-precision=bf16")
    final = load_file(str(output / "model.safetensors"))
    checkpoint = load_file(str(output / "training" / "checkpoints" / f"checkpoint-{STEPS:08d}"
                               / "policy.safetensors"))
    assert {t.dtype for t in [*final.values(), *checkpoint.values()]} == {torch.float32}
    # The same training as in fp32 up to bf16 rounding (observed: at most 6e-4 from fp32).
    ending = [float(history(out)[-1]["loss"]) for out in (output, one_process_run)]
    assert abs(ending[0] - ending[1]) < 0.02


# DeepSpeed JIT-compiles its CPU Adam extension the first time a machine uses it (85 s of the
# suite's 820 s on a fresh 2-core machine, as CI is), so this check runs with `make test-slow`.
@pytest.mark.slow
def test_the_optimizer_can_live_on_the_cpu(corpus, one_process_run, tmp_path):
    output = tmp_path / "offload"
    launch_two_processes_mle(corpus, output, "deepspeed", launcher=["--offload_optimizer_device=cpu"])
    saved = torch.load(deepspeed_state(output) / "mp_rank_00_model_states.pt", weights_only=False)
    assert saved["ds_config"]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    # DeepSpeed's CPU Adam takes the same step as torch's Adam.
    assert max_difference(history(output), history(one_process_run), "loss") < LOSS_TOLERANCE


def test_deepspeed_config_launches_two_processes_with_zero2():
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = ROOT / "configs" / "accelerate" / "deepspeed.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "bayesalign", "pretrain"])
    args, _, _ = _validate_launch_command(args)
    assert args.use_deepspeed and args.num_processes == 2 and int(args.zero_stage) == 2


@pytest.fixture
def deepspeed_launch(monkeypatch):
    """The variables `accelerate launch` sets for configs/accelerate/deepspeed.yaml."""
    for name, value in {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
                        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
                        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none"}.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


@pytest.mark.parametrize("variable, value, message", [
    ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3", "ZeRO-3 is not supported.*fsdp.yaml"),
    ("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "cpu", "offload_param_device needs ZeRO-3"),
])
def test_unsupported_deepspeed_settings_are_named(deepspeed_launch, variable, value, message):
    from accelerate import Accelerator

    deepspeed_launch.setenv(variable, value)
    with pytest.raises(ConfigError, match=message):
        plan_from_launch(Accelerator(cpu=True))


def test_a_deepspeed_setting_that_contradicts_the_run_is_refused():
    plan = ZeroPlan(config={"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 2}},
                    stage=2, offload_optimizer=False)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps = 4, but this run's is 2"):
        engine_config(plan, batch_size=8, accumulation=2, max_grad_norm=1.0,
                      mixed_precision="no", processes=2)
    config = engine_config(plan, batch_size=8, accumulation=4, max_grad_norm=None,
                           mixed_precision="bf16", processes=2)
    assert config["train_batch_size"] == 64 and config["gradient_clipping"] == 0.0
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]
