"""SMC against exact normalisers on tabular worlds (SPEC §11; genlm-control's test worlds)."""

import math

import pyro
import pytest
import torch
from conftest import brute_force_toy_a, conditional_world, toy_a_target

import bayesalign as ba
from bayesalign.errors import ConfigError, EmptySupportError, InvalidFactorError
from bayesalign.inference import SMC, Exact, Importance
from bayesalign.inference.resampling import SCHEMES
from bayesalign.inference.twists import optimal_twist
from bayesalign.models import PrefixTreeLM, TabularLM

EOS = 2
NEG = -math.inf


def genlm_world() -> ba.Target:
    """a ∝ (3, 2, 1) on the strings "0", "00", "1" (tokens 0, 1, EOS = 2) and L = (1, 2, 3):
    Z = (3·1 + 2·2 + 1·3)/6 = 10/6 (SPEC §11)."""
    uniform = math.log(1 / 3)
    f64 = {"dtype": torch.float64}
    first = torch.tensor([[math.log(5 / 6), math.log(1 / 6), NEG]], **f64)
    second = torch.full((3, 3), uniform, **f64)
    second[0] = torch.tensor([math.log(2 / 5), NEG, math.log(3 / 5)], **f64)  # after "0"
    second[1] = torch.tensor([NEG, NEG, 0.0], **f64)  # after "1"
    third = torch.full((9, 3), uniform, **f64)
    third[0] = torch.tensor([NEG, NEG, 0.0], **f64)  # after "00"
    prior = PrefixTreeLM.from_conditionals([first, second, third], eos_token_id=EOS)
    likelihood = {(0, EOS): 1.0, (0, 0, EOS): 2.0, (1, EOS): 3.0}

    @ba.target
    def genlm():
        y = pyro.sample("y", prior)
        values = [likelihood.get(tuple(row), 0.0) for row in y.token_lists()]
        pyro.factor("L", torch.tensor(values, dtype=torch.float64).log())

    return genlm


def truncated_world() -> ba.Target:
    """A bigram with EOS whose samples are often cut at length 3 without one: complete as
    truncated prefixes (SPEC §11), so SMC and Exact must agree on what a complete sequence is."""
    initial = torch.tensor([0.5, 0.4, 0.1], dtype=torch.float64)
    transition = torch.tensor([[0.5, 0.3, 0.2], [0.3, 0.6, 0.1], [1 / 3, 1 / 3, 1 / 3]],
                              dtype=torch.float64)
    prior = TabularLM(initial, transition, length=3, eos_token_id=EOS)

    @ba.target
    def truncated():
        y = pyro.sample("y", prior)
        ones = ((y.tokens == 1) & y.mask).sum(-1).double()
        ba.reward("ones", ones, kl_coef=0.5)

    return truncated


def uniform_proposal(eos_token_id: int | None = None) -> TabularLM:
    """q ≠ a, so the no-twist runs carry intermediate weights and resample mid-sequence."""
    return TabularLM(torch.full((3,), 1 / 3, dtype=torch.float64),
                     torch.full((3, 3), 1 / 3, dtype=torch.float64), 3, eos_token_id)


def mean_z(target: ba.Target, runs: int, **options) -> tuple[float, float, int]:
    """Mean and standard error of Ẑ over seeded independent runs; total resampling events."""
    zs, events = [], 0
    for seed in range(runs):
        posterior = SMC(seed=seed, **options).fit(target)
        zs.append(math.exp(posterior.log_z))
        events += posterior.extras["resampling_events"]
    z = torch.tensor(zs, dtype=torch.float64)
    return float(z.mean()), float(z.std() / math.sqrt(runs)), events


@pytest.fixture(scope="module")
def toy_a() -> ba.Target:
    return toy_a_target()


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_z_hat_is_unbiased_without_a_twist(scheme, toy_a):
    z = brute_force_toy_a(1.0)["z"]
    mean, se, events = mean_z(toy_a, 400, num_particles=4, resampling=scheme,
                              proposal=uniform_proposal(), ess_threshold=0.9)
    assert events > 400  # resampling fired mid-sequence in most runs
    assert abs(mean - z) < 3 * se, (mean, z, se)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_z_hat_is_unbiased_with_the_optimal_twist_under_the_prior_proposal(scheme, toy_a):
    z = brute_force_toy_a(1.0)["z"]
    mean, se, events = mean_z(toy_a, 400, num_particles=4, resampling=scheme,
                              twist=optimal_twist(toy_a), ess_threshold=0.9)
    assert events > 100
    assert se > 0  # the twist changes the weights' variance, not their law: not exact here
    assert abs(mean - z) < 3 * se, (mean, z, se)


