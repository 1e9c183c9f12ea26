"""Divergence detection, the learning-rate schedule and loss normalisation of DPG and KL-RL."""

import math
import warnings

import pytest
import torch
from conftest import assert_monitor_quiet, has_two_target, toy_a_prior, toy_a_target

from bayesalign.errors import ConfigError, DivergenceWarning, TrainingError
from bayesalign.inference import DPG, KLRL
from bayesalign.inference.divergence import (
    DivergenceMonitor,
    DivergenceOptions,
    DivergenceState,
    PooledWeights,
)
from bayesalign.inference.dpg_state import DPGState
from bayesalign.inference.policy import ScoredBatch
from bayesalign.sequences import Sequences, mask_through_eos
from bayesalign.training.trainer import learning_rate_at

QUICK = {"batch_size": 64, "seed": 0, "progress": False, "eval_samples": 256}
# The toy counterpart of the lr 1e-4 DPG run on the code prior: SGD at lr 10 makes the
# policy collapse onto one sequence that meets the constraint (KL(p‖π) ≈ 32 nats, the policy's
# own draws all satisfying it, ESS fraction 1).
DIVERGING = {**QUICK, "optimizer": "sgd", "learning_rate": 10.0}


def test_the_warning_fires_on_a_collapsing_dpg_run_naming_step_and_signal():
    with pytest.warns(DivergenceWarning, match=r"DPG diverges at step 3: KL\(π‖a\) is 19.7 × the "
                                               r"target's estimated KL\(p‖a\)") as caught:
        post = DPG(steps=40, **DIVERGING).fit(has_two_target())
    # Once per signal: (b) at step 3, then (d), KL(π‖a) past the target's, once it has lasted
    # divergence_patience = 5 checks (steps 2 to 6).
    messages = [str(w.message) for w in caught if w.category is DivergenceWarning]
    assert len(messages) == 2
    assert messages[1].startswith("DPG diverges at step 6: KL(π‖a) has exceeded the target's "
                                  "estimated KL(p‖a) by more than divergence_kl_excess=1.0 nats")
    assert post.diagnostics.kl_target_policy > 20  # it did collapse
    assert post.history[-1]["ess_fraction"] == pytest.approx(1.0)  # which the ESS alone cannot see
    assert post.history[3]["monitor_kl_policy_prior_multiple"] > 10


def test_a_larger_step_is_caught_by_the_log_z_drift():
    with pytest.warns(DivergenceWarning, match=r"DPG diverges at step 6: the step's log Ẑ has "
                                               r"been more than divergence_log_z_se=8.0 standard "
                                               r"errors from the running log Ẑ for 5 consecutive "
                                               r"steps \(now 13.5\)"):
        DPG(steps=10, **{**DIVERGING, "learning_rate": 100.0}).fit(has_two_target())


def test_the_warning_fires_on_a_diverging_rloo_run():
    with pytest.warns(DivergenceWarning, match=r"KLRL-rloo diverges at step 5: the step's log Ẑ "
                                               r"has been more than divergence_log_z_se=8.0"):
        post = KLRL(algorithm="rloo", steps=10, **{**DIVERGING, "learning_rate": 100.0}).fit(
            has_two_target())
    assert post.diagnostics.kl_target_policy > 20


def test_stop_raises_at_the_last_checkpoint(tmp_path):
    engine = DPG(steps=40, **DIVERGING, divergence_action="stop", checkpoint_dir=str(tmp_path),
                 checkpoint_every=1, keep_checkpoints=2)
    with pytest.raises(TrainingError, match=r"DPG diverges at step 3: .*training stopped "
                                            r"\(divergence_action='stop'\)\. Last checkpoint "
                                            r"kept: .*checkpoint-00000003"):
        engine.fit(has_two_target())
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-00000002", "checkpoint-00000003"]


