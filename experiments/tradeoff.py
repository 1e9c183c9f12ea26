"""The probability–quality trade-off (SPEC §8, Tan et al. 2024) on an enumerable world.

1. Typical corpora of the aligned model q = p* ∝ a·e^{r/β}: among corpora whose mean −log q is
   within ε of H(q), the corpus means satisfy Ā + R̄/β ≈ log Z − H(q), so average reward and
   average prior log-likelihood trade off linearly with slope dR̄/dĀ = −β (SPEC §8.1).
2. Sampling adaptors (temperature, top-k, top-p, typical, η) applied to the aligned model move the
   exact (Ā, R̄) point: the adaptor "selects how much likelihood we exchange for reward".

Parts 1–2 are exact or simulated from exact laws (Toy A, SPEC §10), so the slope is checked, not
fitted to noise. Part 3 repeats 2 on the code prior: a model aligned to the PEP8 reward by a short
KL-RL (RLOO) fine-tune of ``bundled:code-small`` is sampled under each adaptor, and the measured
trend of corpus-level R̄ on Ā is reported (no identity is expected there: adaptors do not draw
typical corpora of q). ``python -m experiments.tradeoff [--quick] [--output DIR]``; quick mode
uses a tiny random GPT-2 for part 3.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bayesalign.app.demo import toy_a_target
from bayesalign.inference import KLRL, Exact
from bayesalign.models import CausalLM, PrefixTreeLM, scorers

from .cli import experiment_main
from .pep8_frontier import load_prior, pep8_target
from .results import publish

KL_COEFS = (0.5, 1.0, 2.0)
ADAPTORS = {
    "ancestral": {},
    "temperature 0.5": {"temperature": 0.5},
    "temperature 0.75": {"temperature": 0.75},
    "temperature 1.5": {"temperature": 1.5},
    "top-k 2": {"top_k": 2},
    "top-p 0.9": {"top_p": 0.9},
    "top-p 0.7": {"top_p": 0.7},
    "typical 0.9": {"typical_p": 0.9},
    "η 0.1": {"eta": 0.1},
}
# A 2048-token vocabulary needs wider truncations than Toy A's 3 tokens.
CODE_ADAPTORS = {
    "ancestral": {},
    "temperature 0.5": {"temperature": 0.5},
    "temperature 0.75": {"temperature": 0.75},
    "temperature 1.25": {"temperature": 1.25},
    "top-k 10": {"top_k": 10},
    "top-k 50": {"top_k": 50},
    "top-p 0.9": {"top_p": 0.9},
    "top-p 0.7": {"top_p": 0.7},
    "typical 0.9": {"typical_p": 0.9},
    "η 0.001": {"eta": 0.001},
}


@dataclass(frozen=True)
class CodeSizes:
    """The code-model half: the aligning fine-tune and how many samples each adaptor draws."""

    kl_coef: float
    policy_steps: int
    policy_batch: int
    learning_rate: float
    new_tokens: int
    samples: int  # per adaptor
    corpus_size: int  # samples averaged into one corpus-level (Ā, R̄) point

    @classmethod
    def for_mode(cls, quick: bool) -> CodeSizes:
        if quick:
            return cls(0.05, 2, 8, 1e-3, 16, 32, 8)
        # 1e-4: the rate pep8_frontier's DPG rows used while it set one by hand.
        return cls(0.01, 60, 32, 1e-4, 64, 512, 32)


@dataclass(frozen=True)
class TypicalFit:
    """Slope of R̄ on Ā over typical corpora, and how close Ā + R̄/β is to log Z − H(q)."""

    kl_coef: float
    corpora: int
    typical: int
    slope: float
    pearson: float
    identity_gap: float  # max |Ā + R̄/β − (log Z − H(q))| over typical corpora
    log_z_minus_entropy: float


def typical_corpora(kl_coef: float, corpus_size: int, corpora: int, epsilon: float,
                    seed: int) -> TypicalFit:
    """Draw iid corpora from q = p*, keep the ε-typical ones, regress R̄ on Ā."""
    target = toy_a_target(kl_coef)
    exact = Exact().fit(target)
    support = exact.samples
    log_q = exact.log_prob(support)
    log_a = support.log_q
    reward = exact.target.factors(support)["r"].value.double()
    entropy = float(-(log_q.exp() * log_q).sum())
    generator = torch.Generator().manual_seed(seed)
    index = torch.multinomial(log_q.exp(), corpora * corpus_size, replacement=True,
                              generator=generator).reshape(corpora, corpus_size)
    surprisal = -log_q[index].mean(-1)
    typical = (surprisal - entropy).abs() <= epsilon
    a_bar, r_bar = log_a[index].mean(-1)[typical], reward[index].mean(-1)[typical]
    centred_a, centred_r = a_bar - a_bar.mean(), r_bar - r_bar.mean()
    slope = float((centred_a * centred_r).sum() / (centred_a**2).sum())
    pearson = float((centred_a * centred_r).sum()
                    / torch.sqrt((centred_a**2).sum() * (centred_r**2).sum()))
    target_value = exact.log_z - entropy
    gap = float((a_bar + r_bar / kl_coef - target_value).abs().max())
    return TypicalFit(kl_coef, corpora, int(typical.sum()), slope, pearson, gap, target_value)


def adaptor_points(kl_coef: float) -> list[dict[str, float | str]]:
    """Exact (Ā, R̄) of the aligned model under each adaptor: Ā = E[log a], R̄ = E[r]."""
    target = toy_a_target(kl_coef)
    exact = Exact().fit(target)
    support = exact.samples
    aligned = PrefixTreeLM.from_law(support, exact.log_prob(support), vocab_size=3)
    reward = target.factors(support)["r"].value.double()
    points = []
    for name, options in ADAPTORS.items():
        law = aligned.adapted(**options).log_prob(support).detach().exp()
        points.append({"adaptor": name, "prior_log_likelihood": float((law * support.log_q).sum()),
                       "reward": float((law * reward).sum())})
    return points


def aligned_code_model(sizes: CodeSizes, quick: bool) -> tuple[CausalLM, CausalLM]:
    """The code prior and a policy aligned to its PEP8 reward by KL-RL (RLOO)."""
    prior = load_prior(quick, sizes.new_tokens)
    engine = KLRL(algorithm="rloo", steps=sizes.policy_steps, batch_size=sizes.policy_batch,
                  learning_rate=sizes.learning_rate, max_grad_norm=1.0,
                  eval_samples=sizes.samples, progress=False)
    return prior, engine.fit(pep8_target(prior, sizes.kl_coef)).policy


def code_adaptor_points(prior: CausalLM, aligned: CausalLM, sizes: CodeSizes) -> list[dict]:
    """Per adaptor: mean prior log-likelihood Ā (nats per sample of ``new_tokens`` tokens) and
    PEP8 reward R̄ of the aligned model's samples, plus the same means over corpora of
    ``corpus_size`` samples."""
    points = []
    for name, options in CODE_ADAPTORS.items():
        samples = aligned.adapted(**options).sample_batch(sizes.samples)  # EOS stays banned
        log_a = prior.log_prob(samples).detach().double()
        reward = scorers.pep8(samples).double()
        corpora = sizes.samples // sizes.corpus_size
        points.append({
            "adaptor": name, "prior_log_likelihood": float(log_a.mean()),
            "reward": float(reward.mean()),
            "corpus_a": log_a[: corpora * sizes.corpus_size].reshape(corpora, -1).mean(-1),
            "corpus_r": reward[: corpora * sizes.corpus_size].reshape(corpora, -1).mean(-1),
        })
    return points


def corpus_trend(points: list[dict]) -> tuple[float, float]:
    """Least-squares slope dR̄/dĀ and Pearson r over every adaptor's corpus-level points."""
    a = torch.cat([p["corpus_a"] for p in points])
    r = torch.cat([p["corpus_r"] for p in points])
    centred_a, centred_r = a - a.mean(), r - r.mean()
    slope = float((centred_a * centred_r).sum() / (centred_a**2).sum())
    pearson = float((centred_a * centred_r).sum()
                    / torch.sqrt((centred_a**2).sum() * (centred_r**2).sum()))
    return slope, pearson