@pytest.mark.parametrize("world", [toy_a_target, genlm_world, truncated_world])
@pytest.mark.parametrize("num_particles", [2, 3, 17])
def test_the_optimal_twisted_proposal_gives_log_z_exactly(world, num_particles):
    target = world()
    log_z = Exact().fit(target).log_z
    twist = optimal_twist(target)
    for seed, scheme in enumerate(sorted(SCHEMES)):
        posterior = SMC(num_particles=num_particles, twist=twist, proposal="twisted",
                        resampling=scheme, ess_threshold=1.0, seed=seed).fit(target)
        assert posterior.log_z == pytest.approx(log_z, abs=1e-10)
        assert posterior.diagnostics.ess == pytest.approx(num_particles)


def test_genlm_world_has_z_ten_sixths_with_and_without_the_twist():
    target = genlm_world()
    assert math.exp(Exact().fit(target).log_z) == pytest.approx(10 / 6, abs=1e-12)
    mean, se, _ = mean_z(target, 400, num_particles=3)
    assert abs(mean - 10 / 6) < 3 * se, (mean, se)
    mean, se, _ = mean_z(target, 400, num_particles=3, twist=optimal_twist(target))
    assert abs(mean - 10 / 6) < 3 * se, (mean, se)
    twisted = SMC(num_particles=3, twist=optimal_twist(target), proposal="twisted").fit(target)
    assert math.exp(twisted.log_z) == pytest.approx(10 / 6, abs=1e-10)


def test_samples_cut_at_the_priors_length_are_complete_as_exact_says():
    target = truncated_world()
    exact = Exact().fit(target)
    mean, se, _ = mean_z(target, 400, num_particles=4, ess_threshold=0.9,
                         proposal=uniform_proposal(EOS))
    assert abs(mean - math.exp(exact.log_z)) < 3 * se, (mean, math.exp(exact.log_z), se)
    posterior = SMC(num_particles=10_000).fit(target)
    truncated = posterior.samples.mask.all(-1) & (posterior.samples.tokens[:, -1] != EOS)
    assert truncated.any()  # particles that reach length 3 without EOS are complete
    assert posterior.samples.keys() and set(posterior.samples.keys()) <= set(exact.samples.keys())
    assert posterior.diagnostics.tvd < 0.05


@pytest.mark.parametrize("context", ["a", "b"])
def test_a_conditional_target_is_solved_for_the_context_given(context):
    target = conditional_world()
    log_z = Exact().fit(target, context).log_z
    assert SMC(num_particles=4, twist=optimal_twist(target, context), proposal="twisted").fit(
        target, context).log_z == pytest.approx(log_z, abs=1e-10)
    posterior = SMC(num_particles=20_000).fit(target, context)
    assert posterior.log_z == pytest.approx(log_z, abs=0.05)
    assert posterior.context == context and posterior.diagnostics.tvd < 0.03


def test_the_weighted_particles_approximate_p(toy_a):
    posterior = SMC(num_particles=20_000, ess_threshold=1.0).fit(toy_a)
    assert posterior.diagnostics.tvd < 0.03
    assert posterior.log_weights is not None and len(posterior.samples) == 20_000
    equal = SMC(num_particles=20_000, final_resample=True).fit(toy_a)
    assert equal.log_weights is None and equal.diagnostics.tvd < 0.03


def test_history_counts_resampling_events_and_ess_per_step(toy_a):
    always = SMC(num_particles=8, ess_threshold=1.0).fit(toy_a)
    assert [row["resampled"] for row in always.history] == [1, 1, 0]  # none once all complete
    assert always.extras["resampling_events"] == 2
    never = SMC(num_particles=8, ess_threshold=0.0, proposal=uniform_proposal()).fit(toy_a)
    assert never.extras["resampling_events"] == 0
    assert [row["step"] for row in never.history] == [1, 2, 3]
    assert all(1 <= row["ess"] <= 8 for row in never.history)
    assert never.extras["ess_final"] == never.diagnostics.ess == never.history[-1]["ess"]


def test_particles_stop_at_eos_and_keep_their_weight():
    target = genlm_world()
    posterior = SMC(num_particles=64, ess_threshold=0.0).fit(target)
    weights = {key: float(w) for key, w in zip(posterior.samples.keys(), posterior.log_weights)}
    # Without resampling each weight is P/q = L on its complete string.
    assert weights == pytest.approx({k: math.log(v) for k, v in
                                     {(0, EOS): 1.0, (0, 0, EOS): 2.0, (1, EOS): 3.0}.items()
                                     if k in weights})
    assert posterior.history[-1]["live"] == 0 and len(posterior.history) == 3


