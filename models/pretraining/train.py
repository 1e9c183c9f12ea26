"""``pretrain``: fit a GPT-2 prior to a corpus by next-token maximum likelihood.

In DESIGN.md's terms the corpus is the prior and pretraining is amortised inference for it:
maximum likelihood minimises KL(corpus ‖ model). The loop is the policy engines' ``Trainer``
(accelerate device and precision, checkpoints written then renamed, bit-identical resume) fed
one batch of packed blocks per step; the batch of step ``t`` is a function of (seed, t), so
resuming needs no data-loader state. Across processes the main one tokenises the corpus once and
each process reads its slice of every global batch from the shared token file (neither
``split_dataset_by_node`` nor rank-0 dispatch: the batch does not depend on the process count).
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState
from tqdm.auto import tqdm

from bayesalign.errors import ConfigError
from bayesalign.training import Trainer, TrainingConfig
from bayesalign.training.checkpoints import describe_differences
from bayesalign.training.history import history_to_csv

from ..causal_lm import CausalLM
from ..tiny import tiny_gpt2
from .card import perplexity, sample_report, write_card
from .corpus import Corpus, documents, find_corpus, split_files
from .tokens import TokenData, prepare_tokens


@dataclass(frozen=True)
class Preset:
    """A model size and the batch, block and learning rate that suit it."""

    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    block_size: int
    batch_size: int
    learning_rate: float
    warmup_steps: int


PRESETS = {
    # Seconds per hundred steps on 2 cores: for tests and demos.
    "tiny": Preset(512, 2, 64, 2, block_size=128, batch_size=16, learning_rate=3e-3, warmup_steps=10),
    # 3.75 M parameters, 15 MB of float32 safetensors: the bundled code prior.
    "code-small": Preset(2048, 4, 256, 4, block_size=256, batch_size=16, learning_rate=1e-3,
                         warmup_steps=100),
}
_FROM_PRESET = ("batch_size", "block_size", "learning_rate", "warmup_steps")
# Settings a resumed run must share with the run that wrote its checkpoints and tokens.
_IDENTITY = ("preset", "seed", *_FROM_PRESET, "lr_decay_steps", "max_grad_norm",
             "heldout_fraction", "segment_python")


@dataclass
class PretrainConfig:
    """Every setting of a pretraining run, one line each; ``None`` takes the preset's value."""

    output: str | Path  # folder for the model, its card, and training/ (checkpoints, tokens)
    corpus: str | Path | None = None  # files, a folder, or a save_to_disk dataset; None: stdlib
    preset: str = "tiny"  # model size and default batch/block/learning rate (see PRESETS)
    max_steps: int = 300  # optimizer steps in all; a resumed run continues up to this
    seed: int = 0  # model init, held-out split, block order and samples
    batch_size: int | None = None  # blocks per micro-batch and process
    gradient_accumulation_steps: int = 1  # micro-batches per step: global batch = this × batch × processes
    mixed_precision: str | None = None  # "no", "bf16" (GPU), "fp16"; None: accelerate launch's, else no
    block_size: int | None = None  # tokens per block, which is also the model's context length
    learning_rate: float | None = None  # Adam's peak learning rate
    warmup_steps: int | None = None  # linear warm-up from 0 to learning_rate
    lr_decay_steps: int | None = None  # cosine decay to 10% by this step; None: constant
    max_grad_norm: float = 1.0  # global gradient-norm clip
    heldout_fraction: float = 0.05  # fraction of files (or records) held out
    segment_python: bool = True  # cut .py files into top-level definitions separated by EOS
    checkpoint_every: int = 100  # steps between checkpoints (one is always written at the end)
    eval_every: int = 50  # steps between held-out evaluations (one also runs at the end)
    eval_blocks: int = 64  # held-out blocks per evaluation
    num_samples: int = 64  # unconditional samples drawn to measure the parse rate
    sample_tokens: int | None = None  # tokens per sample at most; None: block_size
    resume: bool = True  # continue from checkpoints in output; False: discard them first
    progress: bool = True  # a tqdm bar in tokens/s and one line per held-out evaluation
    command: str | None = None  # recorded in the card; None: this process's command line

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for name in _FROM_PRESET:
            if getattr(self, name) is None:
                setattr(self, name, getattr(PRESETS[self.preset], name))
        if self.sample_tokens is None:
            self.sample_tokens = self.block_size
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "block_size",
                     "learning_rate", "max_grad_norm", "eval_every", "eval_blocks", "num_samples",
                     "sample_tokens"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.warmup_steps < 0 or self.checkpoint_every < 0:
            raise ConfigError("warmup_steps and checkpoint_every must be >= 0")
        if self.lr_decay_steps is not None and self.lr_decay_steps <= self.warmup_steps:
            raise ConfigError(f"lr_decay_steps ({self.lr_decay_steps}) must exceed "
                              f"warmup_steps ({self.warmup_steps})")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.sample_tokens > self.block_size:
            raise ConfigError(f"sample_tokens ({self.sample_tokens}) cannot exceed the model's "
                              f"context, block_size ({self.block_size})")


