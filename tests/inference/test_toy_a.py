"""SPEC §10 Toy A tables reproduced by enumeration (Exact) and checked against brute force."""

import math
import statistics

import pyro
import pytest
import torch
from conftest import (
    brute_force_moment_lambdas,
    brute_force_tilt_toy_a,
    brute_force_toy_a,
    toy_a_prior,
    toy_a_target,
)

import bayesalign as ba
from bayesalign.diagnostics import kl
from bayesalign.errors import ConfigError
from bayesalign.inference import Exact

# (kl_coef, Z, E_p r, KL(p‖a), KL(a‖p)) from SPEC §10: each is also recomputed by brute force.
SPEC_TABLE = [
    (0.5, 22.6933357623, 2.4221799001, 1.7222884976, 1.8060713026),
    (1.0, 2.9543306017, 1.5745035924, 0.4912314979, 0.4252720945),
    (2.0, 1.5298628331, 1.0658674571, 0.1077556487, 0.0961780798),
]


@pytest.mark.parametrize("kl_coef,z,reward,kl_p_a,kl_a_p", SPEC_TABLE)
def test_gibbs_posterior_table(kl_coef, z, reward, kl_p_a, kl_a_p):
    brute = brute_force_toy_a(kl_coef)
    post = Exact().fit(toy_a_target(kl_coef))
    support = post.samples
    log_p = post.log_prob(support)
    log_a = support.log_q
    assert post.log_z == pytest.approx(math.log(brute["z"]), abs=1e-10)
    assert post.log_z == pytest.approx(math.log(z), abs=1e-10)
    assert post.diagnostics.rewards["r"] == pytest.approx(brute["reward"], abs=1e-10)
    assert post.diagnostics.rewards["r"] == pytest.approx(reward, abs=1e-9)
    assert post.diagnostics.kl_policy_prior == pytest.approx(brute["kl_p_a"], abs=1e-10)
    assert post.diagnostics.kl_policy_prior == pytest.approx(kl_p_a, abs=1e-9)
    assert kl(log_a, log_p) == pytest.approx(kl_a_p, abs=1e-9)
    assert kl(log_a, log_p) == pytest.approx(brute["kl_a_p"], abs=1e-10)
    assert brute["z"] == pytest.approx(z, abs=1e-9)
    assert brute["reward"] == pytest.approx(reward, abs=1e-9)
    assert brute["kl_p_a"] == pytest.approx(kl_p_a, abs=1e-9)
    assert brute["kl_a_p"] == pytest.approx(kl_a_p, abs=1e-9)
    assert log_p.exp().sum() == pytest.approx(1.0, abs=1e-12)
    # J(p*) = β log Z, and J(a) = E_a r for every β (SPEC §1.1 identity).
    objective = post.diagnostics.rewards["r"] - kl_coef * post.diagnostics.kl_policy_prior
    assert objective == pytest.approx(kl_coef * math.log(z), abs=1e-9)


def test_prior_moments_and_entropy():
    support = toy_a_prior().enumerate_support()
    a = support.log_q.exp()
    r = (support.tokens == 2).sum(-1).double()
    assert float((a * r).sum()) == pytest.approx(0.658, abs=1e-12)
    assert float(a[(support.tokens == 2).any(-1)].sum()) == pytest.approx(0.466, abs=1e-12)
    assert float(-(a * support.log_q).sum()) == pytest.approx(2.9926720599, abs=1e-9)
    # The SPEC values are also what a plain loop over the 27 sequences computes.
    by_loop = brute_force_toy_a(1.0)["a"]
    reward_a = sum(q * x.count(2) for x, q in by_loop.items())
    has_two_a = sum(q for x, q in by_loop.items() if 2 in x)
    entropy_a = -sum(q * math.log(q) for q in by_loop.values())
    assert reward_a == pytest.approx(0.658, abs=1e-12)
    assert has_two_a == pytest.approx(0.466, abs=1e-12)
    assert entropy_a == pytest.approx(2.9926720599, abs=1e-9)
    assert float((a * r).sum()) == pytest.approx(reward_a, abs=1e-12)
    assert float(a[(support.tokens == 2).any(-1)].sum()) == pytest.approx(has_two_a, abs=1e-12)
    assert float(-(a * support.log_q).sum()) == pytest.approx(entropy_a, abs=1e-12)


