"""Memory and speed per process of the launches `bayesalign pretrain` supports, against DDP.

    python bench/sharding_memory.py --layers 8 --width 1024 --steps 4

Each launch is 2 real processes (gloo, CPU) started by ``accelerate launch`` with a repository
config (``cpu_2proc`` = data parallel, the baseline; ``fsdp``; ``deepspeed`` ZeRO-2, also with the
optimizer offloaded), training the same fresh GPT-2 (``--layers`` × ``--width``, a BPE of about
``--vocab`` tokens trained on standard-library text) through the shared Trainer on the same
random blocks with Adam, no checkpoints. A worker records its resident set after imports (the
baseline) and its peak while training (the Trainer's ``peak_memory_mb``, the busiest process);
the figure is peak − baseline: the model, gradients, optimizer state, activations and
communication buffers. Tokens/s is the median step after the first. The workers pin the CPU
(``CUDA_VISIBLE_DEVICES=""``): the figures are CPU processes' resident sets.

The model state per process that each launch should hold is printed beside it (fp32 weights W,
gradients W, Adam 2W): DDP 4W, FSDP 4W/N (+ one gathered block at a time), ZeRO-2 W + 3W/N.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHES = {  # name: (accelerate config, extra launcher flags)
    "ddp": ("cpu_2proc", []),
    "fsdp": ("fsdp", ["--num_processes=2", "--mixed_precision=no"]),
    "zero2": ("deepspeed", ["--num_processes=2", "--mixed_precision=no"]),
    "zero2-offload": ("deepspeed", ["--num_processes=2", "--mixed_precision=no",
                                    "--offload_optimizer_device=cpu"]),
}


def worker(args: argparse.Namespace) -> None:
    """One process of a launch: train, then (main process) write the figures as JSON."""
    import deepspeed  # noqa: F401  (imported before the baseline in every launch alike)
    import torch

    from bayesalign.models import CausalLM
    from bayesalign.models.tiny import stdlib_tokenizer, tiny_gpt2
    from bayesalign.training import Trainer, TrainingConfig

    torch.set_num_threads(1)
    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    tokenizer = stdlib_tokenizer(args.vocab, max_bytes=300_000)
    model = tiny_gpt2(tokenizer, args.layers, args.width, n_head=8, n_positions=args.block)
    vocab, parameters = len(tokenizer), sum(p.numel() for p in model.parameters())
    policy = CausalLM(model, tokenizer)
    trainer = Trainer(TrainingConfig(steps=args.steps, batch_size=args.batch, learning_rate=1e-4,
                                     optimizer="adam", progress=False),
                      policy, engine="bench", supports_sharding=True)
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        generator = torch.Generator().manual_seed(step * world + rank)
        tokens = torch.randint(vocab, (args.batch, args.block), generator=generator)
        logits = model(input_ids=tokens[:, :-1].to(trainer.device)).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                 tokens[:, 1:].flatten().to(trainer.device))
        return loss, {"tokens": float(tokens[:, 1:].numel())}

    history = trainer.run(step_fn)
    if trainer.accelerator.is_main_process:
        figures = {"parameters": parameters, "vocab": vocab, "baseline_mb": baseline_mb,
                   "peak_mb": history[-1]["peak_memory_mb"],
                   "tokens_per_s": statistics.median(row["tokens_per_s"] for row in history[1:]),
                   "launch": trainer.parallelism["launch"]}
        Path(args.out).write_text(json.dumps(figures))


def launch(name: str, args: argparse.Namespace, out: Path) -> dict:
    config, flags = LAUNCHES[name]
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(ROOT / "configs" / "accelerate" / f"{config}.yaml"), *flags,
               __file__, "--worker", "--out", str(out), *_model_flags(args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-6000:]}")
    return json.loads(out.read_text())


def _model_flags(args: argparse.Namespace) -> list[str]:
    return [f"--{k}={getattr(args, k)}" for k in ("layers", "width", "vocab", "block", "batch",
                                                   "steps")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192, help="BPE size asked for")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="blocks per process per step")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as scratch:
        results = {name: launch(name, args, Path(scratch) / f"{name}.json") for name in LAUNCHES}
    weights_mb = results["ddp"]["parameters"] * 4 / 2**20
    expected = {"ddp": 4, "fsdp": 2, "zero2": 2.5, "zero2-offload": 2.5}  # × W, for N = 2
    print(f"GPT-2 {args.layers}L × {args.width}d, vocabulary {results['ddp']['vocab']}: "
          f"{results['ddp']['parameters'] / 1e6:.1f} M parameters, W = {weights_mb:.0f} MB fp32; "
          f"2 processes × batch {args.batch} × {args.block} tokens, {args.steps} Adam steps")
    print(f"{'launch':<14} {'model state (theory)':>21} {'peak − baseline':>16} {'vs DDP':>7} "
          f"{'tokens/s':>9} {'vs DDP':>7}")
    ddp = results["ddp"]
    for name, figures in results.items():
        used = figures["peak_mb"] - figures["baseline_mb"]
        print(f"{name:<14} {expected[name] * weights_mb:>18.0f} MB {used:>13.0f} MB "
              f"{used / (ddp['peak_mb'] - ddp['baseline_mb']):>7.2f} "
              f"{figures['tokens_per_s']:>9.0f} {figures['tokens_per_s'] / ddp['tokens_per_s']:>7.2f}")


if __name__ == "__main__":
    main()
