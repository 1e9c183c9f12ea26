"""What a target is made of: priors over token sequences, sampling adaptors, scorers."""

from .adaptors import Eta, Temperature, TopK, TopP, Typical, make_adaptors
from .causal_lm import CausalLM
from .comparisons import Comparisons, build_comparisons
from .corpus_prior import Corpus
from .preference import PreferenceModel, pairwise_accuracy, pmp, train_preference_model
from .prefix_tree import PrefixTreeLM
from .prompted import Prompted
from .reward_model import SequenceClassifierReward
from .scorers import compiles, parses, pep8, pep8_violations, pii, pii_detections
from .scoring import PerCharacterPenalty, Scorer
from .tabular import TabularLM, TabularLogits

__all__ = [
    "Comparisons",
    "Corpus",
    "PreferenceModel",
    "build_comparisons",
    "pairwise_accuracy",
    "pmp",
    "train_preference_model",
    "PerCharacterPenalty",
    "Scorer",
    "SequenceClassifierReward",
    "compiles",
    "parses",
    "pep8",
    "pep8_violations",
    "pii",
    "pii_detections",
    "CausalLM",
    "Eta",
    "PrefixTreeLM",
    "Prompted",
    "TabularLM",
    "TabularLogits",
    "Temperature",
    "TopK",
    "TopP",
    "Typical",
    "make_adaptors",
]