def test_token_conditionals_at_kl_coef_one():
    post = Exact().fit(toy_a_target(1.0))
    p = post.log_prob(post.samples).exp()
    tokens = post.samples.tokens
    first = torch.stack([p[tokens[:, 0] == v].sum() for v in range(3)])
    assert first.tolist() == pytest.approx([0.273565, 0.240469, 0.485966], abs=1e-6)
    given_0 = torch.stack([p[(tokens[:, 0] == 0) & (tokens[:, 1] == v)].sum() for v in range(3)])
    assert (given_0 / given_0.sum()).tolist() == pytest.approx([0.434977, 0.281270, 0.283753], abs=1e-6)
    # The SPEC conditionals are also sums of the brute-force p.
    brute = brute_force_toy_a(1.0)["p"]
    first_by_loop = [sum(q for x, q in brute.items() if x[0] == v) for v in range(3)]
    pair_by_loop = [sum(q for x, q in brute.items() if x[:2] == (0, v)) for v in range(3)]
    given_0_by_loop = [q / sum(pair_by_loop) for q in pair_by_loop]
    assert first_by_loop == pytest.approx([0.273565, 0.240469, 0.485966], abs=1e-6)
    assert given_0_by_loop == pytest.approx([0.434977, 0.281270, 0.283753], abs=1e-6)
    assert first.tolist() == pytest.approx(first_by_loop, abs=1e-12)
    assert (given_0 / given_0.sum()).tolist() == pytest.approx(given_0_by_loop, abs=1e-12)


def test_limits_and_monotonicity_in_kl_coef():
    prior_log = toy_a_prior().enumerate_support().log_q
    big = Exact().fit(toy_a_target(1e6))
    assert kl(big.log_prob(big.samples), prior_log) < 1e-10
    small = Exact().fit(toy_a_target(1e-3))
    argmax = (small.samples.tokens == 2).all(-1)
    assert float(small.log_prob(small.samples)[argmax].exp()) == pytest.approx(1.0, abs=1e-12)
    rewards, kls = [], []
    for kl_coef in (4.0, 2.0, 1.0, 0.5, 0.25):
        d = Exact().fit(toy_a_target(kl_coef)).diagnostics
        rewards.append(d.rewards["r"])
        kls.append(d.kl_policy_prior)
    assert rewards == sorted(rewards) and kls == sorted(kls)


def test_pointwise_constraint_and_pythagoras():
    prior = toy_a_prior()

    @ba.target
    def has_two():
        y = pyro.sample("y", prior)
        ba.constraint("has_two", (y.tokens == 2).any(-1))

    post = Exact().fit(has_two)
    assert math.exp(post.log_z) == pytest.approx(0.466, abs=1e-12)
    assert post.diagnostics.kl_policy_prior == pytest.approx(-math.log(0.466), abs=1e-12)
    z_by_loop = sum(q for x, q in brute_force_toy_a(1.0)["a"].items() if 2 in x)
    assert z_by_loop == pytest.approx(0.466, abs=1e-12)
    assert math.exp(post.log_z) == pytest.approx(z_by_loop, abs=1e-12)
    assert post.diagnostics.kl_policy_prior == pytest.approx(-math.log(z_by_loop), abs=1e-12)
    assert post.diagnostics.moments["has_two"] == pytest.approx([1.0])


