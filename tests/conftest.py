"""Shared worlds for the tests: SPEC §10 Toy A, brute-force oracles independent of the library,
and the SIGKILL helper of the resume tests."""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pytest
import torch

import bayesalign as ba
from bayesalign.models import TabularLM

# The tests' tensors are tiny: one intra-op thread avoids synchronisation overhead, which
# dominates (5x measured) when the 2 cores are shared with anything else.
torch.set_num_threads(1)

P1 = [0.5, 0.3, 0.2]
T = [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4]]


def toy_a_prior() -> TabularLM:
    return TabularLM(torch.tensor(P1, dtype=torch.float64), torch.tensor(T, dtype=torch.float64), 3)


def toy_a_target(kl_coef: float = 1.0, prior: TabularLM | None = None) -> ba.Target:
    prior = prior or toy_a_prior()

    @ba.target
    def toy_a():
        y = pyro.sample("y", prior)
        ba.reward("r", (y.tokens == 2).sum(-1).double(), kl_coef=kl_coef)

    return toy_a


def brute_force_toy_a(kl_coef: float) -> dict[str, float]:
    """Z, E_p r, KL(p‖a), KL(a‖p) by a plain Python loop over the 27 sequences."""
    a, r = {}, {}
    for x in itertools.product(range(3), repeat=3):
        a[x] = P1[x[0]] * T[x[0]][x[1]] * T[x[1]][x[2]]
        r[x] = sum(t == 2 for t in x)
    z = sum(a[x] * math.exp(r[x] / kl_coef) for x in a)
    p = {x: a[x] * math.exp(r[x] / kl_coef) / z for x in a}
    return {
        "z": z,
        "reward": sum(p[x] * r[x] for x in a),
        "kl_p_a": sum(p[x] * math.log(p[x] / a[x]) for x in a),
        "kl_a_p": sum(a[x] * math.log(a[x] / p[x]) for x in a),
        "entropy_p": -sum(p[x] * math.log(p[x]) for x in a),
        "p": p,
        "a": a,
    }


# π for the reference tests: another first-token law and transition table than Toy A's prior,
# so p, a and π all differ.
PI1 = [0.2, 0.3, 0.5]
PI_T = [[0.4, 0.3, 0.3], [0.2, 0.4, 0.4], [0.1, 0.3, 0.6]]


def toy_a_policy() -> TabularLM:
    return TabularLM(torch.tensor(PI1, dtype=torch.float64),
                     torch.tensor(PI_T, dtype=torch.float64), 3)


def brute_force_policy_distances(kl_coef: float = 1.0) -> tuple[float, float]:
    """KL(p‖π) and TVD(p, π) of `toy_a_policy` on Toy A by a plain loop over the 27 sequences."""
    p = brute_force_toy_a(kl_coef)["p"]
    kl = tvd = 0.0
    for x in itertools.product(range(3), repeat=3):
        pi = PI1[x[0]] * PI_T[x[0]][x[1]] * PI_T[x[1]][x[2]]
        kl += p[x] * math.log(p[x] / pi)
        tvd += 0.5 * abs(p[x] - pi)
    return kl, tvd


def assert_se_calibrated(references, kl: float, tvd: float) -> None:
    """z = (estimate − exact)/se of `toy_a_policy`'s KL and TVD over independent reference pools:
    sd in (0.7, 1.35) and |mean| < 0.6 when the standard errors are honest."""
    from bayesalign.reference import distances

    log_prob = toy_a_policy().log_prob
    z_kl, z_tvd = [], []
    for reference in references:
        measured = distances(reference, log_prob(reference.samples))
        z_kl.append((measured.kl_target_policy - kl) / measured.kl_target_policy_se)
        z_tvd.append((measured.tvd - tvd) / measured.tvd_se)
    for z in (torch.tensor(z_kl), torch.tensor(z_tvd)):
        assert 0.7 < float(z.std()) < 1.35
        assert abs(float(z.mean())) < 0.6


def brute_force_qrs_toy_a(qrs_beta: float, kl_coef: float = 1.0) -> dict[str, float]:
    """QRS with P = a·e^{r/β}, q = a on Toy A by a plain loop (SPEC §4.2, §10): p_β ∝ min(P,
    β_q·q); acceptance E_q[min(1, P/(β_q·q))] = Σ min(P, β_q·q)/β_q; TVD(p, p_β); KL(p‖p_β)."""
    world = brute_force_toy_a(kl_coef)
    a, p, z = world["a"], world["p"], world["z"]
    return brute_force_qrs(a, {x: p[x] * z for x in a}, qrs_beta)


def brute_force_tilt_toy_a(features, lambdas) -> dict:
    """p ∝ a·e^{λ·φ} on Toy A by a plain loop: Z, the moments E_p φ, KL(p‖a) and p itself.
    ``features`` maps a sequence (tuple of tokens) to a list of floats."""
    a = brute_force_toy_a(1.0)["a"]
    tilt = {x: math.exp(sum(lam * f for lam, f in zip(lambdas, features(x)))) for x in a}
    z = sum(a[x] * tilt[x] for x in a)
    p = {x: a[x] * tilt[x] / z for x in a}
    moments = [sum(p[x] * features(x)[i] for x in a) for i in range(len(lambdas))]
    return {"z": z, "moments": moments, "kl_p_a": sum(p[x] * math.log(p[x] / a[x]) for x in a),
            "p": p, "a": a}


