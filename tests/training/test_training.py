"""The shared training loop: exact resume (also after SIGKILL), history export, clear errors."""

import json
import math
import shutil
import textwrap
from pathlib import Path

import pyro
import pytest
import torch
from conftest import conditional_world, kill_after_first_checkpoint, toy_a_prior, toy_a_target

import bayesalign as ba
from bayesalign.errors import (
    ConfigError,
    EmptySupportError,
    InvalidFactorError,
    VocabularyMismatchError,
)
from bayesalign.inference import DPG, KLRL, TrainingError, history_to_arviz, history_to_csv
from bayesalign.models import TabularLM
from bayesalign.training import Trainer, TrainingConfig
from bayesalign.training.checkpoints import verify, write_manifest

SETTINGS = {"steps": 600, "batch_size": 32, "seed": 3, "progress": False}


def parameters(post) -> list[torch.Tensor]:
    return [p.detach().clone() for p in post.policy.module.parameters()]


@pytest.mark.parametrize("engine", [lambda **kw: DPG(off_policy=True, **kw),
                                    lambda **kw: KLRL(algorithm="ppo", ppo_epochs=3, **kw)])
def test_resume_from_a_checkpoint_is_bit_identical(engine, tmp_path):
    target = toy_a_target(1.0)
    reference = engine(**SETTINGS).fit(target)
    engine(**{**SETTINGS, "steps": 250}, checkpoint_dir=str(tmp_path), checkpoint_every=50
           ).fit(target)
    resumed = engine(**SETTINGS, checkpoint_dir=str(tmp_path), checkpoint_every=50).fit(target)
    for a, b in zip(parameters(reference), parameters(resumed)):
        assert torch.equal(a, b)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in reference.history]


KILL_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from conftest import toy_a_target
    from bayesalign.inference import DPG
    DPG(steps={steps}, batch_size=32, seed=3, progress=False, checkpoint_dir={ckpt!r},
        checkpoint_every=25, off_policy=True).fit(toy_a_target(1.0))
""")


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    steps = 1500
    ckpt = tmp_path / "ckpt"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parents[1]), steps=steps, ckpt=str(ckpt))
    kill_after_first_checkpoint(script, ckpt, steps)
    settings = {**SETTINGS, "steps": steps, "off_policy": True}
    resumed = DPG(**settings, checkpoint_dir=str(ckpt), checkpoint_every=25).fit(toy_a_target(1.0))
    reference = DPG(**settings).fit(toy_a_target(1.0))
    for a, b in zip(parameters(reference), parameters(resumed)):
        assert torch.equal(a, b)


def test_corrupted_checkpoint_falls_back_to_the_previous_one(tmp_path):
    target = toy_a_target(1.0)
    DPG(**{**SETTINGS, "steps": 100}, checkpoint_dir=str(tmp_path), checkpoint_every=50).fit(target)
    newest = sorted(tmp_path.glob("checkpoint-*"))[-1]
    (newest / "policy.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="checksum mismatch in policy.safetensors"):
        resumed = DPG(**{**SETTINGS, "steps": 150}, checkpoint_dir=str(tmp_path),
                      checkpoint_every=50).fit(target)
    reference = DPG(**{**SETTINGS, "steps": 150}).fit(target)
    for a, b in zip(parameters(reference), parameters(resumed)):
        assert torch.equal(a, b)


def test_resume_restores_the_fp16_loss_scale(tmp_path):
    # accelerate gives CPU runs no grad scaler, so one is attached as a GPU fp16 run has it; it
    # doubles its scale every 2 steps, so a resume that forgot it would end at another scale.
    def train(steps: int) -> Trainer:
        config = TrainingConfig(steps=steps, batch_size=1, checkpoint_dir=str(tmp_path / "ckpt"),
                                checkpoint_every=3, progress=False)
        trainer = Trainer(config, toy_a_prior().trainable_copy(), engine="scaled")
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10,
                                                          growth_interval=2)
        trainer.run(lambda step: (sum((p**2).sum() for p in trainer.module.parameters()), {}))
        return trainer

    uninterrupted = train(6).accelerator.scaler.state_dict()
    shutil.rmtree(tmp_path / "ckpt" / f"checkpoint-{6:08d}")
    resumed = train(6)
    assert resumed.start_step == 3
    assert resumed.accelerator.scaler.state_dict() == uninterrupted
    assert uninterrupted["scale"] == 2.0**13  # grew at steps 2, 4 and 6


def test_a_policy_fitted_again_resumes_its_own_checkpoint(tmp_path):
    """Fitting in segments (same policy object, same checkpoint_dir, more steps) resumes, and
    ends where one uninterrupted fit does: gradients the first segment left on the module must
    not stop torch from restoring Adam's state."""
    target = toy_a_target()
    policy = target.prior().trainable_copy()
    options = dict(batch_size=16, optimizer="adam", learning_rate=0.05, eval_samples=64,
                   progress=False, checkpoint_dir=str(tmp_path / "segments"))
    DPG(steps=3, policy=policy, **options).fit(target)
    segmented = DPG(steps=6, policy=policy, **options).fit(target)
    whole = DPG(steps=6, **{**options, "checkpoint_dir": str(tmp_path / "whole")}).fit(target)
    assert [r["loss"] for r in segmented.history] == [r["loss"] for r in whole.history]


