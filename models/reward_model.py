"""Reward models from transformers: a local sequence classifier as a scorer (issue 13, item 2).

A researcher's reward model is usually an ``AutoModelForSequenceClassification`` with its own
tokenizer. `SequenceClassifierReward` decodes a batch's text and re-tokenises it with that
tokenizer (text is the bridge between vocabularies, DESIGN.md "Conventions"), so it scores
samples of any prior; ``rm(y)`` is one float64 log-score per row, a value for
``ba.reward(name, rm(y), kl_coef)`` or ``pyro.factor`` (SPEC §1.1).

`save_preference_model` writes a `PreferenceModel` as such a classifier (its backbone under the
architecture's ``...ForSequenceClassification`` head), so a trained PM is a reward by path.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from bayesalign.errors import ConfigError
from bayesalign.sequences import Sequences

from .causal_lm import _DTYPE_KEYWORD
from .comparisons import Contexts, Texts

if TYPE_CHECKING:
    from .preference import PreferenceModel

SCORES = ("logit", "log_prob")
# Config attribute holding the PM head's bias: transformers' decoder classification heads have none.
SCORE_BIAS = "score_bias"
PAD_TOKEN = "<|pad|>"


class SequenceClassifierReward:
    """``rm(y)``: one label's logit (or log-probability) of a sequence classifier, per row.

    ``label`` is an index or a name of ``config.id2label``; ``score="log_prob"`` is its
    log-softmax over the labels (log-sigmoid for a one-logit head), a log P(good) as LSC wants
    (SPEC §6). Rows are scored in batches of ``batch_size`` on the model's device, right-padded,
    cut to ``max_length`` tokens, with no gradient; a context (given, or carried by `Sequences`)
    is encoded as the first text of a pair, as reward models score (prompt, response).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        label: int | str = 0,
        score: str = "logit",
        batch_size: int = 32,
        max_length: int | None = None,
        name: str | None = None,
    ) -> None:
        self.name = name or str(getattr(model, "name_or_path", "") or type(model).__name__)
        if not type(model).__name__.endswith("ForSequenceClassification"):
            raise ConfigError(
                f"reward model '{self.name}': a {type(model).__name__} is not a sequence classifier; "
                "load one with AutoModelForSequenceClassification"
            )
        if score not in SCORES:
            raise ConfigError(f"reward model '{self.name}': score must be one of {SCORES}, got {score!r}")
        if batch_size < 1:
            raise ConfigError(f"reward model '{self.name}': batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.score_as, self.batch_size = score, batch_size
        self.label = self._label_index(label)
        self.pad_token_id = next(
            (t for t in (model.config.pad_token_id, tokenizer.pad_token_id) if t is not None), None
        )  # the config's first: a decoder classifier reads the last token that is not its pad
        positions = getattr(model.config, "max_position_embeddings", None)
        self.max_length = max_length or min(
            n for n in (tokenizer.model_max_length, positions, 10**9) if n is not None
        )
        bias = getattr(model.config, SCORE_BIAS, None)
        self.score_bias = None if bias is None else torch.tensor(bias, dtype=torch.float64)

    @classmethod
    def from_pretrained(
        cls,
        path_or_model: str | Path | PreTrainedModel,
        tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **kw,
    ) -> SequenceClassifierReward:
        """Load a local classifier folder (nothing downloads) or wrap a loaded model.

        ``tokenizer`` defaults to the folder's own; a loaded model needs one. ``kw`` go to the
        constructor (``label``, ``score``, ``batch_size``, ``max_length``).
        """
        if isinstance(path_or_model, PreTrainedModel):
            if tokenizer is None:
                raise ConfigError(
                    f"reward model '{type(path_or_model).__name__}': a loaded model needs tokenizer="
                )
            model = path_or_model
        else:
            model = _load_classifier(str(path_or_model), dtype)
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            source = str(tokenizer or path_or_model)
            try:
                tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            except (OSError, ValueError) as e:
                raise ConfigError(f"reward model: no tokenizer could be loaded from {source!r}: {e}") from e
        if device is not None:
            model = model.to(device)
        return cls(model, tokenizer, **kw)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def labels(self) -> dict[int, str]:
        return {int(i): str(n) for i, n in self.model.config.id2label.items()}

    def _label_index(self, label: int | str) -> int:
        labels = self.labels
        if isinstance(label, str) and label in labels.values():
            return next(i for i, n in labels.items() if n == label)
        if isinstance(label, int) and not isinstance(label, bool) and label in labels:
            return label
        listed = ", ".join(f"{i}: {n!r}" for i, n in sorted(labels.items()))
        raise ConfigError(
            f"reward model '{self.name}' has no label {label!r}; its labels are {{{listed}}}"
        )

    @torch.no_grad()
    def __call__(self, texts: Texts | str, context: Contexts | str = None) -> torch.Tensor:
        """One float64 log-score per row (higher is better), on the `Sequences`' device (a list
        of str: the model's)."""
        strings, contexts = _texts_and_contexts(texts, context)
        was_training = self.model.training  # dropout off while scoring; a model in training stays so
        self.model.eval()
        try:
            parts = [
                self._score_batch(strings[i:i + self.batch_size], contexts[i:i + self.batch_size])
                for i in range(0, len(strings), self.batch_size)
            ]
        finally:
            self.model.train(was_training)
        values = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
        return values.to(texts.device) if isinstance(texts, Sequences) else values

    score = __call__  # as PreferenceModel.score: either is a reward by the same call

    def _score_batch(self, strings: list[str], contexts: list[str | None]) -> torch.Tensor:
        logits = self.logits(strings, contexts)
        if self.score_as == "logit":
            return logits[:, self.label]
        if logits.shape[-1] == 1:
            return F.logsigmoid(logits[:, 0])
        return torch.log_softmax(logits, dim=-1)[:, self.label]

    def logits(self, strings: list[str], contexts: list[str | None]) -> torch.Tensor:
        """All labels' float64 logits for one batch (with ``score_bias`` added, where saved)."""
        rows = [self._encode(t, c) for t, c in zip(strings, contexts)]
        if len(rows) > 1 and self.pad_token_id is None:
            raise ConfigError(
                f"reward model '{self.name}': its tokenizer and config have no pad token, so batches "
                "cannot be padded; set tokenizer.pad_token or pass batch_size=1"
            )
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id or 0, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention[i, : len(row)] = 1
        out = self.model(input_ids=ids.to(self.device), attention_mask=attention.to(self.device))
        logits = out.logits.double()
        return logits if self.score_bias is None else logits + self.score_bias.to(logits.device)

    def _encode(self, text: str, context: str | None) -> list[int]:
        kw = {"truncation": True, "max_length": self.max_length}
        encoded = self.tokenizer(text, **kw) if context is None else self.tokenizer(context, text, **kw)
        ids = list(encoded["input_ids"])
        if not ids:
            raise ConfigError(
                f"reward model '{self.name}': {text!r} encodes to no tokens; a classifier needs at least one"
            )
        return ids


def _texts_and_contexts(texts: Texts | str, context: Contexts | str) -> tuple[list[str], list[str | None]]:
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, Sequences):
        strings = list(texts.text)
        context = context if context is not None else texts.context
    else:
        strings = list(texts)
    if isinstance(context, str):
        context = [context] * len(strings)
    contexts = list(context) if context is not None else [None] * len(strings)
    if len(contexts) != len(strings):
        raise ConfigError(f"reward model: {len(contexts)} contexts given for {len(strings)} texts")
    for i, text in enumerate(strings):
        if not isinstance(text, str):
            raise ConfigError(f"reward model: sample {i} is a {type(text).__name__}, not a str")
    return strings, contexts


