"""CDPG with one context whose every draw violates a hard constraint (SPEC §2.5): routine on
code tasks (a prompt the prior never answers with parseable code); training and the final
per-context evaluation go on, and the empty context is reported, not fatal."""

import math

import pyro
import pytest
import torch
from conftest import P1, T, brute_force_toy_a

import bayesalign as ba
from bayesalign.inference import DPG, KLRL
from bayesalign.models import TabularLM


def half_impossible_world() -> ba.Target:
    prior = TabularLM(torch.tensor(P1, dtype=torch.float64), torch.tensor(T, dtype=torch.float64), 3)

    @ba.target
    def has_two_unless_never(context):
        y = pyro.sample("y", prior)
        possible = (y.tokens == 2).any(-1) if context == "a" else torch.zeros(len(y), dtype=torch.bool)
        ba.constraint("has_two", possible)

    return has_two_unless_never


@pytest.mark.parametrize("engine", [DPG(baseline=True, steps=200, batch_size=32,
                                        contexts_per_step=2, eval_samples=1024, progress=False),
                                    KLRL(steps=20, batch_size=32, contexts_per_step=2,
                                         eval_samples=1024, progress=False)])
def test_an_empty_context_does_not_stop_a_conditional_fit(engine):
    # Z for context 'a' = P_a(2 ∈ y), by a plain loop over the 27 sequences (SPEC §10: 0.466).
    z_a = sum(a for y, a in brute_force_toy_a(1.0)["a"].items() if 2 in y)
    assert z_a == pytest.approx(0.466, abs=5e-4)
    post = engine.fit(half_impossible_world(), contexts=["a", "never"])
    assert any("context 'never'" in w and "weights are zero" in w for w in post.diagnostics.warnings)
    assert post.extras["log_z[a]"] == pytest.approx(math.log(z_a), abs=0.15)
    assert post.diagnostics.kl_target_policy is None  # unknown for 'never', so no average
    if isinstance(engine, DPG):
        assert post.extras["running_log_z[never]"] == -math.inf
        assert math.exp(post.extras["running_log_z[a]"]) == pytest.approx(z_a, rel=0.1)
