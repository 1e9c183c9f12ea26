"""Seconds per DPG step and peak memory on `bundled:code-small`: a LoRA policy against the full
fine-tuned copy (the default), each in its own process so peak RSS is that run's alone.

    python bench/lora_policy_step.py --batch-size 64 --length 64 --steps 6 --threads 1

Both fit the same pointwise target (the text contains "return", SPEC §1.2) with DPG, Adam and
the same batch, length and seed; the full run trains a deep copy of the prior (two copies of
the base weights plus Adam's two moments over all of them), the LoRA run trains rank-``--rank``
adapters on the prior's own model. The first step is a warm-up, excluded; the figure is the
mean of the others; ``--rounds`` runs of each, in ABBA order, are averaged. Peak memory is the
process' ``ru_maxrss`` (on CPU) or torch's peak allocation (on a GPU), read before the fit
(model loaded) and after it. Prints every run, the means and the ratios LoRA / full.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys


def run_one(args: argparse.Namespace) -> dict:
    import pyro
    import torch

    import bayesalign as ba
    from bayesalign.inference import DPG
    from bayesalign.models import CausalLM
    from bayesalign.models.lora_options import LoraOptions

    torch.set_num_threads(args.threads)
    prior = CausalLM.from_pretrained("bundled:code-small", max_new_tokens=args.length)
    if torch.cuda.is_available():
        prior.model.cuda()

    @ba.target
    def has_return():
        y = pyro.sample("y", prior)
        ba.constraint("return", torch.tensor(["return" in text for text in y.text]))

    def peak_mb() -> float:
        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10

    before = peak_mb()
    base_parameters = sum(p.numel() for p in prior.model.parameters())
    lora = LoraOptions(rank=args.rank) if args.mode == "lora" else None
    post = DPG(steps=args.steps, batch_size=args.batch_size, learning_rate=1e-4, eval_samples=64,
               progress=False, seed=0, lora=lora, divergence_action="off").fit(has_return)
    trainable = sum(p.numel() for p in post.policy.module.parameters() if p.requires_grad)
    return {"mode": args.mode, "seconds_per_step": statistics.mean(
                r["seconds"] for r in post.history[1:]),
            "peak_mb_before_fit": before, "peak_mb": peak_mb(), "trainable_parameters": trainable,
            "base_parameters": base_parameters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mode", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_one(args)))
        return
    runs: dict[str, list[dict]] = {"full": [], "lora": []}
    for round_index in range(args.rounds):  # ABBA order, so a change in load hits both alike
        for mode in ("full", "lora") if round_index % 2 == 0 else ("lora", "full"):
            command = [sys.executable, __file__, "--mode", mode] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "mode"]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(runs[mode][-1]))
    mean = {mode: {key: statistics.mean(r[key] for r in rows) for key in rows[0] if key != "mode"}
            for mode, rows in runs.items()}
    full, lora = mean["full"], mean["lora"]
    ratio = lora["seconds_per_step"] / full["seconds_per_step"]
    grown = {m: mean[m]["peak_mb"] - mean[m]["peak_mb_before_fit"] for m in mean}
    print(f"means over {args.rounds} runs each:")
    print(f"seconds per DPG step: full {full['seconds_per_step']:.3f}, LoRA "
          f"{lora['seconds_per_step']:.3f} (LoRA / full {ratio:.2f})")
    print(f"peak memory: full {full['peak_mb']:.0f} MB, LoRA {lora['peak_mb']:.0f} MB "
          f"(LoRA / full {lora['peak_mb'] / full['peak_mb']:.2f}); grown during the fit: full "
          f"{grown['full']:.0f} MB, LoRA {grown['lora']:.0f} MB")
    print(f"trainable parameters: full {full['trainable_parameters']:,.0f}, LoRA "
          f"{lora['trainable_parameters']:,.0f} (base {full['base_parameters']:,.0f})")

if __name__ == "__main__":
    main()