def _load_classifier(path: str, dtype: torch.dtype | None) -> PreTrainedModel:
    """The classifier at ``path``, refusing a folder whose weights are another kind of model.

    transformers would build a ``...ForSequenceClassification`` over a causal LM's folder with a
    random head (and only log it); a reward that is noise must be an error instead.
    """
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"reward model {path!r}: not a transformers model folder ({e})") from e
    saved_as = [a for a in (config.architectures or []) if not a.endswith("ForSequenceClassification")]
    if saved_as:
        raise ConfigError(
            f"reward model {path!r} holds a {', '.join(saved_as)}, not a sequence classifier; save one "
            "with AutoModelForSequenceClassification (or PreferenceModel.save_pretrained)"
        )
    model_kw = {} if dtype is None else {_DTYPE_KEYWORD: dtype}
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, output_loading_info=True, **model_kw
        )
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            f"reward model {path!r}: not a sequence classifier transformers can load ({e})"
        ) from e
    if info.get("missing_keys"):
        raise ConfigError(
            f"reward model {path!r}: weights missing from the folder (they would be random): "
            f"{sorted(info['missing_keys'])[:5]}"
        )
    return model.eval()


def save_preference_model(pm: PreferenceModel, path: str | Path) -> None:
    """Write ``pm`` as an ``AutoModelForSequenceClassification`` folder that scores as it does.

    The backbone's base model goes under its architecture's classification head (a linear
    read-out of the last non-pad token: GPT-2, Llama, Qwen2, ...), the PM head's weight becomes
    that head's and its bias, which transformers' head lacks, is saved in the config as
    ``score_bias`` (added by `SequenceClassifierReward`; a plain transformers load gives the
    reward minus that constant, which changes no preference). The tokenizer appends EOS as the
    PM does, and a pad token distinct from EOS is added where they coincide, since the head
    reads the rightmost non-pad token.
    """
    if pm.scoring != "reward":
        raise ConfigError(
            "PreferenceModel.save_pretrained: a PM scoring by log-likelihood (imitation) is a causal "
            "LM, not a classifier; save pm.backbone with its own save_pretrained"
        )
    tokenizer = copy.deepcopy(pm.tokenizer)
    if not isinstance(tokenizer, PreTrainedTokenizerFast) or pm.eos_token_id is None:
        raise ConfigError(
            "PreferenceModel.save_pretrained needs a fast tokenizer with an EOS token, got "
            f"{type(tokenizer).__name__} (eos_token_id={pm.eos_token_id})"
        )
    config = copy.deepcopy(pm.backbone.config)
    config.num_labels, config.architectures = 1, None
    config.id2label, config.label2id = {0: "reward"}, {"reward": 0}
    parameter = next(pm.backbone.parameters())
    try:
        model = AutoModelForSequenceClassification.from_config(config)
    except ValueError as e:
        raise ConfigError(
            f"PreferenceModel.save_pretrained: no sequence classifier for this backbone ({e})"
        ) from e
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise ConfigError(
            f"PreferenceModel.save_pretrained: {type(model).__name__}'s head is not a bias-free linear "
            "read-out of the last token, so it cannot hold the PM's head"
        )
    model.base_model.load_state_dict(pm.backbone.base_model.state_dict())
    with torch.no_grad():
        head.weight.copy_(pm.head.weight)
    config = model.config
    setattr(config, SCORE_BIAS, pm.head.bias.detach().double().tolist())
    eos = tokenizer.eos_token
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == pm.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    config.pad_token_id = tokenizer.pad_token_id
    from tokenizers.processors import TemplateProcessing

    # Context and text are tokenised apart and joined, then EOS: the PM's rows (PreferenceModel.rewards).
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {eos}", pair=f"$A $B {eos}", special_tokens=[(eos, pm.eos_token_id)]
    )
    if pm.max_length is not None:
        tokenizer.model_max_length = pm.max_length
    model = model.to(dtype=parameter.dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