@pytest.mark.parametrize("engine", ["dpg", "dpg_off_policy", "rloo", "ppo"])
def test_converged_runs_do_not_warn(engine):
    # On a hard constraint; test_policy_engines.py checks the same margins on Toy A's reward
    # (its runs are these engines at this budget).
    settings = {**QUICK, "steps": 3000}
    make = {"dpg": lambda: DPG(**settings), "dpg_off_policy": lambda: DPG(off_policy=True, **settings),
            "rloo": lambda: KLRL(**settings), "ppo": lambda: KLRL(algorithm="ppo", **settings)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        post = make[engine]().fit(has_two_target())
    assert post.diagnostics.kl_target_policy < 0.05
    assert_monitor_quiet(post, checks_every=4 if engine == "ppo" else 1)


@pytest.mark.parametrize("option, value, message", [
    ("divergence_action", "raise", r"divergence_action must be one of \('warn', 'stop', 'off'\)"),
    ("divergence_ess_fraction", 1.5, "divergence_ess_fraction must be in \\(0, 1\\)"),
    ("divergence_patience", 0, "divergence_patience must be an integer >= 1"),
    ("divergence_kl_multiple", 0.0, "divergence_kl_multiple must be > 0"),
    ("divergence_kl_excess", -1.0, "divergence_kl_excess must be > 0"),
    ("divergence_log_z_se", -1.0, "divergence_log_z_se must be > 0"),
    ("loss_normalisation", "batch", "loss_normalisation must be one of \\('sequence', 'token'\\)"),
    ("warmup_steps", -1, "warmup_steps must be >= 0"),
    ("lr_decay_steps", 0, r"lr_decay_steps \(0\) must exceed warmup_steps \(0\)"),
])
@pytest.mark.parametrize("engine", [DPG, KLRL])
def test_bad_options_are_config_errors_naming_the_option(engine, option, value, message):
    with pytest.raises(ConfigError, match=message):
        engine(**{option: value})


def test_ppo_refuses_token_normalisation():
    with pytest.raises(ConfigError, match="loss_normalisation='token' is for reinforce and rloo"):
        KLRL(algorithm="ppo", loss_normalisation="token")


def test_the_monitor_state_round_trips_and_an_old_state_is_refused():
    state = DivergenceState({"None": PooledWeights(0.5, 0.25, 7, -0.3, 1.5)}, 2, 3, ["log_z"])
    again = DivergenceState()
    again.load_state_dict(state.state_dict())
    assert again == state
    dpg = DPGState("digest", -1.0, None)
    old = {k: v for k, v in dpg.state_dict().items() if k != "divergence"}
    with pytest.raises(ConfigError, match="has no divergence monitor .*older version"):
        dpg.load_state_dict(old)


def test_a_state_from_before_the_excess_signal_resumes_with_its_count_at_zero():
    state = DivergenceState({"None": PooledWeights(0.5, 0.25, 7, -0.3, 1.5)}, 2, 3, ["log_z"], 4)
    old = {k: v for k, v in state.state_dict().items() if k != "high_excess_checks"}
    again = DivergenceState()
    again.load_state_dict(old)
    assert again == DivergenceState(state.pooled, 2, 3, ["log_z"], 0)


@pytest.mark.parametrize("policy_kl, warned", [(3.3, True), (2.6, False)])
def test_kl_policy_prior_past_the_targets_by_more_than_the_excess_warns(policy_kl, warned):
    """A hard constraint at Ẑ = 1/8 (KL(p‖a) = log 8 = 2.08): a policy at KL(π‖a) = 3.3 is 1.22
    nats past it, which for π in the support is KL(π‖p) — RLOO's template on `return` read
    1.3–2.0 — while 3.3 / 2.08 = 1.6 stays under the multiple (b) of 5; at 2.6 (0.52 past) the
    monitor stays quiet. The excess has to last divergence_patience = 5 checks."""
    monitor = DivergenceMonitor(DivergenceOptions(), "KLRL-rloo", DivergenceState(), lambda: "")
    batch = torch.full((64,), -math.inf, dtype=torch.float64)
    batch[:8] = 0.0  # P/q = 1 on the support (q = a there), 0 off it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = []
        for step in range(6):
            signals = monitor.signals("None", batch, torch.zeros(64), policy_kl)
            rows.append(monitor.check(step, [signals]))
    assert rows[-1]["monitor_kl_policy_prior_excess"] == pytest.approx(policy_kl - math.log(8))
    assert all(r["monitor_kl_policy_prior_multiple"] < 5 for r in rows)
    messages = [str(w.message) for w in caught if issubclass(w.category, DivergenceWarning)]
    if warned:
        assert len(messages) == 1  # reported once, at the fifth check in a row
        assert messages[0].startswith("KLRL-rloo diverges at step 4: KL(π‖a) has exceeded the "
                                      "target's estimated KL(p‖a) by more than "
                                      "divergence_kl_excess=1.0 nats for 5 consecutive steps "
                                      "(now 1.22)")
    else:
        assert messages == []


@pytest.mark.parametrize("share, reading", [(1 / 64, None), (0.5, 0.0)])
def test_a_step_outside_the_support_reads_as_collapse_only_when_that_is_unlikely(share, reading):
    """At 1 in 64 draws in the support a batch of 64 misses it 37% of the time: no reading; at
    one in two it would miss with chance 2^-64, so it reads as ESS 0 (and counts to patience)."""
    monitor = DivergenceMonitor(DivergenceOptions(), "DPG", DivergenceState(), lambda: "")
    inside = round(share * 640)
    first = torch.full((640,), -math.inf, dtype=torch.float64)
    first[:inside] = 0.0
    monitor.signals("None", first, torch.zeros(640), 0.0)
    assert monitor.state.pooled["None"].in_support == inside
    outside = torch.full((64,), -math.inf, dtype=torch.float64)
    assert monitor.signals("None", outside, torch.zeros(64), 0.0).get("ess_fraction") == reading
    assert monitor.state.pooled["None"].count == 704  # pooled either way


def test_pooled_weights_estimate_log_z_and_e_p_log_potential():
    """Hand-computable: weights 1, 3 then 2, 2 pool to Ẑ = 2, E_p log φ = Σ w log φ / Σ w."""
    pooled = PooledWeights()
    pooled.add(torch.tensor([1.0, 3.0]).log(), torch.tensor([0.0, 1.0]))
    pooled.add(torch.tensor([2.0, 2.0]).log(), torch.tensor([2.0, -1.0]))
    assert pooled.log_z() == pytest.approx(math.log(2.0))
    assert pooled.mean_log_potential == pytest.approx((3 * 1 + 2 * 2 - 2 * 1) / 8)
    # se of log mean w: sqrt(Σw²/(Σw)² − 1/n) = sqrt(18/64 − 1/4)
    assert pooled.log_z_se() == pytest.approx(math.sqrt(18 / 64 - 1 / 4))


@pytest.mark.parametrize("engine", [DPG, KLRL])
def test_the_trainer_applies_and_logs_the_schedule(engine):
    post = engine(steps=12, warmup_steps=4, lr_decay_steps=10, learning_rate=0.05,
                  **QUICK).fit(toy_a_target(1.0))
    rates = [row["learning_rate"] for row in post.history]
    assert rates == [0.05 * learning_rate_at(s, 1.0, 4, 10) for s in range(12)]
    assert rates[:4] == pytest.approx([0.0125, 0.025, 0.0375, 0.05]) and rates[-1] == pytest.approx(0.005)
    constant = engine(steps=3, **QUICK).fit(toy_a_target(1.0))
    assert {row["learning_rate"] for row in constant.history} == {
        toy_a_prior().trainable_copy().recommended_optimizer[1]}


def test_dpg_token_normalisation_divides_each_log_prob_by_its_length():
    """Hand-computable: π = q = a, log Z = 0, so DPG's weight is −P/π = −φ; lengths 3, 2, 1."""
    prior = toy_a_prior()
    tokens = torch.tensor([[0, 1, 1], [1, 2, 0], [2, 0, 0]])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    y = Sequences(tokens, mask)
    policy = prior.trainable_copy()
    log_a = prior.log_prob(y).double()
    log_phi = torch.tensor([0.0, math.log(2.0), math.log(0.5)], dtype=torch.float64)
    batch = ScoredBatch(y, None, log_a, log_a, log_a + log_phi)
    log_pi = [float(v) for v in policy.log_prob(y).detach()]
    weights = [-1.0, -2.0, -0.5]
    for normalisation, lengths in (("sequence", [1, 1, 1]), ("token", [3, 2, 1])):
        engine = DPG(loss_normalisation=normalisation)
        loss, _, _ = engine._loss(policy, batch, 0.0, DPGState("", -1.0, None))
        expected = sum(w * lp / n for w, lp, n in zip(weights, log_pi, lengths)) / 3
        assert float(loss.detach()) == pytest.approx(expected, abs=1e-12)
    assert mask_through_eos(tokens, None).all()  # the lengths come from the mask given


def test_klrl_token_normalisation_on_equal_lengths_is_a_smaller_step():
    """Toy A's sequences all have 3 tokens: "token" at lr 3η is "sequence" at lr η (SGD)."""
    settings = {**QUICK, "steps": 5, "optimizer": "sgd"}
    per_sequence = KLRL(learning_rate=0.1, **settings).fit(toy_a_target(1.0))
    per_token = KLRL(learning_rate=0.3, loss_normalisation="token", **settings).fit(
        toy_a_target(1.0))
    for a, b in zip(per_sequence.policy.module.parameters(), per_token.policy.module.parameters()):
        assert torch.allclose(a, b, atol=1e-12)
    assert not all(torch.equal(a, b) for a, b in zip(
        per_sequence.policy.module.parameters(), toy_a_prior().trainable_copy().module.parameters()))
