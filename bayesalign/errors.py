"""Library exceptions: each message names the site, sample index or option at fault."""


class BayesAlignError(Exception):
    """Base class of every error bayesalign raises on purpose."""


class ConfigError(BayesAlignError, ValueError):
    """An engine or model option is out of its valid range."""


class InvalidDistributionError(BayesAlignError, ValueError):
    """A probability table or prior is malformed (negative, not normalised, wrong shape)."""


class InvalidSequencesError(BayesAlignError, ValueError):
    """A `Sequences` batch is malformed: tokens not [batch, length], a mask of another shape."""


class InvalidTargetError(BayesAlignError, ValueError):
    """A target model is malformed: no prior site, two prior sites, bad factor shapes."""


class InvalidFactorError(BayesAlignError, ValueError):
    """A factor site returned NaN or +inf for some sample."""


class VocabularyMismatchError(BayesAlignError, ValueError):
    """A proposal and the prior do not share one token vocabulary."""


class EmptySupportError(BayesAlignError, RuntimeError):
    """No sample had non-zero target mass (e.g. every sample violated a hard constraint)."""


class NotEnumerableError(BayesAlignError, TypeError):
    """An exact computation was asked of a prior whose support cannot be enumerated."""


class ScorerError(BayesAlignError, RuntimeError):
    """A scorer could not score a sample: bad input, an exception in its function, a dead worker."""


class ScorerTimeoutError(ScorerError, TimeoutError):
    """A sample took longer than the scorer's ``timeout`` and ``on_timeout='raise'``."""


class NoLogProbError(BayesAlignError, TypeError):
    """A log-probability was asked of a prior that can only be sampled (a `Corpus`)."""


class TrainingError(BayesAlignError, RuntimeError):
    """Training stopped (NaN loss, no usable weights); the last checkpoint is kept."""


class DivergenceWarning(UserWarning):
    """A policy engine's training looks like it diverges (ESS collapse, KL(π‖a) runaway, log Ẑ
    drift); the message names the step and the signal."""


def require_positive(name: str, value: float) -> None:
    """Refuse an option that must be > 0, naming it."""
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")
