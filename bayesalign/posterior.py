"""`Posterior`: the one result type of every engine, weighted samples or a trained policy."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from .diagnostics import Diagnostics
from .distribution import SequenceDistribution
from .errors import BayesAlignError
from .evaluation import empirical_log_prob, normalised_weights
from .sequences import Sequences
from .targets import NO_CONTEXT, Target

LogProb = Callable[[Sequences], torch.Tensor]
FORMAT = 2  # of posterior.json; Posterior.load also reads format 1 (no "format" key)


class Posterior:
    """What an engine returns, built complete: its draws, the law they follow, their diagnostics.

    - ``samples``: the engine's output draws; ``log_weights`` their unnormalised log-weights
      (SNIS, Exact) or None when they are equally weighted (Rejection, QRS, BoN, a policy).
    - ``proposal_log_weights``: ``log P − log q`` of every proposal draw (ArviZ export).
    - ``law``: log-probability of the distribution the engine samples from, where it is known
      exactly (Exact and Rejection: p; QRS: p_β; BoN: its exact law; a trained policy: π).
    - ``policy``: the trained policy (policy engines), which `sample` draws from afresh.
    - ``diagnostics``: `evaluate`'s `Diagnostics`, with the engine's own numbers in
      ``diagnostics.extras`` (also `extras`); ``config``: the engine's settings;
      ``history``: one dict of metrics per training step.
    - ``target`` and ``context``: what was solved (the ArviZ export scores the samples).
    """

    def __init__(
        self,
        samples: Sequences,
        *,
        engine: str,
        diagnostics: Diagnostics,
        target: Target | None = None,
        context: Any = NO_CONTEXT,
        log_weights: torch.Tensor | None = None,
        proposal_log_weights: torch.Tensor | None = None,
        law: LogProb | None = None,
        policy: SequenceDistribution | None = None,
        config: dict | None = None,
        history: list[dict] | None = None,
    ) -> None:
        self.samples = samples
        self.engine = engine
        self.diagnostics = diagnostics
        self.target = target
        self.context = context
        self.log_weights = log_weights
        self.proposal_log_weights = proposal_log_weights
        self.law = law
        self.policy = policy
        self.config = dict(config or {})
        self.history = list(history or [])

    def __repr__(self) -> str:
        return f"Posterior(engine={self.engine}, samples={len(self.samples)})"

    @property
    def log_z(self) -> float | None:
        """The engine's (exact or estimated) ``log Z``; shorthand for ``diagnostics.log_z``."""
        return self.diagnostics.log_z

    @property
    def extras(self) -> dict[str, float]:
        """The engine's own numbers (``diagnostics.extras``): BoN's bounds, DPG's running log Ẑ…"""
        return self.diagnostics.extras

    @property
    def normalised_weights(self) -> torch.Tensor:
        """Self-normalised weights of ``samples`` (uniform when unweighted)."""
        return normalised_weights(self.log_weights, len(self.samples))

    def log_prob(self, y: Sequences) -> torch.Tensor:
        """Log-probability of ``y`` under this posterior's law (the weighted empirical law for SNIS)."""
        if self.law is not None:
            return self.law(y)
        if self.log_weights is None:
            raise BayesAlignError(
                f"{self.engine} posterior has no closed-form law here (non-enumerable prior); "
                "use its samples and diagnostics"
            )
        return empirical_log_prob(self.samples, self.log_weights, y)

    def sample(self, num_samples: int) -> Sequences:
        """Fresh draws from a trained policy, or a weighted resample of the stored samples."""
        if self.policy is not None:
            with torch.no_grad():
                return self.policy.sample_batch(num_samples)
        index = torch.multinomial(self.normalised_weights, num_samples, replacement=True)
        return self.samples[index]

    def summary(self) -> str:
        """A two-column table: the engine, its settings, every diagnostic that applies."""
        rows = [("engine", self.engine)]
        rows += [(f"config[{k}]", _fmt(v)) for k, v in self.config.items()]
        for name, value in self.diagnostics.as_dict().items():
            if value is None or value == {} or value == [] or name in ("extras", "warnings"):
                continue
            if isinstance(value, dict):
                rows += [(f"{name}[{k}]", _fmt(v)) for k, v in value.items()]
            else:
                rows.append((name, _fmt(value)))
        rows += [(k, _fmt(v)) for k, v in self.extras.items()]
        width = max(len(r[0]) for r in rows)
        lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
        lines += [f"warning: {w}" for w in self.diagnostics.warnings]
        return "\n".join(lines)

    def to_arviz(self) -> Any:
        """ArviZ InferenceData: per-sample log-scores and factor values, weights, diagnostics."""
        from .arviz_export import posterior_to_arviz

        return posterior_to_arviz(self)

    def save(self, path: str | Path) -> None:
        """Write samples, weights and policy parameters (safetensors) and metadata (JSON)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"tokens": self.samples.tokens, "mask": self.samples.mask}
        for name in ("log_weights", "proposal_log_weights"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        if self.samples.log_q is not None:
            tensors["log_q"] = self.samples.log_q
        save_file({k: v.detach().cpu().clone() for k, v in tensors.items()},
                  str(path / "samples.safetensors"))
        if self.policy is not None and self.policy.module is not None:
            # save_model de-duplicates tied weights (e.g. GPT-2's lm_head and embeddings).
            save_model(self.policy.module, str(path / "policy.safetensors"))
        meta = {
            "format": FORMAT,
            "engine": self.engine,
            "config": self.config,
            "history": self.history,
            "diagnostics": self.diagnostics.as_dict(),
            "context": self.samples.context,
        }
        (path / "posterior.json").write_text(json.dumps(meta, indent=2, default=str))

    @classmethod
    def load(cls, path: str | Path, policy: SequenceDistribution | None = None) -> Posterior:
        """Read a saved posterior; pass ``policy`` (same architecture) to restore its weights."""
        path = Path(path)
        meta = json.loads((path / "posterior.json").read_text())
        tensors = load_file(str(path / "samples.safetensors"))
        samples = Sequences(tokens=tensors["tokens"], mask=tensors["mask"],
                            context=meta["context"], log_q=tensors.get("log_q"))
        if policy is not None:
            if not (path / "policy.safetensors").exists():
                raise BayesAlignError(f"{path} holds no policy weights")
            load_model(policy.module, str(path / "policy.safetensors"))
        return cls(
            samples,
            engine=meta["engine"],
            diagnostics=_saved_diagnostics(meta),
            log_weights=tensors.get("log_weights"),
            proposal_log_weights=tensors.get("proposal_log_weights"),
            policy=policy,
            law=policy.log_prob if policy is not None else None,
            config=meta["config"],
            history=meta["history"],
        )


def _saved_diagnostics(meta: dict) -> Diagnostics:
    """The saved diagnostics; format 1 (no ``format`` key) kept the engine's extras beside them.

    Format 1's other numbers (``num_proposed``, ``num_accepted``, ``exact_log_z``,
    ``estimates``) were inputs of `evaluate` and are already in its saved diagnostics.
    """
    diagnostics = Diagnostics(**meta["diagnostics"])
    if meta.get("format", 1) == 1:
        diagnostics.extras = dict(meta.get("extras") or {})
    return diagnostics


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)
