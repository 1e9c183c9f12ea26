"""Sampling throughput: `CausalLM.sample_batch` against transformers' `model.generate`.

Both sample ancestrally (no adaptor) from one randomly initialised GPT-2 (4 layers × 256,
vocabulary 2048, the stdlib BPE tokenizer of `bayesalign.models.tiny`) with a KV cache, from the
same one-token context, for exactly ``--length`` new tokens: `generate` gets
``min_new_tokens = max_new_tokens`` (EOS suppressed) and our loop runs every step because some
row is always unfinished (checked). Our loop also accumulates each sample's exact log q, which
`generate` does not. Runs alternate (ours, generate, ours, …) after one warm-up each, so load
from other jobs falls on both alike; prints each one's median tokens/s over ``--repeats``, the
ratio of the medians and the median of the per-round ratios ours / generate.

    python bench/sampling_throughput.py --batch 256 --length 64 --repeats 7 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import transformers

from bayesalign.models.causal_lm import CausalLM
from bayesalign.models.tiny import stdlib_tokenizer, tiny_gpt2


def tokens_per_second(runs: dict[str, Callable[[], int]], repeats: int) -> dict[str, list[float]]:
    """Each run's throughput in each of ``repeats`` rounds, after one warm-up each, the runs
    alternating within a round."""
    for run in runs.values():
        run()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            tokens = run()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            rates[name].append(tokens / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=64, help="new tokens per sample")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is steadier where other jobs share the cores)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # generate's padding warning does not apply: one real start token per row.
    transformers.logging.set_verbosity_error()

    tokenizer = stdlib_tokenizer(args.vocab_size, 4_000_000)
    model = tiny_gpt2(tokenizer, n_layer=4, n_embd=256, n_head=4, n_positions=args.length + 8)
    model = model.to(args.device)
    prior = CausalLM(model, tokenizer, max_new_tokens=args.length)

    def ours() -> int:
        samples = prior.sample_batch(args.batch)
        assert samples.tokens.shape[1] == args.length, "all rows ended early; raise --batch"
        return samples.tokens.numel()

    start = torch.full((args.batch, 1), tokenizer.eos_token_id, device=args.device)

    @torch.no_grad()
    def generate() -> int:
        out = model.generate(
            start,
            attention_mask=torch.ones_like(start),
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            max_new_tokens=args.length,
            min_new_tokens=args.length,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return out[:, 1:].numel()

    params = sum(p.numel() for p in model.parameters())
    print(
        f"GPT-2 4L×256d, vocab {len(tokenizer)}, {params / 1e6:.2f} M params, "
        f"batch {args.batch} × {args.length} new tokens, device {args.device}, "
        f"{torch.get_num_threads()} threads, medians of {args.repeats} rounds after a warm-up"
    )
    torch.manual_seed(0)
    rates = tokens_per_second({"ours": ours, "generate": generate}, args.repeats)
    ours_rate, generate_rate = (statistics.median(rates[name]) for name in ("ours", "generate"))
    paired = statistics.median(o / g for o, g in zip(rates["ours"], rates["generate"]))
    print(f"CausalLM.sample_batch : {ours_rate:10.0f} tokens/s (with exact log q), "
          f"range {min(rates['ours']):.0f}–{max(rates['ours']):.0f}")
    print(f"model.generate        : {generate_rate:10.0f} tokens/s, "
          f"range {min(rates['generate']):.0f}–{max(rates['generate']):.0f}")
    print(f"ours / generate       : {ours_rate / generate_rate:10.2f} (ratio of medians), "
          f"{paired:.2f} (median of per-round ratios)")


if __name__ == "__main__":
    main()