@pytest.mark.parametrize(("options", "match"), [
    ({"num_particles": 1}, "num_particles must be an integer >= 2"),
    ({"ess_threshold": 1.5}, r"ess_threshold must be in \[0, 1\], got 1.5"),
    ({"ess_threshold": -0.1}, "ess_threshold"),
    ({"resampling": "bogus"}, "unknown resampling scheme 'bogus'"),
    ({"proposal": "greedy"}, "proposal 'greedy' is unknown"),
])
def test_bad_options_are_config_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        SMC(**options)


def test_a_list_of_contexts_is_refused(toy_a):
    with pytest.raises(ConfigError, match="SMC: contexts="):
        SMC(num_particles=4).fit(toy_a, contexts=[None, None])


def test_every_particle_at_weight_zero_names_the_step_and_why():
    prior = TabularLM(torch.tensor([0.5, 0.5]), torch.full((2, 2), 0.5), 3)

    @ba.target
    def impossible():
        y = pyro.sample("y", prior)
        ba.constraint("never", torch.zeros(len(y), dtype=torch.bool))

    with pytest.raises(EmptySupportError, match="weight zero at step 3: 8 particles completed "
                                                "with a factor at -inf"):
        SMC(num_particles=8).fit(impossible)


@pytest.mark.parametrize(("value", "shown"), [(math.nan, "nan"), (math.inf, "inf")])
def test_a_nan_or_inf_twist_names_the_step_and_particle(toy_a, value, shown):
    def twist(prefixes):
        log_psi = torch.zeros(len(prefixes), dtype=torch.float64)
        if prefixes.shape[1] == 2:
            log_psi[-1] = value
        return log_psi

    with pytest.raises(InvalidFactorError, match=rf"twist is {shown} at step 2 for particle 5 "):
        SMC(num_particles=6, twist=twist).fit(toy_a)


def test_a_twist_of_the_wrong_shape_is_refused(toy_a):
    with pytest.raises(InvalidFactorError, match=r"shape \(6, 1\) at step 1 for 6 prefixes"):
        SMC(num_particles=6, twist=lambda p: torch.zeros(len(p), 1)).fit(toy_a)


@pytest.fixture(scope="module")
def causal_lm():
    from bayesalign.models.tiny import tiny_causal_lm

    return tiny_causal_lm(seed=1, initializer_range=0.3, max_new_tokens=6)


def test_the_causal_lm_kv_cache_follows_resampling(causal_lm):
    from bayesalign.inference.next_token import CausalSteps

    everyone = torch.arange(5)
    first, second = torch.tensor([1, 7, 40, 90, 3]), torch.tensor([5, 5, 60, 2, 11])
    ancestors = torch.tensor([3, 3, 0, 4, 1])

    def after(history: list[torch.Tensor], reorder: torch.Tensor | None) -> torch.Tensor:
        steps = CausalSteps(causal_lm, 5)
        for i, token in enumerate(history):
            steps.log_probs(everyone)
            steps.advance(everyone, token)
            if i == 0 and reorder is not None:
                steps.reorder(reorder)
        return steps.log_probs(everyone)

    resampled = after([first, second], ancestors)
    # The same lineages fed from scratch: the reordered cache must give the same next-token law.
    assert torch.allclose(resampled, after([first[ancestors], second], None), atol=1e-6)
    assert not torch.allclose(resampled, after([first, second], None), atol=1e-3)


def test_smc_on_a_causal_lm_agrees_with_importance_sampling(causal_lm):
    @ba.target
    def low_ids():
        y = pyro.sample("y", causal_lm)
        ba.reward("low", ((y.tokens < 50) & y.mask).sum(-1).double(), kl_coef=1.0)

    reference = Importance(num_samples=8192, seed=0).fit(low_ids).diagnostics
    z_is, z_is_se = math.exp(reference.log_z), math.exp(reference.log_z) * reference.log_z_se

    def partial_reward(prefixes):  # ψ_t = exp(reward so far): a prefix twist
        return (prefixes < 50).sum(-1).double()

    zs, events = [], 0
    for seed in range(12):
        posterior = SMC(num_particles=64, twist=partial_reward, seed=seed).fit(low_ids)
        zs.append(math.exp(posterior.log_z))
        events += posterior.extras["resampling_events"]
        samples = posterior.samples
        ended = (samples.tokens == causal_lm.eos_token_id) & samples.mask
        assert ((ended.sum(-1) == 1) | samples.mask.all(-1)).all()  # EOS or max length
    z = torch.tensor(zs, dtype=torch.float64)
    se = math.sqrt(float(z.var()) / len(zs) + z_is_se**2)
    assert events > 0
    assert abs(float(z.mean()) - z_is) < 3 * se, (float(z.mean()), z_is, se)
