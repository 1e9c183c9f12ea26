"""What the policy engines (DPG, KL-RL) share: contexts, scored batches, the final `Posterior`."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from bayesalign.diagnostics import Diagnostics
from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import ConfigError, EmptySupportError, require_positive
from bayesalign.evaluation import evaluate
from bayesalign.posterior import Posterior
from bayesalign.seeding import seeded
from bayesalign.sequences import Sequences
from bayesalign.targets import NO_CONTEXT, Target
from bayesalign.training import TrainingConfig
from bayesalign.training.processes import from_first_process

from .base import require_same_vocabulary

if TYPE_CHECKING:  # bayesalign.models loads transformers, which a TabularLM fit never needs
    from bayesalign.models.lora_options import LoraOptions


@dataclass
class PolicyEngineConfig(TrainingConfig):
    """What every policy engine adds to the training loop's settings."""

    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = (*TrainingConfig.RESUMABLE_CHANGES, "policy")

    contexts: Any = None  # deprecated: pass them to fit(target, contexts=...)
    contexts_per_step: int = 4  # contexts drawn per step; the batch is split between them
    policy: SequenceDistribution | None = None  # defaults to a trainable copy of the prior
    eval_samples: int = 4096  # draws for the final diagnostics (exact when enumerable)
    lora: LoraOptions | dict | None = None  # train LoRA adapters on the policy's model (CausalLM)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora is not None:
            self.lora = _lora_options(self.lora)
        require_positive("contexts_per_step", self.contexts_per_step)
        require_positive("eval_samples", self.eval_samples)
        if self.contexts is not None:
            warnings.warn(f"{type(self).__name__}(contexts=...) is deprecated and will be removed "
                          "in the next release; use fit(target, contexts=...)",
                          DeprecationWarning, stacklevel=4)

    def contexts_and_policy(
        self, target: Target, context: Any, contexts: Any
    ) -> tuple[list[Any], SequenceDistribution]:
        """The contexts to train on (fit's one ``context`` or several ``contexts``) and the
        policy to train (checked against the prior)."""
        name = type(self).__name__
        if context is not NO_CONTEXT and contexts is not None:
            raise ConfigError(f"{name}.fit got context={context!r} and contexts=: give one "
                              "context or several, not both")
        if self.contexts is not None:
            if contexts is not None or context is not NO_CONTEXT:
                given = "contexts=" if contexts is not None else f"context={context!r}"
                raise ConfigError(f"{name}.fit got {given}, but the constructor got contexts= "
                                  "(deprecated): give them to fit only")
            contexts = self.contexts
        contexts = [context] if contexts is None else context_list(contexts)
        with seeded(self.seed):  # LoRA's A is drawn at random: the same on every run
            policy = make_policy(target, contexts[0], self.policy, self.lora)
        return contexts, policy


