"""IWAE bounds on log Z and the KL brackets they give, against exact enumeration (SPEC §11)."""

import math

import pytest
import torch
from conftest import brute_force_toy_a, conditional_world, toy_a_target

from bayesalign import diagnostics as dx
from bayesalign.bounds import iwae_bounds
from bayesalign.errors import ConfigError, EmptySupportError, VocabularyMismatchError
from bayesalign.inference import SMC, exact_reference, log_z_bounds, snis_reference
from bayesalign.inference.twists import optimal_twist
from bayesalign.models import PrefixTreeLM, TabularLM
from bayesalign.sequences import Sequences

F64 = {"dtype": torch.float64}


def perturbed_lm() -> TabularLM:
    """A q ≠ a and ≠ p on Toy A's vocabulary and length, with full support."""
    return TabularLM(torch.tensor([0.2, 0.3, 0.5], **F64),
                     torch.tensor([[0.4, 0.3, 0.3], [0.2, 0.3, 0.5], [0.2, 0.2, 0.6]], **F64), 3)


def exact_kls(target, q, context=None) -> tuple[float, float, float]:
    """log Z, KL(q‖p) and KL(p‖q) by enumerating the support."""
    support = target.support(context)
    log_score = target.log_score(support, context).double()
    log_z = float(torch.logsumexp(log_score, 0))
    log_p, log_q = log_score - log_z, q.log_prob(support).double()
    return log_z, dx.kl(log_q, log_p), dx.kl(log_p, log_q)


@pytest.fixture(scope="module")
def toy_a():
    return toy_a_target()


@pytest.fixture(scope="module")
def toy_a_exact(toy_a):
    # Toy A's reward counts 2s (≤ 3, kl_coef 1): P/a ≤ e³ bounds it with the prior as proposal.
    return exact_reference(toy_a, bound=math.e**3, num_samples=400, seed=1)


def test_the_bounds_bracket_log_z_and_tighten_as_k_grows(toy_a, toy_a_exact):
    log_z = math.log(brute_force_toy_a(1.0)["z"])
    gaps = []
    for k in (1, 4, 16, 64):
        bounds = log_z_bounds(toy_a, perturbed_lm(), num_samples=k, num_runs=400,
                              exact_samples=toy_a_exact, seed=k)
        # In expectation over replicates, within 3 Monte-Carlo se.
        assert bounds.log_z_lower - 3 * bounds.log_z_lower_se <= log_z, (k, bounds)
        assert bounds.log_z_upper + 3 * bounds.log_z_upper_se >= log_z, (k, bounds)
        assert bounds.num_samples == k and bounds.num_runs == 400 and bounds.num_exact == 400
        gaps.append(bounds.gap)
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps  # measured gap decreases with K
    assert gaps[0] > 0.05 and gaps[-1] < 0.01, gaps


def test_one_sample_bounds_are_the_elbo_and_the_eubo(toy_a, toy_a_exact):
    bounds = log_z_bounds(toy_a, perturbed_lm(), num_samples=1, num_runs=200,
                          exact_samples=toy_a_exact)
    assert bounds.log_z_lower == pytest.approx(bounds.elbo, abs=1e-12)
    assert bounds.log_z_upper == pytest.approx(bounds.eubo, abs=1e-12)
    assert bounds.kl_q_target.low == 0 and bounds.kl_target_q.low == 0


@pytest.mark.parametrize("seed", range(4))
def test_for_large_k_a_single_run_brackets_log_z(toy_a, seed):
    log_z = math.log(brute_force_toy_a(1.0)["z"])
    exact = exact_reference(toy_a, bound=math.e**3, num_samples=1, seed=100 + seed)
    bounds = log_z_bounds(toy_a, perturbed_lm(), num_samples=8192, num_runs=1,
                          exact_samples=exact, seed=seed)
    # One replicate's sd is about 0.004 at K = 8192 (measured); 0.025 is six of them.
    assert bounds.log_z_lower == pytest.approx(log_z, abs=0.025)
    assert bounds.log_z_upper == pytest.approx(log_z, abs=0.025)
    assert math.isinf(bounds.log_z_lower_se)  # one replicate: no standard error


