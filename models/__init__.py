"""What a target is made of: priors over token sequences, sampling adaptors, scorers."""

from .adaptors import Eta, Temperature, TopK, TopP, Typical, make_adaptors
from .tabular import TabularLM, TabularLogits

__all__ = [
    "Eta",
    "TabularLM",
    "TabularLogits",
    "Temperature",
    "TopK",
    "TopP",
    "Typical",
    "make_adaptors",
]