def learning_rate_at(step: int, config: PretrainConfig) -> float:
    """Linear warm-up, then constant (a run can be extended) or cosine decay to 10%."""
    peak = config.learning_rate
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.lr_decay_steps is None:
        return peak
    progress = min(1.0, (step - config.warmup_steps) / (config.lr_decay_steps - config.warmup_steps))
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def next_token_loss(model: torch.nn.Module, blocks: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats/token) of each block's tokens 1…B given the ones before them."""
    inputs = blocks[:, :-1]
    # An explicit all-ones mask: packed blocks have no padding (EOS is also the pad token).
    logits = model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), blocks[:, 1:].flatten())


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int,
                 device: torch.device) -> float:
    """``next_token_loss`` over a fixed set of held-out blocks, in batches."""
    total = sum(float(next_token_loss(model, chunk.to(device))) * len(chunk)
                for chunk in blocks.split(batch_size))
    return total / len(blocks)


def pretrain(config: PretrainConfig) -> Path:
    """Pretrain a GPT-2 on ``config.corpus``; write a ``from_pretrained`` folder and its card.

    Resumes from ``output/training/checkpoints`` when they exist (unless ``resume=False``) and
    raises ``ConfigError`` if they were written with other settings. Returns ``config.output``.
    """
    output = Path(config.output)
    work = output / "training"
    corpus = find_corpus(config.corpus)
    identity = _identity(config, corpus)
    state = PartialState(cpu=not torch.cuda.is_available())
    if config.resume:
        _check_resumable(work, identity)  # on every process, so all of them raise
    state.wait_for_everyone()
    if state.is_main_process:
        _claim(work, identity, config.resume)
    state.wait_for_everyone()
    with state.main_process_first():
        data = prepare_tokens(
            work / "data",
            lambda part: documents(corpus, part, config.seed, config.heldout_fraction,
                                   config.segment_python),
            PRESETS[config.preset].vocab_size, corpus.name,
        )
    preset = PRESETS[config.preset]
    model = tiny_gpt2(data.tokenizer, preset.n_layer, preset.n_embd, preset.n_head,
                      n_positions=config.block_size, seed=config.seed)
    prior = CausalLM(model, data.tokenizer, max_new_tokens=config.sample_tokens)
    trainer = Trainer(
        TrainingConfig(steps=config.max_steps, batch_size=config.batch_size,
                       learning_rate=config.learning_rate, optimizer="adam",
                       gradient_accumulation_steps=config.gradient_accumulation_steps,
                       mixed_precision=config.mixed_precision, max_grad_norm=config.max_grad_norm,
                       checkpoint_dir=str(work / "checkpoints"),
                       checkpoint_every=config.checkpoint_every, seed=config.seed, progress=False),
        prior, engine="pretrain", supports_sharding=True,
    )
    sharding = trainer.parallelism
    device, rank = trainer.device, trainer.accelerator.process_index
    world = trainer.accelerator.num_processes
    train_blocks = data.blocks("train", config.block_size, config.seed)
    eval_set = data.blocks("heldout", config.block_size).evenly_spaced(config.eval_blocks)
    micro_batches = config.gradient_accumulation_steps * world  # per optimizer step, all processes
    progress = _Progress(config, tokens_per_step=micro_batches * config.batch_size * config.block_size,
                         main=trainer.accelerator.is_main_process)

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        metrics = {"learning_rate": learning_rate_at(step, config)}
        for group in trainer.optimizer.param_groups:
            group["lr"] = metrics["learning_rate"]
        micro = trainer.micro_step
        if step % config.eval_every == 0 and micro == 0:  # the weights before this step's update
            metrics["heldout_loss"] = heldout_loss(model, eval_set, config.batch_size, device)
        # Step t reads global blocks [t·G, (t+1)·G), G = micro_batches × batch_size; each
        # (micro-batch, process) pair takes its own slice, so any split of G reads the same blocks.
        first = ((step * config.gradient_accumulation_steps + micro) * world + rank) * config.batch_size
        loss = next_token_loss(model, train_blocks.batch(first, config.batch_size).to(device))
        if micro == 0:
            progress.step(step, float(loss.detach()), metrics.get("heldout_loss"))
        return loss, metrics

    history = trainer.run(step_fn)
    model = trainer.module  # unsharded again after an FSDP run
    prior = CausalLM(model, data.tokenizer, max_new_tokens=config.sample_tokens)
    progress.close()
    if trainer.start_step > config.max_steps:
        raise ConfigError(f"{work / 'checkpoints'} holds step {trainer.start_step}, past "
                          f"--max-steps {config.max_steps}; raise it or use another --output")
    final_loss = heldout_loss(model, eval_set, config.batch_size, device)
    if trainer.accelerator.is_main_process:
        model.save_pretrained(str(output))
        (output / "model.safetensors").chmod(0o644)  # written 0600, unreadable once installed
        data.tokenizer.save_pretrained(str(output))
        history_to_csv(history, work / "history.csv")
        curve = [[row["step"], row["heldout_loss"]] for row in history if "heldout_loss" in row]
        curve.append([config.max_steps, final_loss])
        card = _card(config, corpus, data, prior, curve, history, world, str(device))
        card["sharding"] = sharding
        write_card(output, card)
        progress.line(f"wrote {output}: held-out loss {final_loss:.3f} "
                      f"(perplexity {card['heldout_perplexity']:.1f}), "
                      f"{card['parse_fraction']:.0%} of samples parse")
    trainer.accelerator.wait_for_everyone()
    return output


