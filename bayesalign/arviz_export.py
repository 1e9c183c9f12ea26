"""Export a `Posterior` to ArviZ: per-sample quantities as draws, weights as sample stats."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import arviz

    from .posterior import Posterior


def posterior_to_arviz(posterior: Posterior) -> arviz.InferenceData:
    """One chain of draws: ``log_score``, each factor site's value and the sequence length.

    Weighted posteriors keep their normalised weights in ``sample_stats.weight``, and the
    proposal's ``log P − log q`` in ``proposal_stats.log_weight``; scalar diagnostics (with
    ``distances_from``, what the distances were computed from) go to attrs.
    """
    import arviz as az

    samples = posterior.samples
    draws: dict[str, np.ndarray] = {"length": samples.lengths.cpu().numpy()[None]}
    target = posterior.target
    if target is not None:
        sites = target.factors(samples, posterior.context)
        for name, site in sites.items():
            value = site.metadata.get("phi", site.value)
            draws[name] = value.detach().double().cpu().numpy()[None]
        draws["log_score"] = (
            target.log_score(samples, posterior.context).detach().cpu().numpy()[None]
        )
    stats = {"weight": posterior.normalised_weights.cpu().numpy()[None]}
    attrs = {
        k: v for k, v in posterior.diagnostics.as_dict().items()
        if isinstance(v, (int, float, bool, str))
    }
    attrs["engine"] = posterior.engine
    data = az.from_dict(posterior=draws, sample_stats=stats, attrs=attrs)
    if posterior.proposal_log_weights is not None:
        log_w = posterior.proposal_log_weights.double().cpu().numpy()[None]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # arviz notes that it adds chain/draw dims
            data.add_groups({"proposal_stats": {"log_weight": log_w}})
    return data