def test_the_kl_brackets_contain_the_exact_kls_of_a_given_q(toy_a, toy_a_exact):
    q = perturbed_lm()
    log_z, kl_q_p, kl_p_q = exact_kls(toy_a, q)
    bounds = log_z_bounds(toy_a, q, num_samples=256, num_runs=200, exact_samples=toy_a_exact)
    assert bounds.kl_q_target.contains(kl_q_p, num_se=3), (kl_q_p, bounds.kl_q_target)
    assert bounds.kl_target_q.contains(kl_p_q, num_se=3), (kl_p_q, bounds.kl_target_q)
    assert bounds.kl_q_target.high - bounds.kl_q_target.low < 0.01  # the log Z gap at K = 256
    assert bounds.elbo == pytest.approx(log_z - kl_q_p, abs=3 * bounds.elbo_se)
    assert bounds.eubo == pytest.approx(log_z + kl_p_q, abs=3 * bounds.eubo_se)


def test_q_equal_to_the_target_gives_a_zero_width_bracket(toy_a, toy_a_exact):
    support = toy_a.support()
    log_score = toy_a.log_score(support).double()
    log_z = float(torch.logsumexp(log_score, 0))
    p = PrefixTreeLM.from_law(support, log_score - log_z, vocab_size=3)
    bounds = log_z_bounds(toy_a, p, num_samples=8, num_runs=50, exact_samples=toy_a_exact)
    # w = P/p = Z on every draw: both bounds are log Z, every KL end is 0 (up to rounding).
    for value in (bounds.log_z_lower, bounds.log_z_upper, bounds.elbo, bounds.eubo):
        assert value == pytest.approx(log_z, abs=1e-9)
    for interval in (bounds.kl_q_target, bounds.kl_target_q):
        assert interval.low == pytest.approx(0, abs=1e-9)
        assert interval.high == pytest.approx(0, abs=1e-9)
        assert interval.low_se < 1e-9 and interval.high_se < 1e-9


@pytest.mark.parametrize("context", ["a", "b"])
def test_a_conditional_target_is_bracketed_for_the_context_given(context):
    target = conditional_world()
    q = perturbed_lm()
    log_z, kl_q_p, kl_p_q = exact_kls(target, q, context)
    exact = exact_reference(target, bound=1.0, num_samples=300, context=context, seed=2)
    bounds = log_z_bounds(target, q, num_samples=64, num_runs=300, exact_samples=exact,
                          context=context)
    assert bounds.log_z_lower - 3 * bounds.log_z_lower_se <= log_z
    assert bounds.log_z_upper + 3 * bounds.log_z_upper_se >= log_z
    # q has full support and p none where no 2 is drawn: KL(q‖p) = inf, and the bracket says so.
    assert kl_q_p == math.inf and bounds.kl_q_target.low == math.inf
    assert bounds.kl_q_target.contains(kl_q_p)
    assert bounds.kl_target_q.contains(kl_p_q, num_se=3), (kl_p_q, bounds.kl_target_q)


def test_a_q_with_mass_outside_the_target_has_an_infinite_kl_q_target():
    target = conditional_world()
    exact = exact_reference(target, bound=1.0, num_samples=50, context="a")
    # The prior makes sequences without a 2, where P = 0: KL(a‖p) = inf, and the bracket says so.
    bounds = log_z_bounds(target, num_samples=64, num_runs=50, exact_samples=exact, context="a")
    assert bounds.kl_q_target.low == math.inf and bounds.kl_q_target.high == math.inf
    assert math.isfinite(bounds.log_z_lower) and math.isfinite(bounds.log_z_upper)
    _, _, kl_p_a = exact_kls(target, target.prior("a"), "a")
    assert bounds.kl_target_q.contains(kl_p_a, num_se=3), (kl_p_a, bounds.kl_target_q)


def test_smc_reports_its_log_z_hat_as_a_lower_bound_that_tightens_with_n(toy_a):
    log_z = math.log(brute_force_toy_a(1.0)["z"])
    q = perturbed_lm()
    means = []
    for n in (2, 32):
        values = []
        for seed in range(100):
            diagnostics = SMC(num_particles=n, proposal=q, seed=seed).fit(toy_a).diagnostics
            assert diagnostics.log_z_lower == diagnostics.log_z and diagnostics.log_z_upper is None
            values.append(diagnostics.log_z_lower)
        values = torch.tensor(values, **F64)
        mean, se = float(values.mean()), float(values.std() / 10)
        assert mean <= log_z + 3 * se, (n, mean, se)  # E log Ẑ ≤ log Z (Jensen)
        means.append(mean)
    assert log_z - means[1] < log_z - means[0], means


def test_no_exact_sample_for_the_upper_bound_says_how_to_get_one(toy_a):
    with pytest.raises(ConfigError, match=r"needs exact target draws: pass "
                                          r"exact_samples=exact_reference\(target, bound=M"):
        log_z_bounds(toy_a, perturbed_lm(), num_samples=4)