def test_moment_target_with_given_lambda_matches_spec():
    prior = toy_a_prior()

    @ba.target
    def half_have_two():
        y = pyro.sample("y", prior)
        ba.moment("has_two", (y.tokens == 2).any(-1).double(), mean=0.5)

    unfitted = Exact().fit(half_have_two)
    assert unfitted.log_z == pytest.approx(0.0, abs=1e-12)  # λ = 0 leaves the prior unchanged
    m0 = sum(q for x, q in brute_force_toy_a(1.0)["a"].items() if 2 in x)  # P_a(2∈x) by loop
    assert m0 == pytest.approx(0.466, abs=1e-12)
    lam = math.log(0.5 / 0.5 * (1 - m0) / m0)  # SPEC §1.3 closed form
    fitted = Exact().fit(half_have_two.with_lambdas({"has_two": lam}))
    assert lam == pytest.approx(0.1362102048, abs=1e-9)
    assert fitted.diagnostics.moments["has_two"] == pytest.approx([0.5], abs=1e-12)
    assert fitted.diagnostics.kl_policy_prior == pytest.approx(0.0023173619, abs=1e-9)
    assert fitted.diagnostics.kl_policy_prior == pytest.approx(lam * 0.5 - fitted.log_z, abs=1e-12)
    # By loop: Z = Σ a·e^{λφ} (SPEC: 1.068), KL = λμ̄ − log Z, and a Newton solve finds the
    # closed-form λ.
    tilted = brute_force_tilt_toy_a(lambda x: [float(2 in x)], [lam])
    assert tilted["z"] == pytest.approx(1.068, abs=1e-12)
    assert math.exp(fitted.log_z) == pytest.approx(tilted["z"], abs=1e-12)
    assert lam * 0.5 - math.log(tilted["z"]) == pytest.approx(0.0023173619, abs=1e-9)
    assert tilted["kl_p_a"] == pytest.approx(lam * 0.5 - math.log(tilted["z"]), abs=1e-12)
    assert fitted.diagnostics.kl_policy_prior == pytest.approx(tilted["kl_p_a"], abs=1e-12)
    (newton,) = brute_force_moment_lambdas(lambda x: [float(2 in x)], [0.5])
    assert newton == pytest.approx(lam, abs=1e-12)
    # Pythagoras: KL(c‖a) = KL(c‖p) + KL(p‖a) for c = ½ uniform{2∈x} + ½ uniform{2∉x}.
    support = fitted.samples
    has = (support.tokens == 2).any(-1)
    n_has = has.sum().double()
    c = torch.where(has, 0.5 / n_has, 0.5 / (len(has) - n_has))
    log_p, log_a = fitted.log_prob(support), support.log_q
    lhs = kl(c.log(), log_a)
    assert lhs == pytest.approx(0.1943298462, abs=1e-9)
    assert lhs == pytest.approx(kl(c.log(), log_p) + kl(log_p, log_a), abs=1e-12)
    # The same KLs by a plain loop: KL(c‖a) = 0.1943298462, KL(c‖p) = 0.1920124843 (SPEC §10).
    a_by_loop, p_by_loop = tilted["a"], tilted["p"]
    n_with = sum(2 in x for x in a_by_loop)
    c_by_loop = {x: 0.5 / n_with if 2 in x else 0.5 / (len(a_by_loop) - n_with) for x in a_by_loop}
    kl_c_a = sum(w * math.log(w / a_by_loop[x]) for x, w in c_by_loop.items())
    kl_c_p = sum(w * math.log(w / p_by_loop[x]) for x, w in c_by_loop.items())
    assert kl_c_a == pytest.approx(0.1943298462, abs=1e-9)
    assert kl_c_p == pytest.approx(0.1920124843, abs=1e-9)
    assert kl_c_a == pytest.approx(kl_c_p + tilted["kl_p_a"], abs=1e-12)
    assert lhs == pytest.approx(kl_c_a, abs=1e-12)
    assert kl(c.log(), log_p) == pytest.approx(kl_c_p, abs=1e-12)


