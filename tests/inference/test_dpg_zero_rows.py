"""DPG skips the policy's forward and backward on draws whose loss term is 0 at any θ (P = 0
under forward KL without a baseline, drawn by the policy itself), and the run stays the same."""

import pytest
import torch
from conftest import has_two_target, toy_a_target

from bayesalign.inference import DPG
from bayesalign.models.prefix_tree import PrefixTreeLM

SETTINGS = {"steps": 40, "batch_size": 64, "seed": 0, "progress": False}


def fit_counting_rows(monkeypatch, engine: DPG, target, skip: bool):
    """The fit, and how many rows the policy's token_log_probs saw with gradients (training's
    passes; evaluation runs without)."""
    rows = [0]
    original = PrefixTreeLM.token_log_probs

    def counted(self, value):
        rows[0] += len(value) if torch.is_grad_enabled() else 0
        return original(self, value)

    with monkeypatch.context() as patch:
        patch.setattr(PrefixTreeLM, "token_log_probs", counted)
        if not skip:
            patch.setattr(DPG, "_rows_to_run", lambda self, batch, drawn_by_policy: None)
        post = engine.fit(target)
    return post, rows[0]


def test_zero_weight_rows_skip_the_policy_passes_and_leave_the_run_unchanged(monkeypatch):
    target = has_two_target()  # Z = 0.466: about half of the prior's draws have P = 0
    skipped, rows_skipped = fit_counting_rows(monkeypatch, DPG(**SETTINGS), target, skip=True)
    full, rows_full = fit_counting_rows(monkeypatch, DPG(**SETTINGS), target, skip=False)
    support = target.support()
    assert torch.allclose(skipped.log_prob(support).detach(), full.log_prob(support).detach(),
                          atol=1e-12)
    losses = [(a["loss"], b["loss"]) for a, b in zip(skipped.history, full.history)]
    assert all(a == pytest.approx(b, abs=1e-12) for a, b in losses)
    assert [r["kl_policy_prior"] for r in skipped.history] == pytest.approx(
        [r["kl_policy_prior"] for r in full.history], abs=1e-12)
    # Each step drew 64 rows; the final diagnostics evaluate the law on the 27 sequences.
    enumerated = len(support)
    assert rows_full == 40 * 64 + enumerated
    # Only the draws with P > 0 were run: about Z = 0.466 of them at the start, more as π
    # moves to p (every one of p's draws has P > 0).
    trained = rows_skipped - enumerated
    assert 0.466 * 40 * 64 < trained < 0.9 * 40 * 64


@pytest.mark.parametrize("options", [{"baseline": True}, {"off_policy": True},
                                     {"divergence": "js"}, {"updates_per_batch": 2}])
def test_every_row_is_run_where_a_zero_weight_row_still_has_a_term(monkeypatch, options):
    # With a baseline or another f-divergence a draw with P = 0 is pushed down; off-policy
    # draws' log q is not log π; a held batch needs log π of every row for its later updates.
    _, rows = fit_counting_rows(monkeypatch, DPG(**{**SETTINGS, "steps": 4, **options}),
                                has_two_target(), skip=True)
    assert rows == 4 * 64 + len(has_two_target().support())


def test_a_reward_target_runs_every_row(monkeypatch):
    _, rows = fit_counting_rows(monkeypatch, DPG(**{**SETTINGS, "steps": 4}), toy_a_target(1.0),
                                skip=True)
    assert rows == 4 * 64 + len(toy_a_target(1.0).support())
