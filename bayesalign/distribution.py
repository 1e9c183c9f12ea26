"""`SequenceDistribution`: the protocol every prior and proposal over `Sequences` follows.

It is a Pyro distribution, so a target writes ``pyro.sample("y", prior)``; engines call its
batched ``sample`` (which caches the exact ``log_q`` of each row) and ``log_prob`` directly.
"""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

from .errors import NotEnumerableError
from .sequences import Sequences


class SequenceDistribution(TorchDistribution):
    """A distribution over token sequences with batched sampling and exact log-probabilities.

    Subclasses set ``vocab_size`` and ``eos_token_id`` and implement ``sample_batch``,
    ``log_prob`` and ``token_log_probs``; enumerable ones also implement ``enumerate_support``.
    ``module`` is the ``torch.nn.Module`` holding trainable parameters, or None if fixed.
    """

    arg_constraints: dict = {}
    support = constraints.real
    has_enumerate_support = False
    vocab_size: int
    eos_token_id: int | None = None
    # (optimizer, learning rate) that suit this parametrisation when trained as a policy.
    recommended_optimizer: tuple[str, float] = ("adam", 1e-5)

    def __init__(self) -> None:
        super().__init__(torch.Size(), torch.Size(), validate_args=False)

    @property
    def module(self) -> torch.nn.Module | None:
        return None

    @property
    def vocabulary_id(self) -> tuple:
        """What two distributions must share for log-ratios of their samples to mean anything."""
        return (self.vocab_size, self.eos_token_id)

    def sample(self, sample_shape: torch.Size | tuple = ()) -> Sequences:
        """Draw ``prod(sample_shape)`` sequences (one for ``()``), each with its exact ``log_q``."""
        return self.sample_batch(max(1, int(torch.Size(sample_shape).numel())))

    def sample_batch(self, num_samples: int) -> Sequences:
        raise NotImplementedError

    def log_prob(self, value: Sequences) -> torch.Tensor:
        raise NotImplementedError

    def token_log_probs(self, value: Sequences) -> torch.Tensor:
        """Per-position log-probabilities ``[batch, length]`` (0 outside the mask), with grad."""
        raise NotImplementedError

    def given(self, context: object) -> SequenceDistribution:
        """This distribution conditioned on ``context`` (a prompt), for conditional targets;
        itself for "no context" (``NO_CONTEXT``), so callers never branch on it."""
        return self if context is None else self.conditioned(context)

    def conditioned(self, context: object) -> SequenceDistribution:
        """This distribution given a context that is there (what subclasses implement)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be conditioned on a context")

    def trainable_copy(self) -> SequenceDistribution:
        """A policy initialised at this distribution with its own trainable parameters."""
        raise NotImplementedError(f"{type(self).__name__} cannot be trained")

    def enumerate_support(self, expand: bool = False) -> Sequences:
        raise NotEnumerableError(
            f"{type(self).__name__} cannot enumerate its support; use a sampling engine"
        )

    def expand(self, batch_shape, _instance=None):
        # Batching lives inside `Sequences`; Pyro's plates have nothing to expand.
        return self