def test_resume_with_another_configuration_is_refused(tmp_path):
    DPG(**{**SETTINGS, "steps": 50}, checkpoint_dir=str(tmp_path)).fit(toy_a_target(1.0))
    with pytest.raises(ConfigError, match="batch_size: 32 there, 16 here"):
        DPG(**{**SETTINGS, "steps": 60, "batch_size": 16}, checkpoint_dir=str(tmp_path)).fit(
            toy_a_target(1.0))


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    prior = toy_a_prior()
    calls = {"n": 0}

    @ba.target
    def turns_nan():
        y = pyro.sample("y", prior)
        calls["n"] += 1
        r = (y.tokens == 2).sum(-1).double()
        ba.reward("r", r * math.nan if calls["n"] > 150 else r)  # NaN after some steps

    with pytest.raises(InvalidFactorError, match="factor 'r' is nan for sample"):
        DPG(**SETTINGS, checkpoint_dir=str(tmp_path), checkpoint_every=20).fit(turns_nan)
    assert all(verify(c) is None for c in tmp_path.glob("checkpoint-*"))
    assert list(tmp_path.glob("checkpoint-*"))


def test_nan_loss_names_the_step_and_checkpoint(tmp_path, monkeypatch):
    engine = DPG(**SETTINGS, checkpoint_dir=str(tmp_path), checkpoint_every=10)
    original = DPG._loss
    calls = {"n": 0}

    def sometimes_nan(self, *args, **kw):
        loss, info, log_pi = original(self, *args, **kw)
        calls["n"] += 1
        return (loss * math.nan if calls["n"] > 25 else loss), info, log_pi

    monkeypatch.setattr(DPG, "_loss", sometimes_nan)
    with pytest.raises(TrainingError, match=r"loss is nan at step 25.*checkpoint-00000020"):
        engine.fit(toy_a_target(1.0))
    assert verify(sorted(tmp_path.glob("checkpoint-*"))[-1]) is None


def test_all_weights_zero_names_the_step():
    prior = toy_a_prior()

    @ba.target
    def impossible():
        y = pyro.sample("y", prior)
        ba.constraint("never", y.lengths > 3)

    # Steps before the first draw with P > 0 have no signal; twenty in a row are an error.
    with pytest.raises(EmptySupportError, match="step 19: all 32 importance weights are zero "
                                                "for context None, as at every one of the 20"):
        DPG(**SETTINGS).fit(impossible)


def test_policy_with_another_vocabulary_is_refused():
    four = torch.full((4,), 0.25, dtype=torch.float64)
    other = TabularLM(four, four.expand(4, 4).contiguous(), 3).trainable_copy()
    for engine in (DPG(policy=other, **SETTINGS), KLRL(policy=other, **SETTINGS)):
        with pytest.raises(VocabularyMismatchError, match="policy vocabulary"):
            engine.fit(toy_a_target(1.0))


def test_bad_options_are_named():
    with pytest.raises(ConfigError, match="kl_scale must be > 0"):
        KLRL(kl_scale=0.0)
    with pytest.raises(ConfigError, match="algorithm must be one of"):
        KLRL(algorithm="grpo")
    with pytest.raises(ConfigError, match="divergence must be one of"):
        DPG(divergence="hellinger")
    with pytest.raises(ConfigError, match="steps must be > 0"):
        DPG(steps=0)
    with pytest.warns(UserWarning, match="k3 in the loss gives a biased gradient"):
        KLRL(kl_estimator="k3", kl_placement="loss")