def test_an_snis_reference_is_not_exact_samples(toy_a):
    snis = snis_reference(toy_a, num_samples=100)
    with pytest.raises(ConfigError, match="'snis' Reference"):
        log_z_bounds(toy_a, num_samples=4, exact_samples=snis)


def test_a_reference_for_another_context_is_refused():
    target = conditional_world()
    exact = exact_reference(target, bound=1.0, num_samples=10, context="a")
    with pytest.raises(ConfigError, match="built for context 'a', not for context 'b'"):
        log_z_bounds(target, num_samples=4, exact_samples=exact, context="b")


def test_exact_samples_with_zero_target_mass_are_refused():
    target = conditional_world()
    no_two = Sequences(tokens=torch.tensor([[0, 1, 2], [0, 0, 0]]),
                       mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(EmptySupportError, match="exact sample 1 has log P = -inf"):
        log_z_bounds(target, num_samples=4, exact_samples=no_two, context="a")


@pytest.mark.parametrize(("options", "match"), [
    ({"num_samples": 0}, r"num_samples \(K\) must be an integer >= 1, got 0"),
    ({"num_samples": 2.5}, r"num_samples \(K\) must be an integer >= 1, got 2.5"),
    ({"num_runs": 0}, "num_runs must be an integer >= 1, got 0"),
])
def test_bad_sizes_are_config_errors(toy_a, toy_a_exact, options, match):
    with pytest.raises(ConfigError, match=match):
        log_z_bounds(toy_a, exact_samples=toy_a_exact, **options)


def test_a_q_with_another_vocabulary_is_refused(toy_a, toy_a_exact):
    other = TabularLM(torch.full((4,), 0.25, **F64), torch.full((4, 4), 0.25, **F64), 3)
    with pytest.raises(VocabularyMismatchError, match=r"q vocabulary \(4, None\) differs"):
        log_z_bounds(toy_a, other, num_samples=4, exact_samples=toy_a_exact)


def test_iwae_bounds_checks_its_shapes():
    with pytest.raises(ConfigError, match=r"log_w_rest \[n, K - 1\] = \[n, 2\]"):
        iwae_bounds(torch.zeros(5, 3), torch.zeros(4), torch.zeros(4, 3))
    with pytest.raises(ConfigError, match=r"shape \[runs, K\]"):
        iwae_bounds(torch.zeros(5), torch.zeros(4), torch.zeros(4, 0))


@pytest.mark.parametrize("ess_threshold", [0.5, 1.0])
def test_smc_and_conditional_smc_bracket_log_z_and_tighten_with_n(toy_a, toy_a_exact,
                                                                  ess_threshold):
    q = perturbed_lm()
    log_z, kl_q_p, kl_p_q = exact_kls(toy_a, q)
    gaps = []
    for n in (2, 16):
        bounds = log_z_bounds(toy_a, q, num_samples=n, num_runs=300, exact_samples=toy_a_exact,
                              method="smc", smc=SMC(ess_threshold=ess_threshold), seed=n)
        assert bounds.method == "smc"
        assert bounds.log_z_lower - 3 * bounds.log_z_lower_se <= log_z, (n, bounds)
        assert bounds.log_z_upper + 3 * bounds.log_z_upper_se >= log_z, (n, bounds)
        assert bounds.kl_q_target.contains(kl_q_p, num_se=3), (kl_q_p, bounds.kl_q_target)
        assert bounds.kl_target_q.contains(kl_p_q, num_se=3), (kl_p_q, bounds.kl_target_q)
        gaps.append(bounds.gap)
    assert gaps[1] < gaps[0], gaps


def test_conditional_smc_at_resampling_every_step_is_above_log_z(toy_a, toy_a_exact):
    # Resampling every step at N = 2 drags SMC's log Ẑ below log Z by about 4 se (measured);
    # the clamped particle keeps conditional SMC's above it: a broken clamp would not.
    log_z = math.log(brute_force_toy_a(1.0)["z"])
    bounds = log_z_bounds(toy_a, perturbed_lm(), num_samples=2, num_runs=300,
                          exact_samples=toy_a_exact, method="smc", smc=SMC(ess_threshold=1.0))
    assert bounds.log_z_lower + 2 * bounds.log_z_lower_se < log_z < (
        bounds.log_z_upper - 2 * bounds.log_z_upper_se), bounds


@pytest.mark.parametrize("proposal", ["perturbed", "twisted"])
def test_conditional_smc_follows_the_exact_draw_in_particle_zero(toy_a, toy_a_exact, proposal):
    from bayesalign.inference.bounds import _ConditionalSMC

    path = toy_a_exact.samples.tokens[0]
    chosen = perturbed_lm() if proposal == "perturbed" else proposal
    engine = _ConditionalSMC(num_particles=4, ess_threshold=1.0, proposal=chosen,
                             reference_path=path, twist=lambda p: 0.3 * p[:, -1])
    prior = toy_a.prior()
    particles = engine._start(prior, None)
    engine._run(particles, toy_a, None, prior)
    assert particles.tokens[0].tolist() == path.tolist()


def test_smc_bounds_are_exact_for_q_equal_to_the_target_without_resampling(toy_a, toy_a_exact):
    support = toy_a.support()
    log_score = toy_a.log_score(support).double()
    log_z = float(torch.logsumexp(log_score, 0))
    p = PrefixTreeLM.from_law(support, log_score - log_z, vocab_size=3)
    bounds = log_z_bounds(toy_a, p, num_samples=4, num_runs=20, exact_samples=toy_a_exact.samples[:20],
                          method="smc", smc=SMC(ess_threshold=0.0))
    # Every final weight is P/p = Z, up to rounding in the per-step tables (5e-9 measured).
    assert bounds.log_z_lower == pytest.approx(log_z, abs=1e-7)
    assert bounds.log_z_upper == pytest.approx(log_z, abs=1e-7)


def test_twisted_smc_bounds_bracket_log_z_and_are_exact_under_the_optimal_twist(toy_a, toy_a_exact):
    log_z = math.log(brute_force_toy_a(1.0)["z"])
    crude = log_z_bounds(toy_a, num_samples=4, num_runs=200, exact_samples=toy_a_exact,
                         method="smc", smc=SMC(proposal="twisted", twist=lambda p: 0.3 * p[:, -1]))
    assert crude.log_z_lower - 3 * crude.log_z_lower_se <= log_z, crude
    assert crude.log_z_upper + 3 * crude.log_z_upper_se >= log_z, crude
    assert crude.gap > 1e-3  # a crude twist leaves a gap
    exact = log_z_bounds(toy_a, num_samples=4, num_runs=20, exact_samples=toy_a_exact.samples[:20],
                         method="smc", smc=SMC(proposal="twisted", twist=optimal_twist(toy_a)))
    # Every weight is Z at the first step and 1 after, clamped particle or not (up to the
    # rounding of the per-step tables, 5e-9 measured).
    assert exact.log_z_lower == pytest.approx(log_z, abs=1e-7)
    assert exact.log_z_upper == pytest.approx(log_z, abs=1e-7)


@pytest.mark.parametrize(("options", "match"), [
    ({"method": "bogus"}, "method must be 'iwae' or 'smc', got 'bogus'"),
    ({"method": "smc", "num_samples": 1}, "SMC's number of particles and must be >= 2, got 1"),
    ({"method": "smc", "smc": SMC(proposal="twisted"), "q": perturbed_lm()},
     "smc.proposal='twisted' draws from a·ψ, not from q"),
])
def test_bad_methods_are_config_errors(toy_a, toy_a_exact, options, match):
    with pytest.raises(ConfigError, match=match):
        log_z_bounds(toy_a, exact_samples=toy_a_exact, **options)


def test_on_a_causal_lm_both_methods_bracket_a_large_importance_estimate():
    import pyro

    import bayesalign as ba
    from bayesalign.inference import Importance
    from bayesalign.models.tiny import tiny_causal_lm

    lm = tiny_causal_lm(seed=1, initializer_range=0.3, max_new_tokens=6)

    @ba.target
    def low_ids():
        y = pyro.sample("y", lm)
        ba.reward("high", -((y.tokens >= 50) & y.mask).sum(-1).double(), kl_coef=1.0)

    # r ≤ 0 with the prior as proposal: bound 1 gives exact draws (SPEC §12).
    exact = exact_reference(low_ids, bound=1.0, num_samples=30)
    reference = Importance(num_samples=8192, seed=0).fit(low_ids).diagnostics
    for method, k in (("iwae", 16), ("smc", 8)):
        bounds = log_z_bounds(low_ids, num_samples=k, num_runs=20, method=method,
                              exact_samples=exact.samples[:20])
        low = bounds.log_z_lower - 3 * math.hypot(bounds.log_z_lower_se, reference.log_z_se)
        high = bounds.log_z_upper + 3 * math.hypot(bounds.log_z_upper_se, reference.log_z_se)
        assert low <= reference.log_z <= high, (method, bounds, reference.log_z)
        assert bounds.log_z_lower < bounds.log_z_upper
