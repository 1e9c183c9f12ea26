"""Resamplers against their defining properties (SPEC §11 'Resampling'; llamppl's tests)."""

import pytest
import torch

from bayesalign.errors import ConfigError
from bayesalign.inference.resampling import SCHEMES, resample
from bayesalign.seeding import seeded

N = 8
REPEATS = 20_000


def offspring_counts(weights: torch.Tensor, scheme: str) -> torch.Tensor:
    """Offspring counts ``[REPEATS, N]`` of one weight vector resampled REPEATS times (batched)."""
    ancestors = resample(weights.expand(REPEATS, -1), scheme)
    counts = torch.zeros(REPEATS, N, dtype=torch.float64)
    return counts.scatter_add_(-1, ancestors, torch.ones_like(counts))


@pytest.fixture(scope="module")
def weights() -> torch.Tensor:
    with seeded(1):
        w = torch.distributions.Dirichlet(torch.full((N,), 0.7, dtype=torch.float64)).sample()
    return w


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_expected_offspring_counts_are_n_times_the_weight(scheme, weights):
    with seeded(0):
        counts = offspring_counts(weights, scheme)
    assert (counts.sum(-1) == N).all()
    mean, se = counts.mean(0), counts.std(0) / REPEATS**0.5
    # Within 4 Monte-Carlo standard errors (plus 1e-3 where a count is deterministic, se = 0).
    assert ((mean - N * weights).abs() <= 4 * se + 1e-3).all(), (mean, N * weights)


@pytest.mark.parametrize("scheme", ["stratified", "systematic", "residual"])
def test_offspring_variance_is_at_most_multinomials(scheme, weights):
    with seeded(0):
        variance = offspring_counts(weights, scheme).var(0)
        multinomial = offspring_counts(weights, "multinomial").var(0)
    # Multinomial's count variance is N·W(1−W); 5% slack for its Monte-Carlo error.
    assert torch.allclose(multinomial, N * weights * (1 - weights), rtol=0.05, atol=1e-3)
    assert (variance <= 1.05 * multinomial + 1e-3).all(), (variance, multinomial)
    assert variance.sum() < multinomial.sum()


@pytest.mark.parametrize("scheme", ["systematic", "residual"])
def test_a_weight_of_at_least_one_over_n_always_survives(scheme):
    with seeded(2):
        batch = torch.distributions.Dirichlet(torch.full((N,), 0.5, dtype=torch.float64)).sample(
            (5_000,)
        )
        ancestors = resample(batch, scheme)
    survived = torch.zeros_like(batch, dtype=torch.bool).scatter_(-1, ancestors, True)
    heavy = batch >= 1 / N
    assert heavy.sum() > 5_000  # the property is exercised on many particles
    assert survived[heavy].all()


def test_a_zero_weight_is_never_an_ancestor():
    w = torch.tensor([[0.0, 0.5, 0.0, 0.5]], dtype=torch.float64)
    for scheme in SCHEMES:
        with seeded(0):
            ancestors = resample(w, scheme)
        assert set(ancestors.flatten().tolist()) <= {1, 3}, scheme


def test_unknown_scheme_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="'bogus'.*multinomial"):
        resample(torch.ones(4), "bogus")