def test_history_exports(tmp_path):
    post = KLRL(**{**SETTINGS, "steps": 20}).fit(toy_a_target(1.0))
    path = history_to_csv(post.history, tmp_path / "history.csv")
    lines = path.read_text().splitlines()
    assert lines[0].startswith("step,") and len(lines) == 21
    data = history_to_arviz(post.history)
    assert data.sample_stats["kl_policy_prior"].shape == (1, 20)
    assert all(math.isfinite(r["samples_per_s"]) for r in post.history)
    saved = tmp_path / "post"
    post.save(saved)
    assert json.loads((saved / "posterior.json").read_text())["history"][0]["step"] == 0


def test_adaptive_kl_coefficient_moves_towards_the_target_kl_and_is_logged():
    post = KLRL(**{**SETTINGS, "steps": 200}, target_kl=0.05).fit(toy_a_target(1.0))
    scales = [row["kl_scale"] for row in post.history]
    assert scales[0] == 1.0 and scales[-1] > 1.5  # KL(π‖a) → 0.49 ≫ 0.05: c grows
    assert post.diagnostics.kl_policy_prior < 0.3


def test_gradient_accumulation_and_micro_batches_are_logged():
    post = DPG(**{**SETTINGS, "steps": 30, "batch_size": 16}, gradient_accumulation_steps=4
               ).fit(toy_a_target(1.0))
    assert len(post.history) == 30
    assert post.diagnostics.kl_target_policy < 0.491  # moved from the prior's 0.491


@pytest.mark.parametrize("engine, old_state", [
    (DPG, {"log_z": {"log_sum": {}, "count": {}}, "baseline": {"value": -1.0}}),
    (KLRL, {"controller": {"value": 1.0, "reward_baseline": 0.0, "rollout": None}}),
], ids=["dpg", "klrl"])
def test_a_checkpoint_with_the_old_engine_state_layout_is_refused(engine, old_state, tmp_path):
    engine(**{**SETTINGS, "steps": 20}, checkpoint_dir=str(tmp_path)).fit(toy_a_target(1.0))
    checkpoint = sorted(tmp_path.glob("checkpoint-*"))[-1]
    torch.save(old_state, checkpoint / "engine-0.pt")  # the layout before DPGState / KLRLState
    (checkpoint / "manifest.json").unlink()
    write_manifest(checkpoint)
    name = "dpg" if engine is DPG else "klrl"
    with pytest.raises(ConfigError, match=f"holds no engine state '{name}' \\(it was written by "
                                          "an older version of this engine\\)"):
        engine(**{**SETTINGS, "steps": 30}, checkpoint_dir=str(tmp_path)).fit(toy_a_target(1.0))


@pytest.mark.parametrize("engine", [DPG, KLRL])
def test_resume_on_other_contexts_is_refused(engine, tmp_path):
    settings = {**SETTINGS, "steps": 10, "contexts_per_step": 2, "checkpoint_dir": str(tmp_path)}
    engine(**settings).fit(conditional_world(), contexts=["a", "b"])
    with pytest.raises(ConfigError, match="written by a fit on other contexts than this one"):
        engine(**{**settings, "steps": 20}).fit(conditional_world(), contexts=["b", "a"])
    resumed = engine(**{**settings, "steps": 20}).fit(conditional_world(), contexts=["a", "b"])
    assert len(resumed.history) == 20


def test_a_plain_sgd_run_resumes_bit_identically(tmp_path):
    # Plain SGD keeps no per-parameter state; torch's optimizer loader raised on it.
    settings = {**SETTINGS, "optimizer": "sgd", "learning_rate": 0.05}
    ckpt = str(tmp_path / "ckpt")
    DPG(**{**settings, "steps": 30}, checkpoint_dir=ckpt, checkpoint_every=10).fit(toy_a_target(1.0))
    resumed = DPG(**{**settings, "steps": 60}, checkpoint_dir=ckpt, checkpoint_every=10).fit(
        toy_a_target(1.0))
    reference = DPG(**{**settings, "steps": 60}).fit(toy_a_target(1.0))
    assert resumed.history[29]["step"] == 29 and len(resumed.history) == 60
    for a, b in zip(parameters(reference), parameters(resumed)):
        assert torch.equal(a, b)
