"""PHF objectives on hand-computed logits (SPEC §5, §10 item 8)."""

import math

import pytest
import torch

from bayesalign.errors import ConfigError
from bayesalign.inference.phf_objectives import (
    AWR_WEIGHT_MAX,
    awr_loss,
    mle_loss,
    rwr_loss,
    tag_segments,
    unlikelihood_loss,
)
from bayesalign.models.adaptors import BanTokens, adapted_log_probs


def one_token(probabilities, token):
    """Logits [1, 1, V] whose softmax is ``probabilities``, and the target ``token``."""
    logits = torch.tensor(probabilities, dtype=torch.float64).log().reshape(1, 1, -1)
    return logits, torch.tensor([[token]]), torch.ones(1, 1, dtype=torch.bool)


def test_mle():
    logits, tokens, mask = one_token([0.25, 0.75], 1)
    assert float(mle_loss(logits, tokens, mask)) == pytest.approx(-math.log(0.75))


def test_unlikelihood_hard_and_soft():
    logits, tokens, mask = one_token([0.25, 0.75], 0)  # p(token) = 0.25
    bad = torch.tensor([[-0.5]], dtype=torch.float64)
    good = torch.tensor([[0.0]], dtype=torch.float64)
    assert float(unlikelihood_loss(logits, tokens, mask, bad)) == pytest.approx(-math.log(0.75))
    assert float(unlikelihood_loss(logits, tokens, mask, good)) == pytest.approx(-math.log(0.25))
    assert float(unlikelihood_loss(logits, tokens, mask, bad, alpha=0.01)) == pytest.approx(
        -0.01 * math.log(0.75))
    # Soft (the PHF code's behaviour at threshold 0): weight 1 + R = 0.5 on likelihood.
    soft = unlikelihood_loss(logits, tokens, mask, bad, mode="soft")
    assert float(soft) == pytest.approx(-0.5 * math.log(0.25) - 0.5 * math.log(0.75))
    # The two agree for scores in {0, 1} (rewards 0 and −1).
    for r in (0.0, -1.0):
        reward = torch.tensor([[r]], dtype=torch.float64)
        assert float(unlikelihood_loss(logits, tokens, mask, reward, mode="soft")) == \
            pytest.approx(float(unlikelihood_loss(logits, tokens, mask, reward)))
    certain, tokens_c, mask_c = one_token([1.0 - 1e-30, 1e-30], 0)
    clamped = unlikelihood_loss(certain, tokens_c, mask_c, bad)
    assert float(clamped) == pytest.approx(-math.log(1e-20))  # 1 − p clamped at 1e-20
    with pytest.raises(ConfigError, match="rewards in \\[-1, 0\\]"):
        unlikelihood_loss(logits, tokens, mask, torch.tensor([[0.5]]), mode="soft")


def test_rwr_and_awr_weights_are_clamped():
    logits, tokens, mask = one_token([0.25, 0.75], 1)
    reward = torch.tensor([[2.0]], dtype=torch.float64)
    assert float(rwr_loss(logits, tokens, mask, reward, awr_beta=10.0)) == pytest.approx(
        -math.exp(0.2) * math.log(0.75))
    # By default β = 1, as in Pretraining: the weight is the likelihood exp(R) itself.
    assert float(rwr_loss(logits, tokens, mask, reward)) == pytest.approx(
        -math.exp(2.0) * math.log(0.75))
    value = torch.tensor([[0.5]], dtype=torch.float64, requires_grad=True)
    loss, weights = awr_loss(logits, tokens, mask, reward, value, alpha=0.5, awr_beta=1.0)
    expected = 0.5 * (-math.exp(1.5) * math.log(0.75)) + 0.5 * (0.5 - 2.0) ** 2
    assert float(loss.detach()) == pytest.approx(expected)
    loss.backward()
    assert float(value.grad) == pytest.approx(0.5 * 2 * (0.5 - 2.0))  # A uses V detached
    huge = torch.tensor([[100.0]], dtype=torch.float64)
    _, weights = awr_loss(logits, tokens, mask, huge, torch.zeros(1, 1), awr_beta=1.0)
    assert float(weights) == AWR_WEIGHT_MAX


def test_conditional_training_tags_each_segment_once_and_sampling_bans_tags():
    segments = [[5, 6], [7], [8, 9, 10]]
    tagged = tag_segments(segments, [0.0, -0.3, 0.1], threshold=0.0, good_token_id=1,
                          bad_token_id=2)
    assert tagged == [1, 5, 6, 2, 7, 1, 8, 9, 10]
    generator = torch.Generator().manual_seed(0)
    many = [[3]] * 1000
    dropped = tag_segments(many, [0.0] * 1000, threshold=0.0, good_token_id=1, bad_token_id=2,
                           drop_token_fraction=0.1, generator=generator)
    assert dropped.count(1) + dropped.count(3) == len(dropped)
    assert 850 < dropped.count(1) < 950  # ~10% of segments untagged
    ban = BanTokens((1, 2))
    log_probs = adapted_log_probs(torch.zeros(2, 5), (ban,))
    assert torch.isneginf(log_probs[:, [1, 2]]).all()
    assert torch.allclose(log_probs[:, [0, 3, 4]].exp(), torch.full((2, 3), 1 / 3))
    with pytest.raises(ConfigError, match="drop_token_fraction"):
        tag_segments(segments, [0.0] * 3, threshold=0, good_token_id=1, bad_token_id=2,
                     drop_token_fraction=1.0)
