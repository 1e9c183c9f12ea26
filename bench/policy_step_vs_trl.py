"""Seconds per policy step: our `DPG` and `KLRL(algorithm="rloo")` against TRL's `RLOOTrainer`.

    python bench/policy_step_vs_trl.py --completions 64 --length 64 --steps 5 --rounds 3 --threads 1

All three train one randomly initialised GPT-2 (4 layers × 256 by default, vocabulary 2048, the
stdlib BPE tokenizer of `bayesalign.models.tiny`) on the same reward, the fraction of whitespace
characters in the decoded completion, with the same KL coefficient (our ``kl_coef`` = TRL's
``beta``). One step draws ``--completions`` samples of up to ``--length`` tokens (EOS may end a
row early, for all three alike) from a one-token context (``<|endoftext|>``), scores them under
the policy and the frozen reference, and takes one optimizer step over all of them. TRL gets one
prompt, ``num_generations = per_device_train_batch_size = --completions``, fp32 and no gradient
checkpointing (TRL's AdamW, our Adam; same learning rate). A step's time covers sampling,
scoring, backward and the optimizer, not TRL's logging between steps; TRL's step also holds a
no-grad policy forward (its "old" log-probs for the clipped ratio) that ours does not need.
The first step of each fit is a warm-up, excluded; a fit's figure is the median of its next
``--steps`` steps. Fits alternate (TRL, DPG, KLRL, then KLRL, DPG, TRL, …) for ``--rounds`` rounds so
that load from other jobs falls on all three alike; the table gives medians over rounds, the ratio of the
medians and the median of the per-round ratios (the two agree when the load stayed steady).
TRL is a benchmark-only dependency (``pip install trl``); it needs the policy as a saved folder,
so the model and tokenizer are written to a temporary directory. On a shared two-core machine
use ``--threads 1``: with two threads and another job busy on one core, torch's small matmuls
slow down ~1000×.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import pyro
import torch
import transformers
import trl
from datasets import Dataset
from trl import RLOOConfig, RLOOTrainer

import bayesalign as ba
from bayesalign.inference import DPG, KLRL
from bayesalign.models.causal_lm import CausalLM
from bayesalign.models.tiny import EOS_TOKEN, stdlib_tokenizer, tiny_gpt2


def whitespace_fraction(text: str) -> float:
    """The shared reward: the fraction of whitespace characters in a completion's text."""
    return sum(c.isspace() for c in text) / max(len(text), 1)


def whitespace_target(prior: CausalLM, kl_coef: float) -> ba.Target:
    @ba.target
    def whitespace(context=None):
        y = pyro.sample("y", prior)
        ba.reward("whitespace", torch.tensor([whitespace_fraction(t) for t in y.text],
                                             dtype=torch.float64), kl_coef=kl_coef)

    return whitespace


def ours_seconds_per_step(engine: DPG | KLRL, target: ba.Target) -> list[float]:
    """Each step's time from the engine's history (first step dropped as a warm-up)."""
    posterior = engine.fit(target)
    return [row["seconds"] for row in posterior.history[1:]]


def trl_seconds_per_step(model_dir: str, args: argparse.Namespace, output_dir: str) -> list[float]:
    """Each `RLOOTrainer` optimizer step's time (on_step_begin → on_step_end), warm-up dropped."""

    class StepTimer(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.started = 0.0
            self.seconds: list[float] = []

        def on_step_begin(self, *_, **__) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.started)

    def whitespace_reward(completions: list[str], **_) -> list[float]:
        return [whitespace_fraction(text) for text in completions]

    steps = args.steps + 1
    config = RLOOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=args.completions,
        num_generations=args.completions,
        gradient_accumulation_steps=1,
        max_completion_length=args.length,
        max_steps=steps,
        learning_rate=1e-5,
        beta=args.kl_coef,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=steps,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    timer = StepTimer()
    trainer = RLOOTrainer(
        model=model_dir,
        reward_funcs=whitespace_reward,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": [EOS_TOKEN] * steps}),
        callbacks=[timer],
    )
    trainer.remove_callback(transformers.PrinterCallback)  # its per-log dicts would fill the table
    trainer.train()
    return timer.seconds[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--completions", type=int, default=64, help="samples per step (one prompt)")
    parser.add_argument("--length", type=int, default=64, help="max new tokens per sample")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="fits of each method, alternating")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--kl-coef", type=float, default=0.05, help="our kl_coef, TRL's beta")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is steadier where other jobs share the cores)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Progress bars, deprecation notes and the final Pareto-k̂ warning are not the benchmark.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    tokenizer = stdlib_tokenizer(args.vocab_size, 4_000_000)
    model = tiny_gpt2(tokenizer, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                      n_positions=args.length + 8).to(device)
    prior = CausalLM(model, tokenizer, max_new_tokens=args.length)
    target = whitespace_target(prior, args.kl_coef)
    shared = {"steps": args.steps + 1, "batch_size": args.completions, "learning_rate": 1e-5,
              "eval_samples": args.completions, "progress": False, "seed": 0}

    params = sum(p.numel() for p in model.parameters())
    print(
        f"GPT-2 {args.n_layer}L×{args.n_embd}d, vocab {len(tokenizer)}, {params / 1e6:.2f} M params; "
        f"{args.completions} completions × ≤{args.length} new tokens per step from one prompt; "
        f"kl_coef = beta = {args.kl_coef}; device {device}, {torch.get_num_threads()} threads; "
        f"median of {args.steps} steps after a warm-up, {args.rounds} rounds (trl {trl.__version__})"
    )
    ours = {"DPG (forward KL)": lambda: DPG(**shared),
            "KLRL rloo": lambda: KLRL(algorithm="rloo", **shared)}
    rounds: dict[str, list[float]] = {"TRL RLOOTrainer": [], **{name: [] for name in ours}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = f"{tmp}/policy"
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        fits = {"TRL RLOOTrainer": lambda r: trl_seconds_per_step(model_dir, args, f"{tmp}/trl-{r}"),
                **{name: (lambda r, e=engine: ours_seconds_per_step(e(), target))
                   for name, engine in ours.items()}}
        for r in range(args.rounds):
            # Odd rounds run in reverse order, so a load that drifts during the run favours
            # neither side.
            for name in list(fits) if r % 2 == 0 else list(fits)[::-1]:
                rounds[name].append(statistics.median(fits[name](r)))
                print(f"round {r}: {name} {rounds[name][-1]:.3f} s/step", flush=True)
    report(rounds, "TRL RLOOTrainer")


def report(rounds: dict[str, list[float]], baseline: str) -> None:
    """Each method's median s/step over rounds, its range, and its ratio to ``baseline``."""
    base = statistics.median(rounds[baseline])
    print(f"{'method':<22}{'s / step':>10}{'min':>9}{'max':>9}{'ratio of medians':>18}"
          f"{'paired ratio':>14}   (to {baseline}, {len(rounds[baseline])} rounds)")
    for name, values in rounds.items():
        paired = statistics.median(v / b for v, b in zip(values, rounds[baseline]))
        print(f"{name:<22}{statistics.median(values):>10.3f}{min(values):>9.3f}"
              f"{max(values):>9.3f}{statistics.median(values) / base:>18.2f}{paired:>14.2f}")


if __name__ == "__main__":
    main()
