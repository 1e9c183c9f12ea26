"""Bad input gets a clear error naming the problem (issue: foundation, 'Done when')."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import conditional_world, toy_a_prior

import bayesalign as ba
from bayesalign.errors import (
    ConfigError,
    EmptySupportError,
    InvalidDistributionError,
    InvalidFactorError,
    InvalidSequencesError,
    InvalidTargetError,
    VocabularyMismatchError,
)
from bayesalign.inference import QRS, BestOfN, Exact, Importance, Rejection
from bayesalign.models import TabularLM
from bayesalign.sequences import Sequences


def impossible_target():
    prior = toy_a_prior()

    @ba.target
    def impossible():
        y = pyro.sample("y", prior)
        ba.constraint("length_four", y.lengths == 4)  # every sequence has length 3

    return impossible


def test_all_samples_violate_a_constraint():
    target = impossible_target()
    with pytest.raises(EmptySupportError, match="no sample accepted out of 2000 proposals"):
        Rejection(bound=1.0, num_samples=2, max_proposals=2000, chunk_size=500).fit(target)
    with pytest.raises(EmptySupportError, match="all 300 importance weights are zero"):
        Importance(num_samples=300).fit(target)
    with pytest.raises(EmptySupportError, match="all 27 sequences"):
        Exact().fit(target)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_factor_names_site_and_index(bad):
    prior = toy_a_prior()

    @ba.target
    def broken():
        y = pyro.sample("y", prior)
        r = torch.zeros(len(y), dtype=torch.float64)
        r[(y.tokens == 2).all(-1)] = bad  # only the sequence (2, 2, 2)
        pyro.factor("score", r)

    with pytest.raises(InvalidFactorError, match=r"factor 'score' is (nan|inf) for sample 26"):
        Exact().fit(broken)


def test_factor_of_wrong_shape():
    prior = toy_a_prior()

    @ba.target
    def per_token():
        y = pyro.sample("y", prior)
        pyro.factor("per_token", (y.tokens == 2).double())

    with pytest.raises(InvalidFactorError, match=r"'per_token' has shape \(27, 3\)"):
        Exact().fit(per_token)


def test_no_prior_site_or_two():
    @ba.target
    def none():
        pyro.factor("f", torch.zeros(3))

    with pytest.raises(InvalidTargetError, match="has no prior site"):
        Exact().fit(none)
    prior = toy_a_prior()

    @ba.target
    def two():
        pyro.sample("y", prior)
        pyro.sample("z", prior)

    with pytest.raises(InvalidTargetError, match="2 prior sites"):
        Exact().fit(two)

    @ba.target
    def latent():
        pyro.sample("y", prior)
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(InvalidTargetError, match="'z' is a latent sample site"):
        Exact().fit(latent)


def test_proposal_with_another_vocabulary(toy_a):
    four = torch.full((4,), 0.25, dtype=torch.float64)
    other = TabularLM(four, four.expand(4, 4).contiguous(), 3)
    for engine in (Rejection(bound=30.0, proposal=other), QRS(proposal=other),
                   Importance(proposal=other), BestOfN(proposal=other)):
        with pytest.raises(VocabularyMismatchError, match="differs from the prior's"):
            engine.fit(toy_a)


SAMPLERS = [Exact, lambda: Rejection(bound=30.0), QRS, Importance, BestOfN]


@pytest.mark.parametrize("make", SAMPLERS)
def test_sampling_engines_solve_one_context_per_fit(make):
    target = conditional_world()
    with pytest.raises(ConfigError, match="sampling engines solve one context per fit"):
        make().fit(target, contexts=["a", "b"])
    with pytest.raises(ConfigError, match="one context per fit"):
        make().fit(target, "a", contexts=["b"])


@pytest.mark.parametrize("engine", [Rejection, QRS, Importance, BestOfN])
def test_batch_size_is_the_old_name_of_chunk_size(engine):
    deprecated = rf"{engine.__name__}\(batch_size=...\) is deprecated.*use chunk_size="
    with pytest.warns(DeprecationWarning, match=deprecated):
        assert engine(batch_size=8).chunk_size == 8
    with pytest.raises(ConfigError, match="batch_size= is the old name of chunk_size="):
        engine(batch_size=8, chunk_size=8)
    with pytest.raises(ConfigError, match="chunk_size must be > 0"):
        engine(chunk_size=0)


def test_malformed_sequences_name_the_shapes():
    with pytest.raises(InvalidSequencesError, match=r"tokens must be \[batch, length\], got shape \(3,\)"):
        Sequences(tokens=torch.zeros(3, dtype=torch.long))
    with pytest.raises(InvalidSequencesError, match=r"mask has shape \(2, 2\).*tokens, \(2, 3\)"):
        Sequences(tokens=torch.zeros(2, 3, dtype=torch.long), mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(InvalidSequencesError, match="got no batches"):
        Sequences.cat([])


@pytest.mark.parametrize("make", [
    lambda: Rejection(bound=0.0), lambda: Rejection(bound=-1.0), lambda: QRS(qrs_beta=0.0),
    lambda: BestOfN(n=0), lambda: BestOfN(n=2.5), lambda: Importance(num_samples=0),
])
def test_non_positive_options(make):
    with pytest.raises(ConfigError, match="must be"):
        make()


def test_tables_must_sum_to_one():
    with pytest.raises(InvalidDistributionError, match="initial rows must sum to 1"):
        TabularLM(torch.tensor([0.5, 0.3, 0.1]), torch.eye(3), 3)
    with pytest.raises(InvalidDistributionError, match=r"transition rows must sum to 1; row \(1,\)"):
        TabularLM(torch.tensor([0.5, 0.5]), torch.tensor([[0.5, 0.5], [0.9, 0.2]]), 3)
    with pytest.raises(InvalidDistributionError, match="non-negative"):
        TabularLM(torch.tensor([1.5, -0.5]), torch.eye(2), 3)


def test_best_of_n_unknown_reward_site(toy_a):
    with pytest.raises(ConfigError, match="reward 'nope' is not a factor site"):
        BestOfN(n=2, reward="nope", num_samples=4).fit(toy_a)


def test_constraint_mask_must_be_boolean():
    prior = toy_a_prior()

    @ba.target
    def fuzzy():
        y = pyro.sample("y", prior)
        ba.constraint("fuzzy", y.tokens[:, 0].double() / 2)

    with pytest.raises(ConfigError, match="mask must be boolean or 0/1"):
        Exact().fit(fuzzy)


def test_reward_kl_coef_must_be_positive():
    prior = toy_a_prior()

    @ba.target
    def zero_coef():
        y = pyro.sample("y", prior)
        ba.reward("r", y.lengths.double(), kl_coef=0.0)

    with pytest.raises(ConfigError, match="kl_coef must be > 0"):
        Exact().fit(zero_coef)
