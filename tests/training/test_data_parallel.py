"""``bayesalign pretrain`` on 2 real processes (gloo, CPU) follows the loss curve of 1 process with
the same global batch, for MLE and for conditional training on a PEP8 target declared in a file,
and resumes its checkpoints on both ranks bit-identically; the accelerate
configs under configs/accelerate start the processes they promise."""

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file
from two_processes import (
    BATCH,
    LOSS_TOLERANCE,
    OPTIONS,
    PEP8_TARGET,
    ROOT,
    STEPS,
    corpus,
    flags,
    history,
    launch_two_processes,
    launch_two_processes_mle,
    max_difference,
    ranks_that_checkpointed,
)

from bayesalign.app.cli import main
from bayesalign.inference.pretraining_run import pretrain

__all__ = ["corpus"]  # a fixture, used by name


@pytest.fixture(scope="module")
def two_ranks(corpus, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("two_ranks")
    launch_two_processes_mle(corpus, output)
    return output


def test_two_ranks_ran_and_follow_the_one_process_loss_curve(corpus, two_ranks, tmp_path):
    card = json.loads((two_ranks / "card.json").read_text())
    assert card["processes"] == 2
    assert card["tokens_seen"] == STEPS * 2 * BATCH * OPTIONS["block_size"]
    assert ranks_that_checkpointed(two_ranks) == {"rng-0.pt", "rng-1.pt"}

    one_process = {
        "batch": pretrain(corpus=corpus, output=tmp_path / "batch", batch_size=2 * BATCH,
                          **OPTIONS),
        "accumulation": pretrain(corpus=corpus, output=tmp_path / "accumulation",
                                 batch_size=BATCH, gradient_accumulation_steps=2, **OPTIONS),
    }
    curve = history(two_ranks)
    for output in one_process.values():
        for column in ("loss", "heldout_loss"):
            assert max_difference(curve, history(output), column) < LOSS_TOLERANCE
    first, last = float(curve[0]["loss"]), float(curve[-1]["loss"])
    assert first - last > 0.1  # the runs learned, so equal curves are not equal flat lines


def test_two_ranks_resume_their_checkpoint_bit_identically(corpus, two_ranks, tmp_path):
    interrupted = tmp_path / "interrupted"
    shutil.copytree(two_ranks / "training", interrupted / "training")
    shutil.rmtree(interrupted / "training" / "checkpoints" / f"checkpoint-{STEPS:08d}")
    launch_two_processes_mle(corpus, interrupted)  # resumes at step 4 on both ranks
    resumed, expected = (load_file(str(out / "model.safetensors")) for out in (interrupted, two_ranks))
    assert resumed.keys() == expected.keys()
    assert all(bool((resumed[k] == expected[k]).all()) for k in resumed)
    assert [row["loss"] for row in history(interrupted)] == [row["loss"] for row in history(two_ranks)]


CONDITIONAL = {"objective": "conditional", "steps": STEPS, "block_size": 64,
               "checkpoint_every": 4, "eval_samples": 4}


def test_conditional_training_on_two_ranks_follows_one_process(corpus, tmp_path):
    target = tmp_path / "clean_code.py"
    target.write_text(PEP8_TARGET.format(corpus=str(corpus)))
    # One cache: the 1-process run reads the scores the 2-process run's main rank wrote.
    shared = [f"--target={target}:clean_code", f"--score-cache={tmp_path / 'scores.sqlite'}",
              *flags(CONDITIONAL)]
    two, one = tmp_path / "two", tmp_path / "one"
    launch_two_processes(f"--output={two}", f"--batch-size={BATCH}", *shared)
    assert main(["pretrain", f"--output={one}", f"--batch-size={2 * BATCH}", *shared]) == 0

    assert ranks_that_checkpointed(two) == {"rng-0.pt", "rng-1.pt"}
    assert ranks_that_checkpointed(one) == {"rng-0.pt"}
    config = json.loads((two / "pretraining.json").read_text())["config"]
    assert config["objective"] == "conditional" and config["control_tokens"] > 0
    curve = history(two)
    assert max_difference(curve, history(one), "loss") < LOSS_TOLERANCE
    assert float(curve[0]["loss"]) - float(curve[-1]["loss"]) > 0.1  # it learned


@pytest.mark.parametrize("name", ["cpu_2proc", "ddp"])
def test_accelerate_configs_launch_two_data_parallel_processes(name):
    # `_validate_launch_command` is how `accelerate launch` reads a config: it catches a config
    # that would start a single process (as `--cpu --num_processes 2` does).
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = ROOT / "configs" / "accelerate" / f"{name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "bayesalign", "pretrain"])
    args, _, _ = _validate_launch_command(args)
    assert args.multi_gpu and not args.cpu and args.num_processes == 2
    assert args.mixed_precision == ("no" if name == "cpu_2proc" else "bf16")
