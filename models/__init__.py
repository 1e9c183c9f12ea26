"""What a target is made of: priors over token sequences, sampling adaptors, scorers."""

from .adaptors import Eta, Temperature, TopK, TopP, Typical, make_adaptors
from .causal_lm import CausalLM
from .prefix_tree import PrefixTreeLM
from .tabular import TabularLM, TabularLogits

__all__ = [
    "CausalLM",
    "Eta",
    "PrefixTreeLM",
    "TabularLM",
    "TabularLogits",
    "Temperature",
    "TopK",
    "TopP",
    "Typical",
    "make_adaptors",
]
