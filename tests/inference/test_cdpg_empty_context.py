"""CDPG with one context whose every draw violates a hard constraint (SPEC §2.5): routine on
code tasks (a prompt the prior never answers with parseable code); training and the final
per-context evaluation go on, and the empty context is reported, not fatal."""

import math
import warnings

import pyro
import pytest
import torch
from conftest import P1, T, brute_force_toy_a, toy_a_prior

import bayesalign as ba
from bayesalign.errors import DivergenceWarning, EmptySupportError
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


def rare_world() -> ba.Target:
    """Toy A constrained to 2, 2, 2: a(y) = 0.032, so 88% of 4-draw batches miss it."""
    prior = toy_a_prior()

    @ba.target
    def all_twos():
        y = pyro.sample("y", prior)
        ba.constraint("all_twos", (y.tokens == 2).all(-1))

    return all_twos


def test_dpg_steps_before_the_first_draw_in_the_support_are_steps_without_signal():
    z = brute_force_toy_a(1.0)["a"][(2, 2, 2)]
    engine = DPG(steps=40, batch_size=4, eval_samples=256, progress=False, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        posterior = engine.fit(rare_world())
    first = next(i for i, row in enumerate(posterior.history) if math.isfinite(row["log_z"]))
    assert 5 < first < 20  # it trained on through the first, empty batches (9 with this seed)
    assert all(row["loss"] == 0.0 for row in posterior.history[:first])
    # No posterior to collapse onto yet, so the divergence monitor has nothing to say then.
    assert not [w for w in caught if issubclass(w.category, DivergenceWarning)
                and int(str(w.message).split("step ")[1].split(":")[0]) < first]
    assert posterior.history[-1]["log_z"] > math.log(z) - 3


def test_dpg_that_never_reaches_the_support_says_so_after_twenty_steps():
    prior = toy_a_prior()

    @ba.target
    def impossible():
        y = pyro.sample("y", prior)
        ba.constraint("length_four", y.lengths == 4)

    with pytest.raises(EmptySupportError,
                       match=r"DPG step 19: all 4 importance weights are zero for context None, "
                             r"as at every one of the 20 steps so far"):
        DPG(steps=40, batch_size=4, progress=False).fit(impossible)
