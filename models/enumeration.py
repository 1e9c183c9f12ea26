"""Enumerating the support of a small sequence distribution (the exact worlds' oracle)."""

from __future__ import annotations

import itertools

import torch

from bayesalign.distribution import SequenceDistribution
from bayesalign.sequences import Sequences, mask_through_eos


def enumerate_sequences(distribution: SequenceDistribution, length: int) -> Sequences:
    """All token strings up to ``length`` (ending at the first EOS) with finite log-probability."""
    rows = itertools.product(range(distribution.vocab_size), repeat=length)
    tokens = torch.tensor(list(rows), dtype=torch.long)
    mask = mask_through_eos(tokens, distribution.eos_token_id)
    # After the first EOS a row is padding: keep only its all-zero padded copy.
    keep = (tokens.masked_fill(mask, 0) == 0).all(-1)
    sequences = Sequences(tokens=tokens[keep], mask=mask[keep])
    with torch.no_grad():
        log_q = distribution.log_prob(sequences).double()
    finite = torch.isfinite(log_q)
    return sequences[finite.nonzero().squeeze(-1)].with_log_q(log_q[finite])