def _lora_options(value: Any) -> LoraOptions:
    """``lora=``: `LoraOptions`, or a dict of its fields (from a YAML or JSON config)."""
    from bayesalign.models.lora_options import LoraOptions

    if isinstance(value, dict):
        unknown = sorted(set(value) - set(LoraOptions.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"lora got unknown options {unknown}; LoraOptions has "
                              f"{list(LoraOptions.__dataclass_fields__)}")
        return LoraOptions(**value)
    if not isinstance(value, LoraOptions):
        raise ConfigError(f"lora must be LoraOptions(...), a dict of its fields or None, got "
                          f"{value!r}")
    return value


LOSS_NORMALISATIONS = ("sequence", "token")


def require_loss_normalisation(value: str) -> None:
    """DPG's and KL-RL's ``loss_normalisation``: per sequence (the default) or per token."""
    if value not in LOSS_NORMALISATIONS:
        raise ConfigError(f"loss_normalisation must be one of {LOSS_NORMALISATIONS}, got {value!r}")

def context_list(contexts: Any) -> list[Any]:
    """Contexts as a list; a `datasets.Dataset` gives its ``context`` (or ``prompt``) column."""
    if hasattr(contexts, "column_names"):
        for column in ("context", "prompt"):
            if column in contexts.column_names:
                return list(contexts[column])
        raise ConfigError(f"the contexts dataset needs a 'context' or 'prompt' column, has "
                          f"{contexts.column_names}")
    contexts = list(contexts)
    if not contexts:
        raise ConfigError("contexts is empty: give at least one context")
    return contexts


def contexts_digest(contexts: list[Any]) -> str:
    """A fingerprint of the training contexts, kept in engine state to refuse resuming on others."""
    return hashlib.sha256(json.dumps(contexts, default=repr).encode()).hexdigest()


def require_same_contexts(saved: str, here: str) -> None:
    if saved != here:
        raise ConfigError("the checkpoint was written by a fit on other contexts than this one; "
                          "use a new checkpoint_dir or the same contexts")


def make_policy(target: Target, context: Any, policy: SequenceDistribution | None,
                lora: LoraOptions | None = None):
    """The policy to train: a trainable copy of the prior unless one is given (checked); with
    ``lora``, new LoRA adapters on that model instead of a copy (one base in memory)."""
    prior = target.prior(context)
    if lora is not None:
        from bayesalign.models.lora import lora_policy  # loads transformers and peft
    if policy is None:
        return prior.trainable_copy() if lora is None else lora_policy(prior, lora)
    require_same_vocabulary("policy", policy, prior)
    return policy if lora is None else lora_policy(policy, lora)


@dataclass
class ScoredBatch:
    """Draws from q with every log-score an update needs, each computed once."""

    y: Sequences
    context: Any
    log_q: torch.Tensor
    log_prior: torch.Tensor
    log_score: torch.Tensor

    @property
    def log_w(self) -> torch.Tensor:
        return self.log_score - self.log_q


def score_batch(
    target: Target, proposal: SequenceDistribution, num_samples: int, context: Any
) -> ScoredBatch:
    """``num_samples`` draws from ``proposal`` (already given ``context``), scored by the target."""
    with torch.no_grad():
        y = proposal.sample_batch(num_samples)
        log_prior = target.prior(context).log_prob(y).double()
        log_score = target.log_score(y, context, log_prior=log_prior)
    return ScoredBatch(y, context, y.log_q.double(), log_prior, log_score)


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the step's contexts, over those that report it."""
    means = {}
    for key in dict.fromkeys(k for row in rows for k in row):
        values = [row[key] for row in rows if key in row]
        means[key] = sum(values) / len(values)
    return means


def pick_contexts(contexts: Sequence[Any], per_step: int) -> list[Any]:
    """Contexts for one step, drawn with torch's RNG so a resumed run draws the same; process
    0's on every process, so that the weights gathered across processes are one context's."""
    if len(contexts) == 1:
        return [contexts[0]]
    index = from_first_process(torch.randint(len(contexts), (min(per_step, len(contexts)),)))
    return [contexts[i] for i in index.tolist()]


def _evaluated(
    target: Target, policy: SequenceDistribution, engine: str, context: Any,
    several_contexts: bool, history: list[dict], config: dict, num_samples: int,
    extras: dict[str, float] | None,
) -> Posterior:
    """The policy's `Posterior` for one context, with its diagnostics."""
    conditional = policy.given(context)
    with torch.no_grad():
        samples = conditional.sample_batch(num_samples)
    try:
        diagnostics = evaluate(target, samples, context=context, law=conditional.log_prob,
                               policy=conditional, eval_samples=num_samples)
    except EmptySupportError as error:
        if not several_contexts:
            raise
        # One context whose draws all violate a constraint must not discard the trained
        # policy; its distances are unknown, so the context averages leave them out (None).
        diagnostics = Diagnostics(num_samples=num_samples,
                                  warnings=[f"context {context!r}: {error}"])
    diagnostics = replace(diagnostics, extras=dict(extras or {}))
    return Posterior(samples, engine=engine, diagnostics=diagnostics, target=target,
                     context=context, policy=conditional, law=conditional.log_prob,
                     history=history, config=config)


def finish(
    target: Target,
    policy: SequenceDistribution,
    engine: str,
    contexts: list[Any],
    history: list[dict],
    config: dict,
    num_samples: int,
    extras: dict[str, float] | None = None,
    seed: int | None = None,
) -> Posterior:
    """The trained policy as a `Posterior`, evaluated per context and averaged over contexts.

    The evaluation draws are seeded like training, so a fit's diagnostics do not depend on
    what ran before it in the process. With several contexts the diagnostics are context
    averages, ``extras`` also holds each context's ``kl_target_policy`` and ``log_z``, and the
    samples are the first context's.
    """
    with seeded(seed):
        per_context = [_evaluated(target, policy, engine, context, len(contexts) > 1, history,
                                  config, num_samples, extras) for context in contexts]
    if len(per_context) == 1:
        return per_context[0]
    by_context = {
        f"{name}[{context}]": getattr(p.diagnostics, name)
        for context, p in zip(contexts, per_context)
        for name in ("kl_target_policy", "log_z")
        if getattr(p.diagnostics, name) is not None
    }
    diagnostics = replace(_average([p.diagnostics for p in per_context]),
                          extras={**by_context, **(extras or {})})
    return Posterior(per_context[0].samples, engine=engine, diagnostics=diagnostics,
                     target=target, context=NO_CONTEXT, policy=policy, history=history,
                     config=config)


def _average(items: list[Diagnostics]) -> Diagnostics:
    """The context average E_c of every numeric diagnostic (CDPG reports E_c KL)."""
    out = Diagnostics(exact=all(d.exact for d in items))
    for name, value in vars(items[0]).items():
        if isinstance(value, float):
            values = [getattr(d, name) for d in items]
            if all(v is not None for v in values):
                setattr(out, name, float(sum(values) / len(values)))
    for key in items[0].rewards:
        if all(key in d.rewards for d in items):
            out.rewards[key] = sum(d.rewards[key] for d in items) / len(items)
    for key in items[0].moments:
        if not all(key in d.moments for d in items):
            continue
        columns = zip(*(d.moments[key] for d in items))
        out.moments[key] = [sum(c) / len(items) for c in columns]
    sources = {d.distances_from for d in items}
    out.distances_from = sources.pop() if len(sources) == 1 else None
    out.warnings = [w for d in items for w in d.warnings]
    return out