def brute_force_moment_lambdas(features, means, steps: int = 50) -> list[float]:
    """λ* with E_p φ = μ̄ for p ∝ a·e^{λ·φ} on Toy A by a plain Newton solve of the dual:
    gradient E_p φ − μ̄, Hessian Cov_p φ (2×2 at most, inverted by hand)."""
    lambdas = [0.0] * len(means)
    for _ in range(steps):
        world = brute_force_tilt_toy_a(features, lambdas)
        p, m = world["p"], world["moments"]
        grad = [m[i] - means[i] for i in range(len(means))]
        cov = [[sum(p[x] * (features(x)[i] - m[i]) * (features(x)[j] - m[j]) for x in p)
                for j in range(len(means))] for i in range(len(means))]
        if len(means) == 1:
            step = [grad[0] / cov[0][0]]
        else:
            (h00, h01), (h10, h11) = cov
            det = h00 * h11 - h01 * h10
            step = [(h11 * grad[0] - h01 * grad[1]) / det, (h00 * grad[1] - h10 * grad[0]) / det]
        lambdas = [lam - s for lam, s in zip(lambdas, step)]
    return lambdas


def brute_force_qrs(q: dict, score: dict, qrs_beta: float) -> dict[str, float]:
    """QRS with unnormalised target ``score`` = P and proposal ``q`` (both dicts over one
    finite support) by a plain loop (SPEC §4.2): p_β ∝ min(P, β_q·q)."""
    z = sum(score.values())
    p = {x: score[x] / z for x in q}
    clipped = {x: min(score[x], qrs_beta * q[x]) for x in q}
    z_beta = sum(clipped.values())
    p_beta = {x: clipped[x] / z_beta for x in q}
    return {
        "acceptance_rate": z_beta / qrs_beta,
        "tvd": 0.5 * sum(abs(p[x] - p_beta[x]) for x in q),
        "kl": sum(p[x] * math.log(p[x] / p_beta[x]) for x in q),
    }


def brute_force_qrs_poisson(qrs_beta: float, support: int = 60) -> dict[str, float]:
    """SPEC §10's Poisson oracle by a plain loop: q = Poisson(10) truncated to {0..support−1}
    and renormalised, P(k) = q(k)·1.1^k·e^{−1} (so P/Z is Poisson(11) on the same support)."""
    weights = {k: 10.0 ** k * math.exp(-10.0) / math.factorial(k) for k in range(support)}
    total = sum(weights.values())
    q = {k: w / total for k, w in weights.items()}
    score = {k: q[k] * 1.1 ** k * math.exp(-1.0) for k in q}
    return brute_force_qrs(q, score, qrs_beta)


def has_two_target() -> ba.Target:
    """Toy A's prior restricted to the strings that contain token 2 (Z = 0.466)."""
    prior = toy_a_prior()

    @ba.target
    def has_two():
        y = pyro.sample("y", prior)
        ba.constraint("has_two", (y.tokens == 2).any(-1))

    return has_two


def assert_monitor_quiet(post, checks_every: int = 1) -> None:
    """A converged run's divergence monitor stays clear of every threshold with a margin:
    KL(π‖a) under 5 × KL(p‖a) and less than 0.5 nats above it (the warning's default 1.0),
    ESS fraction above 0.1, and no run of 3 checks (one per
    ``checks_every`` steps: PPO checks once per rollout) with log Ẑ drifting past 8 se."""
    rows = post.history
    assert max(r["monitor_kl_policy_prior_multiple"] for r in rows) < 5
    assert max(r["monitor_kl_policy_prior_excess"] for r in rows) < 0.5
    assert min(r["monitor_ess_fraction"] for r in rows) > 0.1
    longest = current = 0
    for row in rows[::checks_every]:
        current = current + 1 if row.get("monitor_log_z_drift_se", 0.0) > 8.0 else 0
        longest = max(longest, current)
    assert longest < 3


def conditional_world():
    """Two contexts with first-token laws (.5,.3,.2) and (.1,.1,.8) (SPEC §10, CDPG oracle)."""
    transition = torch.tensor(T, dtype=torch.float64)
    priors = {
        "a": TabularLM(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), transition, 3),
        "b": TabularLM(torch.tensor([0.1, 0.1, 0.8], dtype=torch.float64), transition, 3),
    }

    @ba.target
    def has_two(context):
        y = pyro.sample("y", priors[context])
        ba.constraint("has_two", (y.tokens == 2).any(-1))

    return has_two


def kill_after_first_checkpoint(script: str, ckpt: Path, steps: int, timeout: float = 120) -> None:
    """Run ``script`` in a subprocess, SIGKILL it once a checkpoint appears in ``ckpt``, and check
    that it died mid-run and left only complete (checksummed) checkpoints."""
    process = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + timeout
    while (not list(ckpt.glob("checkpoint-*")) and process.poll() is None
           and time.time() < deadline):
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed mid-run, not finished
    written = sorted(ckpt.glob("checkpoint-*"))
    assert written and int(written[-1].name.split("-")[1]) < steps
    from bayesalign.training.checkpoints import verify

    assert all(verify(c) is None for c in written)  # none half-written


def write_corpus(folder, lines_per_file=40, files=3):
    """A small synthetic corpus: lines 'k = <i>' of which every third also holds 'bad'."""
    folder.mkdir()
    for f in range(files):
        rows = [f"k = {f * lines_per_file + i}{' bad' if i % 3 == 0 else ''}\n"
                for i in range(lines_per_file)]
        (folder / f"part{f}.txt").write_text("".join(rows))
    return folder


def no_bad_target(corpus):
    @ba.target
    def no_bad():
        y = pyro.sample("y", corpus)
        ba.constraint("no_bad", torch.tensor(["bad" not in t for t in y.text]))

    return no_bad


@pytest.fixture
def toy_a() -> ba.Target:
    return toy_a_target(1.0)
