"""`@target`: compile a Pyro model (one prior site + factor sites) into a `Target`.

Engines read a target only through this class: ``prior(context)``, ``log_potential(y, context)``
(the sum of factor sites), ``log_score = log a + log_potential`` and, for enumerable priors,
``support()``. The model runs under Pyro's effect handlers, batched: ``y`` is a `Sequences`
batch and each factor returns one value per row.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger

from .distribution import SequenceDistribution
from .errors import InvalidFactorError, InvalidTargetError
from .likelihood import METADATA, MomentLambdas
from .sequences import Sequences

NO_CONTEXT: Any = None


class _PriorFound(Exception):
    def __init__(self, name: str, fn: SequenceDistribution) -> None:
        self.name, self.fn = name, fn


class _StopAtPrior(Messenger):
    """Stop the model at its prior site, so reading the prior draws no sample."""

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and isinstance(msg["fn"], SequenceDistribution):
            raise _PriorFound(msg["name"], msg["fn"])


@dataclass(frozen=True)
class FactorSite:
    """One factor site's values for a batch: ``log_factor`` and what the site declared."""

    name: str
    log_factor: torch.Tensor
    kind: str
    metadata: dict

    @property
    def value(self) -> torch.Tensor:
        """The site's natural value: the raw reward for `reward`, else the log-factor."""
        return self.metadata.get("reward", self.log_factor)


