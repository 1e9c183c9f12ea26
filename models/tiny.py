"""Tiny priors built offline: a BPE tokenizer trained on Python's stdlib and a small GPT-2.

Tests and demos need a real ``CausalLM`` without a network; a 2-layer GPT-2 over a 512-token
vocabulary samples 256×64 tokens in about a second on two CPU cores (ENVIRONMENT.md).
"""

from __future__ import annotations

import random
import sysconfig
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from bayesalign.errors import ConfigError
from bayesalign.seeding import seeded

from .causal_lm import CausalLM
from .corpus_source import stdlib_files

EOS_TOKEN = "<|endoftext|>"
_BYTE_ALPHABET = 256


def stdlib_texts(max_bytes: int = 1_000_000) -> list[str]:
    """Python standard library sources (tests excluded), up to ``max_bytes`` of UTF-8.

    Files are taken in a fixed pseudo-random order (seed 0) so that a small budget still
    covers many modules, and the result is the same on every run of one Python install.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(path.relative_to(root)) for path in stdlib_files())
    random.Random(0).shuffle(files)
    texts, total = [], 0
    for name in files:
        text = (root / name).read_text(encoding="utf-8", errors="replace")
        size = len(text.encode("utf-8"))
        if total + size > max_bytes:
            continue
        texts.append(text)
        total += size
    return texts


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE (every string encodes) whose ``<|endoftext|>`` is EOS, BOS and pad."""
    if vocab_size <= _BYTE_ALPHABET + 1:
        raise ConfigError(
            f"vocab_size must exceed {_BYTE_ALPHABET + 1} (256 bytes + EOS), got {vocab_size}"
        )
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


@lru_cache(maxsize=8)
def stdlib_tokenizer(vocab_size: int = 512, max_bytes: int = 1_000_000) -> PreTrainedTokenizerFast:
    """``train_tokenizer`` on ``stdlib_texts``, trained once per process (tests share it)."""
    return train_tokenizer(stdlib_texts(max_bytes), vocab_size)


def tiny_gpt2(
    tokenizer: PreTrainedTokenizerFast,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    n_positions: int = 256,
    seed: int = 0,
    initializer_range: float = 0.02,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 (seeded, no dropout, eval mode) sized to ``tokenizer``.

    Dropout is off so sampling and scoring see the same function in train and eval mode;
    a larger ``initializer_range`` gives peakier (less uniform) next-token distributions.
    """
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=initializer_range,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    with seeded(seed):
        model = GPT2LMHeadModel(config)
    return model.eval()


def tiny_causal_lm(
    seed: int = 0,
    *,
    vocab_size: int = 512,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    n_positions: int = 256,
    initializer_range: float = 0.02,
    **kw,
) -> CausalLM:
    """A ``CausalLM`` over a tiny random GPT-2 and the cached stdlib tokenizer; ``kw`` go to
    ``CausalLM`` (``max_new_tokens``, ``adaptors``, ``prompt``)."""
    tokenizer = stdlib_tokenizer(vocab_size)
    model = tiny_gpt2(tokenizer, n_layer, n_embd, n_head, n_positions, seed, initializer_range)
    return CausalLM(model, tokenizer, **kw)