def _identity(config: PretrainConfig, corpus: Corpus) -> dict:
    preset = PRESETS[config.preset]
    model = {f.name: getattr(preset, f.name) for f in fields(preset) if f.name not in _FROM_PRESET}
    return json.loads(json.dumps(
        {**corpus.fingerprint(), **model, **{k: getattr(config, k) for k in _IDENTITY}}))


def _check_resumable(work: Path, identity: dict) -> None:
    """Refuse to resume checkpoints that another configuration wrote."""
    record = work / "pretrain.json"
    if not record.exists() or not any((work / "checkpoints").glob("checkpoint-*")):
        return
    previous = json.loads(record.read_text())
    if previous != identity:
        raise ConfigError(
            f"{work}: its checkpoints come from another configuration "
            f"({describe_differences(previous, identity)}); resume with the same settings, pass "
            "--no-resume to discard them, or choose another --output"
        )


def _claim(work: Path, identity: dict, resume: bool) -> None:
    """Make ``work`` this configuration's, discarding what another one (or ``resume=False``) left."""
    record = work / "pretrain.json"
    if not resume or (record.exists() and json.loads(record.read_text()) != identity):
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(identity, indent=1))


def _card(config: PretrainConfig, corpus: Corpus, data: TokenData, prior: CausalLM,
          curve: list[list[float]], history: list[dict], world: int, device: str) -> dict:
    counts, model = data.counts, prior.model
    if corpus.split_unit == "file":
        split = split_files(corpus.files, config.seed, config.heldout_fraction)
        units = {part: len(split[part]) for part in ("train", "heldout")}
    else:
        units = {part: counts[part]["documents"] for part in ("train", "heldout")}
    tokens_seen = (config.max_steps * config.gradient_accumulation_steps * world
                   * config.batch_size * config.block_size)
    output = Path(config.output)
    return {
        "model": {"architecture": type(model).__name__, "preset": config.preset,
                  "n_layer": model.config.n_layer, "n_embd": model.config.n_embd,
                  "n_head": model.config.n_head, "vocab_size": len(data.tokenizer),
                  "n_positions": model.config.n_positions,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "safetensors_bytes": (output / "model.safetensors").stat().st_size},
        "corpus": corpus.name,
        "split": {"unit": corpus.split_unit, **units, "seed": config.seed,
                  "heldout_fraction": config.heldout_fraction},
        "documents": {part: counts[part]["documents"] for part in ("train", "heldout")},
        "tokens": {part: counts[part]["tokens"] for part in ("train", "heldout")},
        "steps": config.max_steps,
        "tokens_seen": tokens_seen,
        "epochs": tokens_seen / counts["train"]["tokens"],
        "heldout_loss": curve[-1][1],
        "heldout_perplexity": perplexity(curve[-1][1]),
        "heldout_loss_initial": curve[0][1],
        "heldout_curve": curve,
        **sample_report(prior, config.num_samples, config.seed),
        "training_wall_time_s": sum(row["seconds"] for row in history),
        "device": device,
        "processes": world,
        "command": config.command or shlex.join(sys.argv),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in ("bayesalign", "torch", "transformers", "tokenizers", "datasets", "accelerate"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


class _Progress:
    """A tqdm bar counting tokens (its rate is tokens/s) and a line per held-out evaluation."""

    def __init__(self, config: PretrainConfig, tokens_per_step: int, main: bool) -> None:
        self.enabled = config.progress and main  # one bar, not one per process
        self.total = config.max_steps * tokens_per_step
        self.tokens_per_step = tokens_per_step
        self.bar: tqdm | None = None
        self.first_step = 0
        self.started = time.perf_counter()

    def step(self, step: int, loss: float, heldout: float | None) -> None:
        if not self.enabled:
            return
        if self.bar is None:  # created at the first step run, which a resume moves on
            self.bar = tqdm(total=self.total, initial=step * self.tokens_per_step, unit="tok",
                            unit_scale=True, desc="pretrain", dynamic_ncols=True,
                            disable=None)  # None: no bar when stderr is not a terminal
            self.first_step, self.started = step, time.perf_counter()
        self.bar.update(self.tokens_per_step)
        self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if heldout is not None:
            elapsed = time.perf_counter() - self.started
            rate = (step - self.first_step) * self.tokens_per_step / elapsed if step > self.first_step else 0
            self.line(f"step {step:>6}  tokens {step * self.tokens_per_step:>11,}  "
                      f"train loss {loss:.3f}  held-out loss {heldout:.3f}  {rate:,.0f} tok/s")

    def line(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
