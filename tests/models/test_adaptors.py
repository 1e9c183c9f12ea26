"""Sampling adaptors (SPEC §8.2) against hand computations on a five-token vocabulary.

Every case uses probs p = (0.4, 0.3, 0.2, 0.07, 0.03): entropy H = -Σ p log p = 1.3409 nats,
surprisals -log p = (0.916, 1.204, 1.609, 2.659, 3.507).
"""

from __future__ import annotations

import math

import pytest
import torch

from bayesalign.errors import ConfigError
from bayesalign.models.adaptors import (
    Eta,
    Temperature,
    TopK,
    TopP,
    Typical,
    adapted_log_probs,
    make_adaptors,
)

P = torch.tensor([0.4, 0.3, 0.2, 0.07, 0.03], dtype=torch.float64)
LOGITS = P.log() + 1.7  # any shift: adaptors see logits, not probabilities
ENTROPY = -sum(p * math.log(p) for p in (0.4, 0.3, 0.2, 0.07, 0.03))  # by a plain loop


def adapted_probs(*adaptors) -> torch.Tensor:
    return adapted_log_probs(LOGITS, adaptors).exp()


def expected(*kept: float) -> torch.Tensor:
    """Kept probabilities renormalised, zeros for the rest (five tokens)."""
    probs = torch.zeros(5, dtype=torch.float64)
    probs[: len(kept)] = torch.tensor(kept, dtype=torch.float64)
    return probs / probs.sum()


def test_entropy_used_in_the_hand_computations() -> None:
    assert -(P * P.log()).sum().item() == pytest.approx(1.3409, abs=1e-4)
    assert ENTROPY == pytest.approx(1.3409, abs=1e-4)  # the docstring's value
    assert -(P * P.log()).sum().item() == pytest.approx(ENTROPY, abs=1e-12)


def test_no_adaptor_is_the_model() -> None:
    torch.testing.assert_close(adapted_probs(), P)


def test_temperature_squares_probabilities() -> None:
    # τ = 0.5: p^2 = (0.16, 0.09, 0.04, 0.0049, 0.0009), sum 0.2958.
    torch.testing.assert_close(
        adapted_probs(Temperature(0.5)), expected(0.16, 0.09, 0.04, 0.0049, 0.0009)
    )
    # τ = 2: √p, which flattens.
    torch.testing.assert_close(adapted_probs(Temperature(2.0)), P.sqrt() / P.sqrt().sum())


def test_top_k() -> None:
    torch.testing.assert_close(adapted_probs(TopK(2)), expected(0.4, 0.3))
    torch.testing.assert_close(adapted_probs(TopK(1)), expected(1.0))
    torch.testing.assert_close(adapted_probs(TopK(10)), P)


def test_top_k_keeps_ties_with_the_kth() -> None:
    logits = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    probs = adapted_log_probs(logits, [TopK(2)]).exp()
    torch.testing.assert_close(probs, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0, 0.0]))


def test_top_p() -> None:
    # Mass before each token (sorted): 0, 0.4, 0.7, 0.9, 0.97. Keep while it is < p.
    torch.testing.assert_close(adapted_probs(TopP(0.75)), expected(0.4, 0.3, 0.2))
    torch.testing.assert_close(adapted_probs(TopP(0.5)), expected(0.4, 0.3))
    torch.testing.assert_close(adapted_probs(TopP(0.1)), expected(1.0))
    torch.testing.assert_close(adapted_probs(TopP(1.0)), P)


def test_typical() -> None:
    # |surprisal - H| = (0.425, 0.137, 0.268, 1.318, 2.166): order 1, 2, 0, 3, 4, mass before
    # each 0, 0.3, 0.5, 0.9, 0.97.
    torch.testing.assert_close(adapted_probs(Typical(0.85)), expected(0.4, 0.3, 0.2))
    # p = 0.45 keeps tokens 1 and 2 and drops the mode: typical is not a top-p variant.
    probs = adapted_probs(Typical(0.45))
    torch.testing.assert_close(probs, torch.tensor([0.0, 0.6, 0.4, 0.0, 0.0], dtype=torch.float64))


def test_eta() -> None:
    e_minus_h = math.exp(-ENTROPY)  # 0.2616
    # η = 0.1: threshold min(0.1, √0.1·0.2616 = 0.0827) = 0.0827 drops 0.07 and 0.03.
    assert math.sqrt(0.1) * e_minus_h < 0.1
    torch.testing.assert_close(adapted_probs(Eta(0.1)), expected(0.4, 0.3, 0.2))
    # η = 0.05: threshold min(0.05, √0.05·0.2616 = 0.0585) = 0.05 drops only 0.03.
    assert math.sqrt(0.05) * e_minus_h > 0.05
    torch.testing.assert_close(adapted_probs(Eta(0.05)), expected(0.4, 0.3, 0.2, 0.07))


def test_chain_order_is_temperature_first() -> None:
    # τ = 0.5 gives (0.541, 0.304, 0.135, 0.017, 0.003); top-p 0.8 then keeps two tokens:
    # (0.16, 0.09) / 0.25. The other order would keep three: (0.16, 0.09, 0.04) / 0.29.
    chain = make_adaptors(temperature=0.5, top_p=0.8)
    assert [type(a) for a in chain] == [Temperature, TopP]
    torch.testing.assert_close(adapted_probs(*chain), expected(0.64, 0.36))
    top_two = make_adaptors(temperature=0.5, top_k=2)
    torch.testing.assert_close(adapted_probs(*top_two), expected(0.64, 0.36))


def test_full_chain_order() -> None:
    chain = make_adaptors(temperature=0.9, top_k=3, top_p=0.9, typical_p=0.9, eta=0.01)
    assert [type(a) for a in chain] == [Temperature, TopK, TopP, Typical, Eta]
    assert make_adaptors() == ()


def test_batched_logits_and_low_precision() -> None:
    logits = torch.stack([LOGITS, LOGITS.flip(0)]).to(torch.bfloat16)
    log_probs = adapted_log_probs(logits, make_adaptors(top_p=0.75))
    assert log_probs.dtype == torch.float32
    torch.testing.assert_close(
        log_probs[0].exp().double(), expected(0.4, 0.3, 0.2), atol=2e-3, rtol=0
    )
    torch.testing.assert_close(log_probs[1].exp().flip(0), log_probs[0].exp())


@pytest.mark.parametrize(
    "option",
    [
        {"temperature": 0.0},
        {"top_k": 0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"typical_p": 0.0},
        {"eta": 1.0},
    ],
)
def test_invalid_options(option: dict) -> None:
    with pytest.raises(ConfigError):
        make_adaptors(**option)
