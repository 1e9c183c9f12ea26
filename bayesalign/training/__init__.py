"""Infrastructure of the learned engines and pretraining: the one training loop, its checkpoints,
the launch strategies (data parallel, FSDP2, DeepSpeed ZeRO-1/2) and the per-step history.

Sampling engines never import this package: it loads accelerate and torch.distributed.
"""

from .history import history_to_arviz, history_to_csv
from .trainer import StepFn, Trainer, TrainingConfig

__all__ = ["StepFn", "Trainer", "TrainingConfig", "history_to_arviz", "history_to_csv"]
