"""Prior pretraining's model-side pieces: presets (model sizes), token files and their blocks,
and the model card. The training itself is the `Pretraining` engine (``bayesalign.inference``):
``bayesalign pretrain`` runs it with ``objective="mle"`` on a `Corpus` target without factors.
"""

from ..corpus_source import copy_stdlib_slice, find_corpus, python_segments, stdlib_files
from .presets import PRESETS, Preset
from .tokens import Blocks

__all__ = [
    "PRESETS",
    "Blocks",
    "Preset",
    "copy_stdlib_slice",
    "find_corpus",
    "python_segments",
    "stdlib_files",
]
