"""Preference models (Askell et al. 2021, SPEC §7): comparison data, a scalar-head PM on a
transformers backbone, its three training objectives (ranked, binary, imitation) and PMP.

A PM is a scorer: ``rm(y)`` returns one float64 score per row, so it enters a target as a factor
site, ``pyro.factor("pm", rm(y) / kl_coef)`` (SPEC §1.1), or through LSC,
``ba.log_sigmoid_centered(rm(y), ref)`` (SPEC §6). Like every scorer it decodes the text and
re-tokenises it with its own tokenizer (DESIGN.md, "Conventions").
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bayesalign.errors import ConfigError
from bayesalign.seeding import seeded
from bayesalign.sequences import Sequences, mask_through_eos

from .causal_lm import CausalLM
from .comparisons import Comparisons, Contexts, Texts, texts_and_contexts
from .reward_model import save_preference_model

OBJECTIVES = ("ranked", "binary", "imitation")
# What a model trained with each objective compares pairs by (SPEC §7).
SCORING = {"ranked": "reward", "binary": "reward", "imitation": "log_likelihood"}
NORMALISATIONS = ("total", "per_token")
# build_comparisons lists every pair of up to this many pairs (~1400 texts) and samples beyond.
class PreferenceModel:
    """A reward ``r(x, y)``: a linear head on the backbone's hidden state at the last real token.

    ``backbone`` is any transformers model (``AutoModel`` or ``AutoModelForCausalLM``; the head
    reads ``backbone.base_model``). Each row is tokenised as context + text + EOS, padded on
    ``padding_side``; positions count real tokens only and the read-out token is found from the
    attention mask, so left and right padding give the same reward. ``scoring`` says what pairs
    are compared by: the head's ``"reward"``, or, for imitation learning, the backbone's sequence
    ``"log_likelihood"`` (its LM head), ``normalise``d in ``"total"`` or ``"per_token"`` (SPEC §7).
    Training with an objective sets ``scoring`` to match it. ``rm(y)`` is ``rm.score(y)``.
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        scoring: str = "reward",
        normalise: str = "total",
        padding_side: str = "right",
        max_length: int | None = None,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        if padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if batch_size < 1:
            raise ConfigError(f"PreferenceModel batch_size must be >= 1, got {batch_size}")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.normalise = normalise
        self.padding_side = padding_side
        self.batch_size = batch_size
        self.max_length = max_length or getattr(backbone.config, "max_position_embeddings", None)
        eos = tokenizer.eos_token_id
        self.eos_token_id = eos
        # Pads are never read: the attention mask and positions skip them.
        self.pad_token_id = next(t for t in (tokenizer.pad_token_id, eos, 0) if t is not None)
        parameter = next(backbone.parameters())
        with seeded(seed):
            head = torch.nn.Linear(backbone.config.hidden_size, 1)
            torch.nn.init.normal_(head.weight, std=0.02)
            torch.nn.init.zeros_(head.bias)
        self.head = head.to(device=parameter.device, dtype=parameter.dtype)
        self.module = torch.nn.ModuleDict({"backbone": backbone, "head": self.head})
        self.scoring = scoring
        self._check_scoring()

    @classmethod
    def from_causal_lm(cls, lm: CausalLM, **kw) -> PreferenceModel:
        """A PM initialised at a prior's weights (copied), as RLHF initialises its PM from the LM."""
        return cls(copy.deepcopy(lm.model), lm.tokenizer, **kw)

    def clone(self) -> PreferenceModel:
        """An independent copy of the weights (backbone and head) sharing the tokenizer."""
        new = copy.copy(self)
        new.backbone, new.head = copy.deepcopy(self.backbone), copy.deepcopy(self.head)
        new.module = torch.nn.ModuleDict({"backbone": new.backbone, "head": new.head})
        return new

    def save_pretrained(self, path: str | Path) -> None:
        """Write this PM as a sequence-classifier folder, so that it is a reward by path:
        ``SequenceClassifierReward.from_pretrained(path)`` scores as ``self.score`` does."""
        save_preference_model(self, path)

    def _check_scoring(self) -> None:
        if self.scoring not in ("reward", "log_likelihood"):
            raise ConfigError(f"scoring must be 'reward' or 'log_likelihood', got {self.scoring!r}")
        if self.normalise not in NORMALISATIONS:
            raise ConfigError(f"normalise must be 'total' or 'per_token', got {self.normalise!r}")
        if self.scoring == "log_likelihood" and self.backbone.get_output_embeddings() is None:
            raise ConfigError(
                f"scoring by log-likelihood (imitation learning) needs a backbone with an LM head; "
                f"{type(self.backbone).__name__} has none: load it with AutoModelForCausalLM"
            )

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @torch.no_grad()
    def score(self, texts: Texts, context: Contexts = None) -> torch.Tensor:
        """One float64 score per text (reward or log-likelihood, per ``scoring``), no gradients."""
        self._check_scoring()
        strings, contexts = texts_and_contexts(texts, context)
        step = self.batch_size
        with _eval_mode(self.module):
            parts = [
                self.rewards(strings[i:i + step], contexts[i:i + step])
                if self.scoring == "reward"
                else self.log_likelihoods(strings[i:i + step], contexts[i:i + step])
                for i in range(0, len(strings), step)
            ]
        if not parts:
            return torch.zeros(0, dtype=torch.float64, device=self.device)
        return torch.cat(parts).double()

    __call__ = score

    def _ids(self, strings: list[str], contexts: list[str | None]) -> tuple[list, list]:
        """Token ids of each text and of each distinct context (tokenised apart, as CausalLM does)."""
        unique = [c for c in dict.fromkeys(contexts) if c]
        encoded = dict(zip(unique, self.tokenizer(unique)["input_ids"])) if unique else {}
        texts = self.tokenizer(strings)["input_ids"] if strings else []
        return [list(t) for t in texts], [list(encoded.get(c, [])) if c else [] for c in contexts]

    def rewards(self, strings: Sequence[str], contexts: Contexts = None) -> torch.Tensor:
        """The head's reward for one batch, with gradients (training); ``score`` batches it."""
        strings, contexts = texts_and_contexts(strings, contexts)
        texts, context_ids = self._ids(strings, contexts)
        end = [] if self.eos_token_id is None else [self.eos_token_id]
        rows = [c + t + end for c, t in zip(context_ids, texts)]
        if self.max_length is not None:
            # Over-long rows keep their start and their read-out token.
            rows = [r if len(r) <= self.max_length else r[: self.max_length - len(end)] + end
                    for r in rows]
        input_ids, attention = _pad(rows, self.pad_token_id, self.padding_side, self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        hidden = self.backbone.base_model(
            input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=False
        ).last_hidden_state
        index = torch.arange(attention.shape[1], device=attention.device)
        last = (attention * index).argmax(-1)  # the last real token, whichever side is padded
        read_out = hidden[torch.arange(len(rows), device=hidden.device), last]
        return self.head(read_out.to(self.head.weight.dtype)).squeeze(-1)

    def token_log_probs(
        self, strings: Sequence[str], contexts: Contexts = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probabilities of text + EOS given the context, and their mask (with grad)."""
        strings, contexts = texts_and_contexts(strings, contexts)
        texts, context_ids = self._ids(strings, contexts)
        end = [] if self.eos_token_id is None else [self.eos_token_id]
        rows = [t + end for t in texts]
        if self.max_length is not None:
            # Rows that do not fit are scored as truncated prefixes (no EOS), as CausalLM does.
            # (A context that fills the window leaves one token, and CausalLM says it is too long.)
            rows = [r[: max(self.max_length - max(len(c), 1) + 1, 1)] for r, c in zip(rows, context_ids)]
        tokens, mask = _pad(rows, self.pad_token_id, "right", self.device)
        mask = mask.bool() & mask_through_eos(tokens, self.eos_token_id)
        has_context = any(c is not None for c in contexts)
        value = Sequences(tokens, mask, context=contexts if has_context else None)
        return CausalLM(self.backbone, self.tokenizer).token_log_probs(value), mask

    def log_likelihoods(self, strings: Sequence[str], contexts: Contexts = None) -> torch.Tensor:
        """Sequence log-likelihood, in total or per token (``normalise``), with gradients."""
        per_token, mask = self.token_log_probs(strings, contexts)
        total = per_token.sum(-1)
        return total if self.normalise == "total" else total / mask.sum(-1).clamp(min=1)


def _pad(
    rows: list[list[int]], pad_token_id: int, side: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        attention[i, span] = 1
    return ids.to(device), attention.to(device)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def ranked_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry: mean ``log(1 + exp(r_rejected − r_chosen))`` (SPEC §7, ranked PM)."""
    return F.softplus(r_rejected - r_chosen).mean()


def binary_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Binary discrimination: BCE on ``σ(r)`` per sample, chosen → 1, rejected → 0 (SPEC §7)."""
    logits = torch.cat([r_chosen, r_rejected])
    labels = torch.cat([torch.ones_like(r_chosen), torch.zeros_like(r_rejected)])
    return F.binary_cross_entropy_with_logits(logits, labels)


def imitation_loss(token_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Imitation learning: next-token NLL of the chosen texts, per token (SPEC §7)."""
    return -torch.where(mask, token_log_probs, 0.0).sum() / mask.sum().clamp(min=1)


def train_preference_model(
    model: PreferenceModel,
    comparisons: Comparisons,
    objective: str = "ranked",
    *,
    steps: int = 100,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
) -> tuple[PreferenceModel, list[dict[str, float]]]:
    """Fit ``model`` in place with one of Askell et al.'s objectives (SPEC §7), AdamW, seeded.

    ``"ranked"``: `ranked_loss` on the head's rewards of each pair; ``"binary"``: `binary_loss`;
    ``"imitation"``: `imitation_loss` on the chosen texts (the backbone's LM head), after which
    the model compares pairs by log-likelihood. Mini-batches of ``batch_size`` pairs follow a
    seeded permutation per epoch; the caller's RNG is left untouched and the model is left in
    eval mode. Returns the model and one history row per step (``loss``; ``batch_accuracy`` and
    ``reward_margin`` for reward PMs).
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("learning_rate", learning_rate)):
        if not value > 0:
            raise ConfigError(f"train_preference_model: {name} must be > 0, got {value}")
    model.scoring = SCORING[objective]
    model._check_scoring()
    parameters = [p for p in model.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(comparisons))
    order = torch.empty(0, dtype=torch.long)
    history: list[dict[str, float]] = []
    model.module.train()
    try:
        with seeded(seed):  # dropout, where the backbone has any
            for step in range(steps):
                if len(order) < batch_size:
                    order = torch.randperm(len(comparisons), generator=generator)
                batch, order = comparisons[order[:batch_size].tolist()], order[batch_size:]
                loss, metrics = _objective_loss(model, batch, objective)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
                optimizer.step()
                history.append({"step": step, "loss": float(loss.detach()), **metrics})
    finally:
        model.module.eval()
    return model, history


def _objective_loss(
    model: PreferenceModel, batch: Comparisons, objective: str
) -> tuple[torch.Tensor, dict[str, float]]:
    if objective == "imitation":
        return imitation_loss(*model.token_log_probs(batch.chosen, batch.context)), {}
    # One forward pass for both sides of every pair.
    contexts = None if batch.context is None else batch.context * 2
    rewards = model.rewards(batch.chosen + batch.rejected, contexts)
    r_chosen, r_rejected = rewards[: len(batch)], rewards[len(batch):]
    loss = ranked_loss(r_chosen, r_rejected) if objective == "ranked" else binary_loss(r_chosen, r_rejected)
    margin = (r_chosen - r_rejected).detach()
    return loss, {"batch_accuracy": float((margin > 0).double().mean()),
                  "reward_margin": float(margin.mean())}


def pairwise_accuracy(model: PreferenceModel, comparisons: Comparisons) -> float:
    """Fraction of pairs the model's scores order as labelled; a tie counts one half."""
    chosen = model.score(comparisons.chosen, comparisons.context)
    rejected = model.score(comparisons.rejected, comparisons.context)
    return float(((chosen > rejected).double() + 0.5 * (chosen == rejected).double()).mean())


def pmp(
    model: PreferenceModel,
    large: Comparisons,
    small: Comparisons,
    objective: str = "ranked",
    *,
    pretrain_objective: str | None = None,
    pretrain_steps: int = 500,
    finetune_steps: int = 100,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    finetune_learning_rate: float | None = None,
    seed: int = 0,
) -> tuple[PreferenceModel, dict[str, list[dict[str, float]]]]:
    """Preference-model pretraining (SPEC §7): pretrain on ``large``, then fine-tune on ``small``.

    Askell et al. pretrain on large scraped comparison sets (StackExchange, Reddit, Wikipedia
    edits [recall]) before the small human-feedback set, for sample efficiency. The recipe is
    two calls of `train_preference_model` on the same model; ``pretrain_objective`` (default
    ``objective``) may differ, e.g. binary PMP before ranked fine-tuning. Returns the model and
    the two stages' histories.
    """
    model, pretrain = train_preference_model(
        model, large, pretrain_objective or objective, steps=pretrain_steps,
        batch_size=batch_size, learning_rate=learning_rate, seed=seed,
    )
    model, finetune = train_preference_model(
        model, small, objective, steps=finetune_steps, batch_size=batch_size,
        learning_rate=finetune_learning_rate or learning_rate, seed=seed,
    )
    return model, {"pretrain": pretrain, "finetune": finetune}