def run(output: Path, quick: bool) -> str:
    output.mkdir(parents=True, exist_ok=True)
    corpora = 4000 if quick else 40000
    fits = [typical_corpora(b, corpus_size=100, corpora=corpora, epsilon=0.01, seed=0)
            for b in KL_COEFS]
    points = adaptor_points(1.0)
    sizes = CodeSizes.for_mode(quick)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        code_points = code_adaptor_points(*aligned_code_model(sizes, quick), sizes)
    slope, pearson = corpus_trend(code_points)
    model = "tiny random GPT-2, quick" if quick else "bundled:code-small"
    return publish(output, "tradeoff", {
        "quick": quick,
        "typical": {"corpus_size": 100, "epsilon": 0.01, "fits": [asdict(f) for f in fits]},
        "adaptors": {"kl_coef": 1.0, "points": points},
        "code": {"model": model, "sizes": asdict(sizes), "points": code_points,
                 "trend": {"slope": slope, "pearson": pearson}},
    }, True, render, _plot_both)[1]


def render(results: dict) -> str:
    """The Markdown tables of a results.json's contents."""
    typical, adaptors, code = results["typical"], results["adaptors"], results["code"]
    sizes = code["sizes"]
    lines = [
        f"## Typical corpora of q = a·e^{{r/β}}/Z (Toy A, N = {typical['corpus_size']} strings "
        f"per corpus, ε = {typical['epsilon']:g})",
        "",
        "| β | corpora | typical | slope dR̄/dĀ | −β | Pearson | max |Ā + R̄/β − (log Z − H)| |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {f['kl_coef']:g} | {f['corpora']} | {f['typical']} | {f['slope']:.4f} | "
              f"{-f['kl_coef']:g} | {f['pearson']:.4f} | {f['identity_gap']:.4f} |"
              for f in typical["fits"]]
    lines += ["", f"## Sampling adaptors on the aligned model (β = {adaptors['kl_coef']:g}), "
              "exact expectations", "",
              "| adaptor | Ā = E[log a] | R̄ = E[r] |", "|---|---|---|"]
    lines += [f"| {p['adaptor']} | {p['prior_log_likelihood']:.4f} | {p['reward']:.4f} |"
              for p in adaptors["points"]]
    lines += ["", f"## Sampling adaptors on the code prior aligned to PEP8 ({code['model']}; "
              f"RLOO, β = {sizes['kl_coef']:g}, {sizes['policy_steps']} steps; "
              f"{sizes['samples']} samples of {sizes['new_tokens']} tokens per adaptor)", "",
              "| adaptor | Ā = mean log a(y) | R̄ = mean PEP8 reward |", "|---|---|---|"]
    lines += [f"| {p['adaptor']} | {p['prior_log_likelihood']:.3f} | {p['reward']:.5f} |"
              for p in code["points"]]
    lines += ["", f"Corpus-level trend ({sizes['corpus_size']} samples per corpus, all adaptors "
              f"pooled): slope dR̄/dĀ = {code['trend']['slope']:.2e} (−β = "
              f"{-sizes['kl_coef']:g}), Pearson {code['trend']['pearson']:.3f}."]
    return "\n".join(lines)


def _plot_both(results: dict, path: Path) -> None:
    """Toy A's adaptors at ``path``, the code model's beside it (``tradeoff_code.png``)."""
    _plot(results["adaptors"]["points"], path,
          "adaptors trade likelihood for reward (Toy A, β = 1)")
    _plot(results["code"]["points"], path.with_stem(f"{path.stem}_code"),
          f"adaptors on the aligned code model ({results['code']['model']})")


def _plot(points: list[dict], path: Path, title: str) -> None:
    from bayesalign.app import plots

    fig, (ax,) = plots.figure(1, width=5.5, height=4.0)
    for p in points:
        ax.scatter(p["prior_log_likelihood"], p["reward"])
        ax.annotate(p["adaptor"], (p["prior_log_likelihood"], p["reward"]), fontsize=7)
    ax.set_xlabel("average prior log-likelihood Ā")
    ax.set_ylabel("average reward R̄")
    ax.set_title(title, fontsize=9)
    plots.save(fig, path)


def main(argv: list[str] | None = None) -> int:
    return experiment_main(run, __doc__.splitlines()[0], "outputs/tradeoff", argv)


if __name__ == "__main__":
    raise SystemExit(main())
