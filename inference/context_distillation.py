"""Context distillation (Askell et al. 2021; SPEC §13): teach the unprompted LM what the prompt
does, by matching whole next-token distributions on corpus text.

The target is p(y | x) = a(y | C ⊕ x) (a `Prompted` prior and no factor sites); its contexts are
corpus texts x. Each step teacher-forces a batch of them and minimises, per token,

    KL( a(· | C ⊕ x_{<t}) ‖ π_θ(· | x_{<t}) )

over the whole vocabulary at every position t: no sampling, so no weight variance. The
sequence-level alternative is any policy engine on the same target (DPG/CDPG weighs
a(y | C ⊕ x) / π(y | x)); both return a `Posterior` evaluated against the prompted prior.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bayesalign.errors import ConfigError, require_positive
from bayesalign.models.causal_lm import CausalLM
from bayesalign.models.prompted import Prompted, next_token_log_probs
from bayesalign.posterior import Posterior
from bayesalign.targets import NO_CONTEXT, Target
from bayesalign.training import Trainer

from .policy import PolicyEngineConfig, contexts_digest, finish, pick_contexts, require_same_contexts


@dataclass
class DistillationState:
    """The training texts' fingerprint, so a resume on other texts is refused."""

    contexts: str

    def state_dict(self) -> dict:
        return {"contexts": self.contexts}

    def load_state_dict(self, state: dict) -> None:
        require_same_contexts(state["contexts"], self.contexts)


@dataclass
class ContextDistillation(PolicyEngineConfig):
    """Token-level context distillation into the unprompted policy; ``batch_size`` texts per
    micro-batch, each teacher-forced over its first ``max_text_tokens`` tokens."""

    max_text_tokens: int = 64  # positions of each corpus text that are matched
    eval_contexts: int = 4  # training texts (truncated) the final diagnostics are computed on

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("max_text_tokens", self.max_text_tokens)
        require_positive("eval_contexts", self.eval_contexts)

    def fit(self, target: Target, context: Any = NO_CONTEXT, *, contexts: Any = None) -> Posterior:
        """Distil the prompt of ``target``'s `Prompted` prior over the corpus texts ``contexts``."""
        teacher = target.prior(NO_CONTEXT)
        if not isinstance(teacher, Prompted):
            raise ConfigError(
                f"ContextDistillation needs a target whose prior is Prompted(lm, prompt); target "
                f"'{target.name}' has a {type(teacher).__name__} prior")
        if target.factors(teacher.sample_batch(1)):
            raise ConfigError(f"ContextDistillation matches the prompted prior only; target "
                              f"'{target.name}' has factor sites (use DPG for those)")
        texts, policy = self.contexts_and_policy(target, context, contexts)
        if not isinstance(policy, CausalLM):
            raise ConfigError(f"ContextDistillation trains a CausalLM policy, got "
                              f"{type(policy).__name__}")
        tokens = _text_tokens(teacher.lm, teacher.prompt, texts, self.max_text_tokens)
        trainer = Trainer(self, policy, "ContextDistillation",
                          {"distillation": DistillationState(contexts_digest(texts))})

        def step(step_index: int) -> tuple[torch.Tensor, dict[str, float]]:
            chosen = pick_contexts(tokens, self.batch_size)
            loss = distillation_loss(teacher, policy, chosen)
            return loss, {"kl_teacher_student_per_token": float(loss.detach())}

        history = trainer.run(step)
        shown = [teacher.lm.tokenizer.decode(ids) for ids in tokens[:self.eval_contexts]]
        return finish(target, policy, "ContextDistillation", shown, history,
                      {"steps": self.steps, "batch_size": self.batch_size,
                       "max_text_tokens": self.max_text_tokens, "prompt": teacher.prompt},
                      self.eval_samples, seed=self.seed)


def distillation_loss(teacher: Prompted, student: CausalLM, texts: list[list[int]]) -> torch.Tensor:
    """Mean over real positions t ≥ 2 of KL(teacher(· | C ⊕ x_{<t}) ‖ student(· | x_{<t}))."""
    with torch.no_grad():
        log_t, mask = next_token_log_probs(teacher.lm, [teacher.prompt] * len(texts), texts)
    log_s, _ = next_token_log_probs(student, [None] * len(texts), texts)
    # A token the teacher gives probability 0 (an adaptor's ban) adds nothing, not nan.
    terms = torch.where(log_t > -torch.inf, log_t.exp() * (log_t - log_s), 0.0)
    per_position = terms.sum(-1)
    return (per_position * mask).sum() / mask.sum()


def _text_tokens(lm: CausalLM, prompt: str, texts: list[Any], max_tokens: int) -> list[list[int]]:
    """Each corpus text's first ``max_tokens`` token ids.

    The teacher reads prompt ids followed by text ids, while `Prompted` (and so the evaluation)
    tokenises ``prompt + text`` as one string: the two must agree, else the teacher would be
    distilling another prompt.
    """
    encode = lm.tokenizer
    prompt_ids = list(encode(prompt)["input_ids"])
    out = []
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise ConfigError(f"ContextDistillation contexts are corpus texts: context {index} "
                              f"is {text!r}")
        ids = list(encode(text)["input_ids"])
        if len(ids) < 2:
            raise ConfigError(f"ContextDistillation context {index} ({text!r}) has fewer than 2 "
                              "tokens: nothing to predict in it")
        if list(encode(prompt + text)["input_ids"]) != prompt_ids + ids:
            raise ConfigError(
                f"the prompt {prompt!r} and context {index} ({text[:40]!r}) tokenise differently "
                "joined than apart, so the teacher would read another prompt; end the prompt at "
                "a token boundary (e.g. with a newline) or start the text with one")
        out.append(ids[:max_tokens])
    return out
