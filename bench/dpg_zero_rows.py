"""Seconds per DPG step on a rare hard constraint: draws with P = 0 skipped against every row run.

    python bench/dpg_zero_rows.py --steps 6 --rounds 3 --threads 1

On ``bundled:code-small`` with the target a·1["return" in the text] (32 tokens, prior rate ≈ 8%,
as ``experiments/real_lm_convergence``'s ``return``), one `DPG` fit of ``--steps`` steps of
``--batch`` draws, at its defaults (forward KL, no baseline, on-policy), is timed as it is and
with every row run through the policy's forward and backward (the baseline: DPG before it
skipped the rows whose loss term is 0). Both fits start from the prior with the same seed, so they
draw the same batches; the first step of each fit is a warm-up, excluded; a fit's figure is the
median of its other steps. Fits alternate for ``--rounds`` rounds; the table gives medians over
rounds, the ratio of the medians and the median of the per-round ratios. At the prior, about 90% of a
batch has P = 0; a trained policy has fewer (30–40% at the end of a 20,000-sample run).
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from unittest import mock

import pyro
import torch
import transformers

import bayesalign as ba
from bayesalign.inference import DPG
from bayesalign.models.causal_lm import CausalLM


def return_target(prior: CausalLM) -> ba.Target:
    @ba.target
    def has_return():
        y = pyro.sample("y", prior)
        ba.constraint("return", torch.tensor(["return" in t for t in y.text]))

    return has_return


def seconds_per_step(target: ba.Target, args: argparse.Namespace, every_row: bool) -> float:
    engine = DPG(steps=args.steps + 1, batch_size=args.batch, eval_samples=args.batch,
                 progress=False, seed=0)
    if every_row:
        with mock.patch.object(DPG, "_rows_to_run", lambda self, batch, drawn_by_policy: None):
            post = engine.fit(target)
    else:
        post = engine.fit(target)
    return statistics.median(row["seconds"] for row in post.history[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps after one warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="fits of each, alternating")
    parser.add_argument("--batch", type=int, default=64, help="draws per step")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is steadier where other jobs share the cores)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    prior = CausalLM.from_pretrained("bundled:code-small", max_new_tokens=32)
    target = return_target(prior)
    print(f"bundled:code-small, a·1[\"return\" in text], 32 tokens; DPG, {args.batch} draws per "
          f"step, median of {args.steps} steps after a warm-up, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    rounds: dict[str, list[float]] = {"every row (baseline)": [], "P = 0 rows skipped": []}
    for r in range(args.rounds):
        order = list(rounds) if r % 2 == 0 else list(rounds)[::-1]
        for name in order:
            rounds[name].append(seconds_per_step(target, args, every_row=name.startswith("every")))
            print(f"round {r}: {name} {rounds[name][-1]:.3f} s/step", flush=True)
    base = rounds["every row (baseline)"]
    print(f"{'method':<24}{'s / step':>10}{'ratio of medians':>18}{'paired ratio':>14}")
    for name, values in rounds.items():
        paired = statistics.median(v / b for v, b in zip(values, base))
        print(f"{name:<24}{statistics.median(values):>10.3f}"
              f"{statistics.median(values) / statistics.median(base):>18.2f}{paired:>14.2f}")


if __name__ == "__main__":
    main()
