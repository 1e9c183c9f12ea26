"""Model sizes for pretraining from scratch (the learning-rate schedule is the Trainer's:
`bayesalign.training.trainer.learning_rate_at`).

Shared by the `Pretraining` engine and ``bayesalign pretrain`` (which is that engine), so a
preset means one model everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass


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