class Target:
    """The unnormalised target ``P(y | x) = a(y | x) · exp(Σ factors)`` of a Pyro model."""

    def __init__(self, model: Callable[..., Any], lambdas: dict | None = None) -> None:
        self.model = model
        self.lambdas = dict(lambdas or {})
        self.name = getattr(model, "__name__", "target")
        functools.update_wrapper(self, model)

    def __repr__(self) -> str:
        return f"Target({self.name})"

    def _run(self, model: Callable, context: Any) -> Any:
        with pyro.validation_enabled(False), MomentLambdas(self.lambdas):
            return model() if context is NO_CONTEXT else model(context)

    def _prior_site(self, context: Any = NO_CONTEXT) -> tuple[str, SequenceDistribution]:
        try:
            self._run(_StopAtPrior()(self.model), context)
        except _PriorFound as found:
            return found.name, found.fn
        raise InvalidTargetError(
            f"target '{self.name}' has no prior site: write y = pyro.sample('y', prior) with a "
            "bayesalign prior (TabularLM, CausalLM, ...)"
        )

    def prior(self, context: Any = NO_CONTEXT) -> SequenceDistribution:
        """The prior ``a(· | context)`` of the target's prior site."""
        return self._prior_site(context)[1]

    def is_enumerable(self, context: Any = NO_CONTEXT) -> bool:
        return self.prior(context).has_enumerate_support

    def support(self, context: Any = NO_CONTEXT) -> Sequences:
        """Every sequence of the prior's support with its exact prior ``log_q``."""
        return self.prior(context).enumerate_support()

    def factors(self, y: Sequences, context: Any = NO_CONTEXT) -> dict[str, FactorSite]:
        """Run the model with ``y`` at the prior site; return its validated factor sites."""
        if context is NO_CONTEXT and y.context is not None:
            return self._factors_by_context(y)
        name, _ = self._prior_site(context)
        traced = poutine.trace(poutine.condition(self.model, data={name: y}))
        tr = self._run(traced.get_trace, context)
        priors = [
            n for n, s in tr.nodes.items()
            if s["type"] == "sample" and isinstance(s["fn"], SequenceDistribution)
        ]
        if len(priors) != 1:
            raise InvalidTargetError(
                f"target '{self.name}' has {len(priors)} prior sites {priors}; it needs exactly one"
            )
        sites = {}
        for site_name, site in tr.nodes.items():
            if site["type"] != "sample" or site_name == name:
                continue
            if not (site.get("infer") or {}).get("is_auxiliary"):
                raise InvalidTargetError(
                    f"target '{self.name}': site '{site_name}' is a latent sample site; a target "
                    "has one prior site and factor sites (pyro.factor / ba.reward / ...) only"
                )
            sites[site_name] = self._validated_site(site_name, site, len(y))
        return sites

    def _factors_by_context(self, y: Sequences) -> dict[str, FactorSite]:
        """Rows with different contexts run the model once per distinct context."""
        groups: dict[Hashable, list[int]] = {}
        for i, c in enumerate(y.context):
            groups.setdefault(_hashable(c), []).append(i)
        per_group = {key: self.factors(y[rows], y.context[rows[0]]) for key, rows in groups.items()}
        first = next(iter(per_group.values()))
        merged = {}
        for site_name, site in first.items():
            log_factor = torch.empty(len(y), dtype=site.log_factor.dtype)
            values = torch.empty(len(y), dtype=site.value.dtype)
            for key, rows in groups.items():
                log_factor[rows] = per_group[key][site_name].log_factor.cpu()
                values[rows] = per_group[key][site_name].value.cpu()
            meta = dict(site.metadata)
            if "reward" in meta:
                meta["reward"] = values
            merged[site_name] = FactorSite(site_name, log_factor, site.kind, meta)
        return merged

    def _validated_site(self, site_name: str, site: dict, batch: int) -> FactorSite:
        log_factor = torch.as_tensor(site["fn"].log_factor)
        if log_factor.dim() == 0:
            log_factor = log_factor.expand(batch)
        if log_factor.shape != (batch,):
            raise InvalidFactorError(
                f"target '{self.name}': factor '{site_name}' has shape {tuple(log_factor.shape)}; "
                f"it must give one value per sequence, shape ({batch},)"
            )
        bad = torch.isnan(log_factor) | (log_factor == float("inf"))
        if bad.any():
            index = int(bad.nonzero()[0])
            raise InvalidFactorError(
                f"target '{self.name}': factor '{site_name}' is {log_factor[index].item()} for "
                f"sample {index} ({int(bad.sum())} of {batch} samples); factors must be finite "
                "or -inf"
            )
        meta = dict((site.get("infer") or {}).get(METADATA, {}))
        kind = meta.pop("kind", "factor")
        if kind == "moment":
            meta["lambda"] = self.lambdas.get(site_name)
        return FactorSite(site_name, log_factor, kind, meta)

    def log_potential(self, y: Sequences, context: Any = NO_CONTEXT) -> torch.Tensor:
        """``Σ factors(y)`` in float64: the log-likelihood ``log L(y)``."""
        sites = self.factors(y, context)
        total = torch.zeros(len(y), dtype=torch.float64, device=y.device)
        for site in sites.values():
            total = total + site.log_factor.to(total)
        return total

    def log_score(
        self, y: Sequences, context: Any = NO_CONTEXT, log_prior: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``log P(y) = log a(y) + log L(y)``, the unnormalised log-target.

        Pass ``log_prior`` when ``y`` was drawn from the prior itself (its cached ``log_q``), so
        the prior is never run twice for one weight.
        """
        if log_prior is None:
            if y.context is not None and context is NO_CONTEXT:
                log_prior = self._log_prior_by_context(y)
            else:
                log_prior = self.prior(context).log_prob(y)
        return log_prior.detach().to(torch.float64) + self.log_potential(y, context)

    def _log_prior_by_context(self, y: Sequences) -> torch.Tensor:
        out = torch.empty(len(y), dtype=torch.float64)
        groups: dict[Hashable, list[int]] = {}
        for i, c in enumerate(y.context):
            groups.setdefault(_hashable(c), []).append(i)
        for rows in groups.values():
            prior = self.prior(y.context[rows[0]])
            out[rows] = prior.log_prob(y[rows]).detach().double().cpu()
        return out.to(y.device)

    def with_lambdas(self, lambdas: dict[str, torch.Tensor]) -> Target:
        """This target with moment sites set to ``λ·φ`` (the fitted distributional EBM)."""
        return Target(self.model, {**self.lambdas, **lambdas})


def _hashable(context: Any) -> Hashable:
    try:
        hash(context)
        return context
    except TypeError:
        return repr(context)


def target(model: Callable[..., Any]) -> Target:
    """Decorator: ``@ba.target def t(context=None): y = pyro.sample("y", prior); pyro.factor(...)``."""
    return Target(model)
