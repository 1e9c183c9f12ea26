"""`CausalLM`: any transformers causal LM as a prior or proposal over token sequences.

Sampling is a manual KV-cache loop (not ``model.generate``; models/stepping.py) so that each
sample's exact log q under the adapted law (SPEC §8.2) is accumulated while it is drawn;
``log_prob`` recomputes the same quantity in one forward pass, and the two agree (DESIGN.md,
"Conventions"). This module holds the model and tokenizer, the prompts' encoding and scoring.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import ConfigError, VocabularyMismatchError
from bayesalign.sequences import Sequences, mask_through_eos

from . import stepping
from .adaptors import Adaptor, BanTokens, adapted_log_probs, make_adaptors
from .decoding import tokenizer_decoder
from .lora_options import base_forward
from .stepping import DecodingState
from .stepping import draw as draw  # re-exported: tests import draw from here

Prompt = str | list[str] | None
# from_pretrained's dtype keyword: `dtype` since transformers 4.56 (where `torch_dtype` is
# deprecated), `torch_dtype` before.
_TRANSFORMERS = tuple(int(part) for part in transformers.__version__.split(".")[:2])
_DTYPE_KEYWORD = "dtype" if _TRANSFORMERS >= (4, 56) else "torch_dtype"


class CausalLM(SequenceDistribution):
    """Ancestral sampling and exact scoring of ``y | x`` for a transformers causal LM.

    A value is a batch of generated tokens (right-padded after the first EOS); its context is
    the prompt of each row, given by ``given`` or carried in ``Sequences.context``. With
    ``prompt`` a list, row ``i`` of a batch of ``n`` uses ``prompt[i // (n // len(prompt))]``
    (each prompt's samples are contiguous), and ``n`` must be a multiple of ``len(prompt)``.
    An adaptor chain (``adapted``) turns the prior into a locally normalised proposal.
    ``hidden_tokens`` are sampled and scored like any token but left out of the decoded text
    (the ``<|good|>`` tags a conditionally trained model writes before its segments).
    With ``chat_template`` on, each prompt is encoded as one user turn of the tokenizer's chat
    template followed by the assistant's header, so samples are assistant answers (an empty or
    absent prompt still starts from the start token alone).
    The model should be in eval mode (or have no dropout): sampling and scoring must see one
    function for log q to be exact.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_new_tokens: int = 32,
        adaptors: Sequence[Adaptor] = (),
        prompt: Prompt = None,
        chat_template: bool = False,
        hidden_tokens: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if max_new_tokens < 1:
            raise ConfigError(f"CausalLM max_new_tokens must be >= 1, got {max_new_tokens}")
        if chat_template and getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError(
                "CausalLM chat_template=True but the tokenizer has no chat template; "
                "pass chat_template=False to encode prompts as plain text"
            )
        output = model.get_output_embeddings()
        self.vocab_size = int(getattr(output, "out_features", model.config.vocab_size))
        if len(tokenizer) > self.vocab_size:
            raise VocabularyMismatchError(
                f"the tokenizer has {len(tokenizer)} tokens but the model only scores "
                f"{self.vocab_size}; load the tokenizer saved with this model"
            )
        _check_end_of_sequence(model, tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.adaptors = tuple(adaptors)
        self.prompt = _check_prompt(prompt)
        self.chat_template = chat_template
        self.hidden_tokens = frozenset(hidden_tokens)  # sampled and scored, left out of .text
        self.eos_token_id = tokenizer.eos_token_id
        # Pad fills rows after their EOS; it is never read (masks are built by position).
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        self.pad_token_id = pad if pad is not None else 0
        # Start token for an empty context: a causal LM needs one position to predict from.
        bos = tokenizer.bos_token_id
        self.start_token_id = bos if bos is not None else self.pad_token_id
        forward_parameters = inspect.signature(model.forward).parameters
        self._keeps_logits = "logits_to_keep" in forward_parameters
        # transformers 5 names the KV cache `cache` (in and out); older releases and
        # remote-code models still call it `past_key_values`.
        self._cache_name = "cache" if "cache" in forward_parameters else "past_key_values"

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None, **kw,
    ) -> CausalLM:
        """Load a model and tokenizer from a local directory (never from a hub).

        ``"bundled:NAME"`` loads a prior shipped with the library (``models/bundled.py`` lists
        them); ``kw`` go to ``CausalLM``.
        """
        path = str(path)
        if path.startswith("bundled:"):
            # Imported here: the registry imports this module, and loading it is rarely needed.
            from .bundled import load_bundled

            return load_bundled(path.removeprefix("bundled:"), dtype=dtype, device=device, **kw)
        if not Path(path).is_dir():
            raise ConfigError(
                f"CausalLM.from_pretrained: {path!r} is not a local directory; models are "
                "loaded offline from a folder written by save_pretrained"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model_kw = {} if dtype is None else {_DTYPE_KEYWORD: dtype}
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **model_kw)
        if device is not None:
            model = model.to(device)
        return cls(model.eval(), tokenizer, **kw)

    def _replace(self, **changes) -> CausalLM:
        """A shallow copy sharing the model, tokenizer and cached vocabulary id."""
        new = copy.copy(self)
        new.__dict__.update(changes)
        return new

    def conditioned(self, prompt: Prompt) -> CausalLM:
        """The conditional ``a(y | x = prompt)``; one string is shared by every row."""
        return self._replace(prompt=_check_prompt(prompt))

    def adapted(
        self,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        typical_p: float | None = None,
        eta: float | None = None,
    ) -> CausalLM:
        """A proposal with this sampling chain (replacing any previous one), same model.

        Token bans stay first: they say what the model may never emit (control tokens, EOS
        when lengths are fixed), not how to sample, so a new temperature must not lift them.
        """
        bans = tuple(a for a in self.adaptors if isinstance(a, BanTokens))
        return self._replace(adaptors=bans + make_adaptors(temperature, top_k, top_p, typical_p, eta))

    @property
    def module(self) -> PreTrainedModel:
        return self.model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @cached_property
    def vocabulary_id(self) -> tuple:
        """Size, EOS and a fingerprint of the token strings, so equal vocabularies match."""
        vocab = sorted(self.tokenizer.get_vocab().items(), key=lambda item: item[1])
        digest = hashlib.sha1(json.dumps(vocab).encode()).hexdigest()[:16]
        return (self.vocab_size, self.eos_token_id, len(self.tokenizer), digest)

    def _contexts(self, num_rows: int) -> list[str | None]:
        """Each row's prompt under this distribution's ``prompt``."""
        if isinstance(self.prompt, list):
            if num_rows % len(self.prompt) != 0:
                raise ConfigError(
                    f"{num_rows} rows cannot be split over {len(self.prompt)} prompts; "
                    "ask for a multiple of the number of prompts"
                )
            per_prompt = num_rows // len(self.prompt)
            return [p for p in self.prompt for _ in range(per_prompt)]
        return [self.prompt] * num_rows

    def _encode_contexts(
        self, contexts: Sequence[str | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded context ids and attention mask, so every row's next token is last."""
        encoded = {
            context: self._context_ids(context) if context else []
            for context in dict.fromkeys(contexts)
        }
        rows = [encoded[context] or [self.start_token_id] for context in contexts]
        width = max(len(r) for r in rows)
        device = self.device
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[i, width - len(ids):] = 1
        return input_ids.to(device), attention.to(device)

    def _context_ids(self, context: str) -> list[int]:
        """One prompt's token ids: the text itself, or a user turn of the chat template."""
        if not self.chat_template:
            return list(self.tokenizer(context)["input_ids"])
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": context}], add_generation_prompt=True, tokenize=False
        )
        # The template writes its own special tokens; the tokenizer must not add a BOS again.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _check_length(self, context_width: int, new_tokens: int) -> None:
        """Fail clearly where a model with learned positions would index past its table."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        # The last new token is predicted, never fed: context_width + new_tokens - 1 positions.
        if limit is not None and context_width + new_tokens - 1 > limit:
            raise ConfigError(
                f"prompt ({context_width} tokens) + max_new_tokens ({new_tokens}) exceeds the "
                f"model's {limit} positions; shorten the prompt or lower max_new_tokens"
            )

    def _forward(
        self, input_ids: torch.Tensor, attention: torch.Tensor, *, keep: int,
        use_cache: bool = False, cache=None, positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, object]:
        """Logits of the last ``keep`` positions and the KV cache (with ``use_cache``);
        positions count real tokens only (left pads), unless given."""
        if positions is None:
            positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        kw = {"logits_to_keep": keep} if self._keeps_logits else {}
        with base_forward(self.model):  # a base that LoRA policies adapt runs without them
            out = self.model(
                input_ids=input_ids, attention_mask=attention, position_ids=positions,
                use_cache=use_cache, **{self._cache_name: cache}, **kw,
            )
        return out.logits[:, -keep:], getattr(out, self._cache_name, None)

    @torch.no_grad()
    def start(self, num_rows: int) -> DecodingState:
        """Begin drawing ``num_rows`` continuations step by step (what `sample_batch` and
        SMC's particles use): one forward pass over the rows' prompts, KV cache on.

        The state's ``logits`` are the first token's; feed tokens with `step`, follow
        resampling with `reorder`, read the next-token law with `next_log_probs`. The KV
        cache is preallocated for ``max_new_tokens`` steps (more still works, slower).
        Runs without gradients: a decoding state is for drawing, never differentiated.
        """
        contexts = self._contexts(num_rows)
        input_ids, attention = self._encode_contexts(contexts)
        self._check_length(input_ids.shape[1], self.max_new_tokens)
        return stepping.prefill(self._forward, self.model, contexts, input_ids, attention,
                                self.max_new_tokens)

    def next_log_probs(self, state: DecodingState, rows: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Adapted next-token log-probabilities ``[rows, V]`` (float32 or wider) of ``rows``
        (all by default): the law each row's next token is drawn from."""
        return stepping.next_log_probs(state, self.adaptors, rows)

    @torch.no_grad()
    def step(self, state: DecodingState, tokens: torch.Tensor) -> DecodingState:
        """Feed one token per row (pad for a finished row: the batch never changes shape) and
        set ``state.logits`` to the next token's; updates ``state`` in place and returns it."""
        return stepping.step(self._forward, state, tokens)

    def reorder(self, state: DecodingState, index: torch.Tensor) -> DecodingState:
        """Row ``i`` becomes a copy of row ``index[i]`` (resampling: rows may repeat or vanish),
        cache included; updates ``state`` in place and returns it."""
        return stepping.reorder(state, index)

    @torch.no_grad()
    def sample_batch(self, num_samples: int) -> Sequences:
        """Draw ``num_samples`` continuations with their exact log q (float64), KV cache on;
        the loop stops as soon as every row has emitted EOS (`stepping.ancestral`)."""
        state, tokens, log_q = stepping.ancestral(self, num_samples)
        return Sequences(
            tokens=tokens,
            mask=mask_through_eos(tokens, self.eos_token_id),
            context=None if self.prompt is None else state.contexts,
            log_q=log_q,
            decoder=tokenizer_decoder(self.tokenizer, self.eos_token_id, self.hidden_tokens),
        )

    def token_log_probs(self, value: Sequences) -> torch.Tensor:
        """Per-token log-probabilities ``[batch, length]`` (float64, 0 outside the mask).

        One forward pass over context + tokens; tokens count up to and including the first EOS
        (and inside ``value.mask``); rows without EOS are truncated prefixes. Follows torch's
        grad mode, so training calls it with gradients and `log_prob` without.
        """
        contexts = value.context if value.context is not None else self._contexts(len(value))
        tokens = value.tokens.to(self.device)
        mask = mask_through_eos(tokens, self.eos_token_id) & value.mask.to(self.device)
        if tokens.shape[1] == 0:
            return torch.zeros(tokens.shape, dtype=torch.float64, device=self.device)
        context_ids, context_attention = self._encode_contexts(contexts)
        self._check_length(context_ids.shape[1], tokens.shape[1])
        # The last token is scored, never conditioned on.
        input_ids = torch.cat([context_ids, tokens[:, :-1]], dim=1)
        attention = torch.cat([context_attention, torch.ones_like(tokens[:, :-1])], dim=1)
        logits, _ = self._forward(input_ids, attention, keep=tokens.shape[1])
        log_probs = adapted_log_probs(logits, self.adaptors)
        per_token = log_probs.gather(-1, tokens[..., None]).squeeze(-1)
        # where (not multiply): a token an adaptor removed is -inf, and -inf * 0 is nan.
        return torch.where(mask, per_token, 0.0).double()

    def log_prob(self, value: Sequences) -> torch.Tensor:
        """``log a(y | x)`` per row (under the adaptor chain if any), without gradients."""
        with torch.no_grad():
            return self.token_log_probs(value).sum(-1)

    def trainable_copy(self) -> CausalLM:
        """A policy initialised at this LM with its own (deep-copied, trainable) weights."""
        model = copy.deepcopy(self.model)
        model.requires_grad_(True)
        return self._replace(model=model)


def _check_end_of_sequence(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """A tokenizer from another model usually disagrees on EOS: samples would never stop or
    stop at the wrong token, silently, so refuse the pair (lists of EOS ids are allowed)."""
    model_eos = getattr(model.config, "eos_token_id", None)
    allowed = model_eos if isinstance(model_eos, (list, tuple)) else [model_eos]
    if model_eos is not None and tokenizer.eos_token_id is not None \
            and tokenizer.eos_token_id not in allowed:
        raise VocabularyMismatchError(
            f"the tokenizer's EOS id is {tokenizer.eos_token_id} but the model's config says "
            f"{model_eos}: this tokenizer does not belong to this model; load the tokenizer "
            "saved with it"
        )


def _check_prompt(prompt: Prompt) -> Prompt:
    if isinstance(prompt, (list, tuple)):
        if not prompt or not all(isinstance(p, str) for p in prompt):
            raise ConfigError(
                "CausalLM prompt must be a string, a non-empty list of strings, or None"
            )
        return list(prompt)
    if prompt is not None and not isinstance(prompt, str):
        raise ConfigError(f"CausalLM prompt must be a string or a list of strings, got {prompt!r}")
    return prompt

