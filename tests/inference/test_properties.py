"""Property-based tests over random small tabular worlds (hypothesis): Exact vs brute force,
SNIS and QRS vs Exact."""

import itertools
import math

import numpy as np
import pyro
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

import bayesalign as ba
from bayesalign.inference import QRS, Exact, Importance
from bayesalign.models import TabularLM


@st.composite
def worlds(draw):
    vocab = draw(st.integers(2, 4))
    length = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    kl_coef = draw(st.sampled_from([0.5, 1.0, 2.0]))
    use_eos = draw(st.booleans()) and length > 1
    g = torch.Generator().manual_seed(seed)
    initial = torch.rand(vocab, generator=g, dtype=torch.float64) + 0.05
    transition = torch.rand(vocab, vocab, generator=g, dtype=torch.float64) + 0.05
    reward = torch.randn(vocab, generator=g, dtype=torch.float64)
    return (initial / initial.sum(), transition / transition.sum(-1, keepdim=True), length,
            vocab - 1 if use_eos else None, reward, kl_coef)


def make_target(world):
    initial, transition, length, eos, reward, kl_coef = world
    prior = TabularLM(initial, transition, length, eos_token_id=eos)

    @ba.target
    def random_world():
        y = pyro.sample("y", prior)
        ba.reward("r", (reward[y.tokens] * y.mask).sum(-1), kl_coef=kl_coef)

    return random_world


def brute_force(world):
    """log Z by a Python loop over every token string, EOS ending a sequence."""
    initial, transition, length, eos, reward, kl_coef = world
    total = 0.0
    seen = set()
    for x in itertools.product(range(len(initial)), repeat=length):
        if eos is not None and eos in x:
            x = x[: x.index(eos) + 1]
        if x in seen:
            continue
        seen.add(x)
        a = float(initial[x[0]]) * math.prod(float(transition[s, t]) for s, t in zip(x, x[1:]))
        total += a * math.exp(sum(float(reward[t]) for t in x) / kl_coef)
    return math.log(total), len(seen)


# derandomize: the same examples on every run (seeded, as every engine test here), so CI
# cannot fail on a draw that a previous run never tried.
settings_ = settings(max_examples=25, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.too_slow])


@settings_
@given(worlds())
def test_exact_matches_brute_force(world):
    post = Exact().fit(make_target(world))
    log_z, size = brute_force(world)
    assert len(post.samples) == size
    assert post.log_z == pytest.approx(log_z, abs=1e-10)
    assert float(post.log_prob(post.samples).exp().sum()) == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(worlds(), st.integers(0, 1000))
def test_snis_and_qrs_agree_with_exact(world, seed):
    target = make_target(world)
    exact = Exact().fit(target)
    d = Importance(num_samples=20_000, seed=seed).fit(target).diagnostics
    # 4 standard errors: 10 examples × one check each keep the false-alarm rate small.
    assert abs(d.log_z - exact.log_z) < 4 * d.log_z_se + 1e-9
    support = exact.samples
    ratio = (target.log_score(support) - support.log_q).exp()
    max_ratio = float(ratio.max())
    betas = [0.5 * max_ratio, max_ratio * 1.01]
    draws = 5000
    curves = QRS(num_samples=draws, seed=seed).sweep(target, betas, num_bootstrap=100)
    for i, qrs_beta in enumerate(betas):
        # The TVD of the law QRS declares, p_β, computed by enumeration.
        exact_tvd = QRS(qrs_beta=qrs_beta, num_samples=10, seed=seed).fit(target).diagnostics.tvd
        # Draws cannot see sequences they never draw: when the sequences β clips (P/q > β) have
        # proposal mass below ~20 expected draws, the estimate (and its bootstrap se) can miss
        # them entirely (seen: clipped mass 7e-5, estimate 0 ± 0, exact TVD 0.0045), so the
        # comparison is made where the sweep can identify the TVD.
        clipped_mass = float(support.log_q.exp()[ratio > qrs_beta].sum())
        if clipped_mass == 0 or clipped_mass * draws >= 20:
            assert abs(curves.tvd[i] - exact_tvd) < 4 * curves.tvd_se[i] + 1e-9
    # β_q ≥ max P/q: exact rejection, so the draws follow p (χ², cells of < 5 expected draws
    # pooled; 10 examples at p < 10^-3 keep the false-alarm rate near 1%).
    post = QRS(qrs_beta=betas[-1], num_samples=2000, seed=seed).fit(target)
    p = exact.log_prob(support).exp().numpy()
    index = {k: i for i, k in enumerate(support.keys())}
    observed = np.zeros(len(p))
    for k in post.samples.keys():
        observed[index[k]] += 1
    assert pooled_chisquare(observed, p * observed.sum()) > 1e-3


def pooled_chisquare(observed: np.ndarray, expected: np.ndarray, min_expected: float = 5.0) -> float:
    """χ² goodness-of-fit p-value with the cells of < ``min_expected`` expected counts pooled."""
    small = expected < min_expected
    obs, exp = list(observed[~small]), list(expected[~small])
    if small.any():
        obs.append(observed[small].sum())
        exp.append(expected[small].sum())
    if len(exp) < 2:
        return 1.0
    return float(stats.chisquare(obs, exp).pvalue)