def test_two_moment_features_with_spec_lambdas():
    prior = toy_a_prior()

    @ba.target
    def two_features():
        y = pyro.sample("y", prior)
        phi = torch.stack([(y.tokens == 2).any(-1), y.tokens[:, 0] == 0], -1).double()
        ba.moment("phi", phi, mean=torch.tensor([0.5, 0.3]))

    lam = torch.tensor([-0.248509, -0.953313], dtype=torch.float64)
    post = Exact().fit(two_features.with_lambdas({"phi": lam}))
    assert post.diagnostics.moments["phi"] == pytest.approx([0.5, 0.3], abs=1e-6)
    assert math.exp(post.log_z) == pytest.approx(0.6070963, abs=1e-6)
    assert post.diagnostics.kl_policy_prior == pytest.approx(0.0888195, abs=1e-6)
    # A plain Newton solve of the dual finds SPEC's λ*, Z and KL, and the engine's law at that
    # λ has the loop's Z and KL.
    def phi(x):
        return [float(2 in x), float(x[0] == 0)]

    newton = brute_force_moment_lambdas(phi, [0.5, 0.3])
    assert newton == pytest.approx(lam.tolist(), abs=1e-6)
    at_newton = brute_force_tilt_toy_a(phi, newton)
    assert at_newton["moments"] == pytest.approx([0.5, 0.3], abs=1e-12)
    assert at_newton["z"] == pytest.approx(0.6070963, abs=1e-6)
    assert at_newton["kl_p_a"] == pytest.approx(0.0888195, abs=1e-6)
    at_spec = brute_force_tilt_toy_a(phi, lam.tolist())
    assert math.exp(post.log_z) == pytest.approx(at_spec["z"], abs=1e-12)
    assert post.diagnostics.kl_policy_prior == pytest.approx(at_spec["kl_p_a"], abs=1e-12)
    assert post.diagnostics.moments["phi"] == pytest.approx(at_spec["moments"], abs=1e-12)


def test_lsc_worked_values_and_and():
    deltas = torch.tensor([-4.0, 0.0, 4.0], dtype=torch.float64)
    u = ba.log_sigmoid_centered(deltas, 0.0)
    # log σ(δ − 0) = −log(1 + e^{−δ})
    assert u.tolist() == pytest.approx([-math.log1p(math.exp(-d)) for d in deltas.tolist()],
                                       abs=1e-6)
    r1, r2 = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    both = ba.log_sigmoid_centered(r1, 0.2) + ba.log_sigmoid_centered(r2, 1.0)
    expected = (torch.sigmoid(r1 - 0.2) * torch.sigmoid(r2 - 1.0)).log()
    assert torch.allclose(both, expected, atol=1e-6)


def test_lsc_reference_quantiles_per_context():
    rewards = torch.stack([torch.linspace(0, 1, 101, dtype=torch.float64),
                           torch.linspace(-2, 2, 101, dtype=torch.float64)])
    ref = ba.reference_reward(rewards, quantile=0.85)
    assert ref.tolist() == pytest.approx([0.85, 1.4])
    # Each row is sorted with 101 points: its 0.85 quantile is the point at index 0.85·100.
    assert ref.tolist() == pytest.approx([row[85] for row in rewards.tolist()])
    generator = torch.Generator().manual_seed(0)
    normal = 3.0 + 2.0 * torch.randn(200_000, generator=generator, dtype=torch.float64)
    gaussian = ba.reference_reward(normal, quantile=0.85, method="gaussian")
    empirical = ba.reference_reward(normal, quantile=0.85)
    z_85 = statistics.NormalDist().inv_cdf(0.85)
    assert float(gaussian) == pytest.approx(3.0 + 2.0 * z_85, abs=0.02)
    assert float(empirical) == pytest.approx(float(gaussian), abs=0.03)
    # A reward at the reference is "good" with probability ½.
    assert float(ba.log_sigmoid_centered(ref, ref)[0].exp()) == pytest.approx(0.5)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="quantile must be in"):
            ba.reference_reward(rewards, quantile=bad)
