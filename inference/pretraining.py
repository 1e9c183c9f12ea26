"""`Pretraining`: PHF's objectives as amortised inference for a corpus prior (SPEC §5).

The target is ``y = pyro.sample("y", Corpus(...))`` times factor sites; its posterior is
corpus(y)·L(y). Each objective trains a causal LM toward it from the corpus alone:

- ``mle``: the corpus itself (L ignored), the baseline;
- ``filtering``: rejection sampling on the corpus (documents whose mean score passes the
  threshold), then MLE;
- ``conditional``: MLE on (tag, y), each segment preceded by ``<|good|>`` or ``<|bad|>``, then
  sampling conditioned on ``<|good|>`` with both control tokens banned (``conditional_decoding
  = "once"``), or as PHF's code samples: ``<|bad|>`` banned, the model writing ``<|good|>``
  before each segment itself, tags left out of the text (``"every_segment"``; on phf_pep8 it
  cut PHF's violations per character 2.5× where "once" gained nothing, by writing comments:
  its code lines were worse than MLE's);
- ``unlikelihood``: MLE on good segments, α·unlikelihood on bad ones (hard threshold, or PHF's
  soft weight ``1 + R``, SPEC §5 quirk);
- ``rwr``: MLE on importance weights exp(R/β): with ``awr_beta = 1`` exactly the posterior's;
- ``awr``: RWR with a value head's advantage, weights clamped to [0, 1000].

A segment's reward is ``R = log L``, the sum of the target's factor sites (a reward site's
``kl_coef`` already divides it). Thresholds are quantiles of the corpus's scores; their absolute
values go into the `Posterior`'s config. Training runs through the shared `Trainer` (accelerate,
accumulation, checkpoints with exact resume): the blocks of micro-batch ``m`` of step ``t`` on
process ``r`` are a function of (seed, t, m, r), so resuming needs no data-loader state and the
global batch does not depend on the number of processes.

``bayesalign pretrain`` is this engine: MLE on a target whose prior site is a `Corpus` training
split (``split="train"``) and which has no factor sites. For such a corpus the held-out loss
(nats/token of the held-out split) is measured every ``eval_every`` steps and at the end.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, ClassVar

import torch

from bayesalign.errors import ConfigError, InvalidTargetError, require_positive
from bayesalign.evaluation import evaluate
from bayesalign.models.adaptors import BanTokens
from bayesalign.models.causal_lm import CausalLM
from bayesalign.models.corpus_prior import Corpus
from bayesalign.models.pretraining.presets import PRESETS
from bayesalign.models.tiny import tiny_gpt2
from bayesalign.options import renamed_options
from bayesalign.posterior import Posterior
from bayesalign.seeding import seeded
from bayesalign.targets import NO_CONTEXT, Target
from bayesalign.training import Trainer, TrainingConfig

from .phf_objectives import awr_loss, mle_loss, rwr_loss, token_log_probs, unlikelihood_loss
from .pretraining_data import BAD_TOKEN, GOOD_TOKEN, PreparedData, prepare

OBJECTIVES = ("mle", "filtering", "conditional", "unlikelihood", "rwr", "awr")
# Options recorded in the posterior's config (what the run computed).
_RUN_OPTIONS = ("objective", "preset", "block_size", "threshold_quantile", "drop_token_fraction",
                "new_token_init", "unlikelihood_mode", "unlikelihood_alpha", "awr_alpha",
                "awr_beta")


@renamed_options(num_samples="eval_samples")
@dataclass
class Pretraining(TrainingConfig):
    """Train a causal LM on a `Corpus` target with one PHF objective (one line per option)."""

    # Where data and scores are kept, what is sampled and how often the held-out loss is
    # measured: a resumed run may change these (every other option must match the checkpoint's).
    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = TrainingConfig.RESUMABLE_CHANGES + (
        "data_dir", "score_cache", "score_batch_size", "eval_samples", "max_new_tokens",
        "conditional_decoding", "eval_every", "eval_blocks")

    objective: str = "conditional"  # mle, filtering, conditional, unlikelihood, rwr or awr
    batch_size: int = 16  # blocks per micro-batch (per process)
    mixed_precision: str = "auto"  # "auto": bf16 on a GPU that has it, else no
    policy: CausalLM | None = None  # model to train (copied); None: a fresh GPT-2 of `preset`
    preset: str = "tiny"  # size of the fresh GPT-2 and its BPE (models/pretraining PRESETS)
    block_size: int | None = None  # tokens per block; None: the preset's
    threshold_quantile: float = 0.5  # threshold = this quantile of the scores, in (0, 1)
    drop_token_fraction: float = 0.01  # segments left untagged in conditional training
    new_token_init: str = "mean"  # control-token embeddings: "mean" of the others, or "random"
    conditional_decoding: str = "once"  # "once": EOS <|good|>, tags banned; "every_segment": PHF's
    unlikelihood_mode: str = "hard"  # "hard": R ≥ threshold; "soft": PHF's weight 1 + R
    unlikelihood_alpha: float = 1.0  # weight of the unlikelihood term
    awr_alpha: float = 0.5  # AWR's policy weight; 1 − α weighs the value loss
    awr_beta: float = 1.0  # RWR/AWR temperature on R = log L (1: the posterior's weights)
    data_dir: str | None = None  # prepared data and the score cache; None: a temporary folder
    score_cache: str | None = None  # SQLite file of segment scores; None: data_dir/scores.sqlite
    scorer_id: str | None = None  # cache key of the factors; None: a digest of the target's code
    score_batch_size: int = 256  # segments per call of the factor sites (about)
    eval_every: int | None = None  # steps between held-out losses, measured on the held-out
    # split of a corpus with split="train" (and at the end); None: none
    eval_blocks: int = 64  # held-out blocks per evaluation
    eval_samples: int = 64  # posterior samples drawn for the diagnostics
    max_new_tokens: int | None = None  # tokens per posterior sample; None: as many as the
    # context holds after the prompt (block_size; block_size − 2 for conditional's EOS <|good|>)

    def __post_init__(self) -> None:
        if self.mixed_precision == "auto":
            bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            self.mixed_precision = "bf16" if bf16 else "no"
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, "
                              f"got {self.objective!r}")
        if not 0 < self.threshold_quantile < 1:
            raise ConfigError(f"threshold_quantile must be in (0, 1), got {self.threshold_quantile}")
        if not 0 <= self.drop_token_fraction < 1:
            raise ConfigError(f"drop_token_fraction must be in [0, 1), got {self.drop_token_fraction}")
        if self.preset not in PRESETS:
            raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.conditional_decoding not in ("once", "every_segment"):
            raise ConfigError(f"conditional_decoding must be 'once' or 'every_segment', "
                              f"got {self.conditional_decoding!r}")
        if self.new_token_init not in ("mean", "random"):
            raise ConfigError(f"new_token_init must be 'mean' or 'random', got {self.new_token_init!r}")
        if self.unlikelihood_mode not in ("hard", "soft"):
            raise ConfigError(f"unlikelihood_mode must be 'hard' or 'soft', "
                              f"got {self.unlikelihood_mode!r}")
        if not 0 <= self.awr_alpha <= 1:
            raise ConfigError(f"awr_alpha must be in [0, 1], got {self.awr_alpha}")
        self.block_size = self.block_size or PRESETS[self.preset].block_size
        # Unconditional samples start from EOS and fill the context; conditional's prompt is
        # EOS <|good|>.
        prompt = 2 if self.objective == "conditional" else 0
        self.max_new_tokens = self.max_new_tokens or self.block_size - prompt
        for name in ("awr_beta", "unlikelihood_alpha", "score_batch_size", "eval_samples",
                     "max_new_tokens", "block_size", "eval_blocks"):
            require_positive(name, getattr(self, name))
        if self.eval_every is not None:
            require_positive("eval_every", self.eval_every)

    def fit(self, target: Target, context: Any = NO_CONTEXT, *,
            contexts: list | None = None) -> Posterior:
        """Prepare the scored data (once, on the main process), train, sample the posterior."""
        from accelerate import PartialState

        if contexts is not None:
            raise ConfigError("Pretraining solves one context per fit (its prior is one Corpus): "
                              "pass context=, not contexts=")

        corpus = target.prior(context)
        if not isinstance(corpus, Corpus):
            raise InvalidTargetError(
                f"Pretraining needs a target whose prior site is a Corpus; target "
                f"'{target.name}' samples from {type(corpus).__name__}. Declare "
                "y = pyro.sample('y', Corpus(path, segment='line')) and the factor sites"
            )
        state = PartialState(cpu=not torch.cuda.is_available())
        with tempfile.TemporaryDirectory() as scratch:
            run = self if self.data_dir else copy.copy(self)
            run.data_dir = run.data_dir or scratch
            tokenizer = None if self.policy is None else self.policy.tokenizer
            with state.main_process_first():
                data = prepare(run, target, corpus, context, tokenizer)
            return self._train(target, context, corpus, data)

    def _train(self, target: Target, context: Any, corpus: Corpus,
               data: PreparedData) -> Posterior:
        model = self._model(data.tokenizer)
        value_head = getattr(model, "value_head", None)
        trainer = Trainer(self._training_config(data), CausalLM(model, data.tokenizer),
                          f"Pretraining[{self.objective}]", supports_sharding=True,
                          separately_called=() if value_head is None else (value_head,))
        run = {"sharding": trainer.parallelism, "device": str(trainer.device)}
        blocks = data.blocks(self.block_size, self.seed)
        heldout = data.heldout_blocks(self.block_size)
        eval_set = None if heldout is None else heldout.evenly_spaced(self.eval_blocks)
        rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
        threshold = data.meta["threshold"]

        def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
            micro = trainer.micro_step
            metrics = {}  # the Trainer applies warmup_steps / lr_decay_steps and logs the rate
            if eval_set is not None and step % self.eval_every == 0 and micro == 0:
                # The weights before this step's update.
                metrics["heldout_loss"] = _heldout_loss(model, eval_set, self.batch_size,
                                                        trainer.device)
                self._report(trainer, step, metrics["heldout_loss"])
            # Step t reads global blocks [t·G, (t+1)·G), G = accumulation × processes × batch;
            # each (micro-batch, process) pair takes its own slice, so any split of G reads the
            # same blocks.
            position = (step * self.gradient_accumulation_steps + micro) * world + rank
            tokens, rewards = data.batch(blocks, position * self.batch_size, self.batch_size)
            loss, more = self._loss(model, tokens.to(trainer.device), rewards.to(trainer.device),
                                    threshold)
            return loss, {**metrics, **more}

        history = trainer.run(step_fn)
        model = trainer.module  # unsharded again after an FSDP run
        if trainer.start_step > self.steps:
            raise ConfigError(f"{self.checkpoint_dir} holds step {trainer.start_step}, past "
                              f"steps={self.steps}; raise it or use another checkpoint_dir")
        if eval_set is not None:
            run["heldout_loss"] = _heldout_loss(model, eval_set, self.batch_size, trainer.device)
        if hasattr(model, "value_head"):
            del model.value_head  # trained with the policy, not part of the saved LM
        return self._posterior(target, context, corpus, data, model.eval(), history, run)

    def _training_config(self, data: PreparedData) -> TrainingConfig:
        """The Trainer's config: TrainingConfig's options plus every option of this engine and
        the data's identity (corpus, scorer, tokenizer) a resume must share, so the Trainer's one
        resume check, made before any weight is read, names whichever of them changed."""
        shared = {f.name: getattr(self, f.name) for f in fields(TrainingConfig)}
        if shared["learning_rate"] is None and self.policy is None:
            shared["learning_rate"] = PRESETS[self.preset].learning_rate
        shared["optimizer"] = shared["optimizer"] or "adam"
        run = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in shared and f.name not in (*self.RESUMABLE_CHANGES, "policy")}
        run["data"] = data.meta["identity"]
        config = make_dataclass("PretrainingRun", [(k, Any, field(default=None)) for k in run],
                                bases=(TrainingConfig,))
        return config(**shared, **run)

    def _report(self, trainer: Trainer, step: int, heldout: float) -> None:
        """One line per held-out evaluation, from the main process (the bar shows the rest)."""
        if self.progress and trainer.accelerator.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(f"step {step:>6}  held-out loss {heldout:.3f}")

    def _model(self, tokenizer: Any) -> torch.nn.Module:
        """The LM to train, with control-token embeddings initialised and, for AWR, a value head."""
        if self.policy is None:
            preset = PRESETS[self.preset]
            model = tiny_gpt2(tokenizer, preset.n_layer, preset.n_embd, preset.n_head,
                              n_positions=self.block_size, seed=self.seed)
        else:
            model = copy.deepcopy(self.policy.model).requires_grad_(True)
            limit = getattr(model.config, "max_position_embeddings", None)
            if limit is not None and limit < self.block_size:
                raise ConfigError(f"block_size {self.block_size} exceeds the policy's "
                                  f"{limit} positions")
            model.resize_token_embeddings(len(tokenizer))
        if self.objective == "conditional" and self.new_token_init == "mean":
            control = tokenizer.convert_tokens_to_ids([GOOD_TOKEN, BAD_TOKEN])
            others = [i for i in range(len(tokenizer)) if i not in control]
            with torch.no_grad():
                for embeddings in {model.get_input_embeddings(), model.get_output_embeddings()}:
                    embeddings.weight[control] = embeddings.weight[others].mean(0)
        if self.objective == "awr":
            with seeded(self.seed):
                model.value_head = torch.nn.Linear(model.config.hidden_size, 1)
        return model

    def _loss(self, model: torch.nn.Module, tokens: torch.Tensor, rewards: torch.Tensor,
              threshold: float | None) -> tuple[torch.Tensor, dict[str, float]]:
        """One micro-batch: position t's logits predict token t + 1 with its segment's reward."""
        inputs, targets, reward = tokens[:, :-1], tokens[:, 1:], rewards[:, 1:]
        out = model(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                    output_hidden_states=self.objective == "awr")
        logits, mask = out.logits, torch.ones_like(targets, dtype=torch.bool)
        metrics = {"tokens": float(targets.numel())}
        if self.objective in ("mle", "filtering", "conditional"):
            loss = mle_loss(logits, targets, mask)
        elif self.objective == "unlikelihood":
            loss = unlikelihood_loss(logits, targets, mask, reward, threshold=threshold or 0.0,
                                     alpha=self.unlikelihood_alpha, mode=self.unlikelihood_mode)
        elif self.objective == "rwr":
            loss = rwr_loss(logits, targets, mask, reward, awr_beta=self.awr_beta)
        else:
            values = model.value_head(out.hidden_states[-1]).squeeze(-1).float()
            loss, weights = awr_loss(logits, targets, mask, reward, values, alpha=self.awr_alpha,
                                     awr_beta=self.awr_beta)
            metrics["awr_weight_mean"] = float(weights.mean())
            metrics["awr_clamped_fraction"] = float((weights >= 1000.0).float().mean())
        # The corpus NLL, comparable across objectives: filtering's and conditional's loss is
        # already that mean, and a second log-softmax over the logits costs ~2% of a tiny step.
        if self.objective in ("filtering", "conditional"):
            metrics["nll"] = float(loss.detach())
        elif self.objective != "mle":
            metrics["nll"] = float(-token_log_probs(logits.detach(), targets).mean())
        return loss, metrics

    def _posterior(self, target: Target, context: Any, corpus: Corpus, data: PreparedData,
                   model: torch.nn.Module, history: list[dict], run: dict) -> Posterior:
        """The trained LM as a `Posterior`; conditional training samples given ``<|good|>``."""
        tokenizer = data.tokenizer
        if self.objective == "conditional":
            good, bad = tokenizer.convert_tokens_to_ids([GOOD_TOKEN, BAD_TOKEN])
            every = self.conditional_decoding == "every_segment"
            policy = CausalLM(model, tokenizer, max_new_tokens=self.max_new_tokens,
                              adaptors=(BanTokens((bad,) if every else (good, bad)),),
                              prompt=tokenizer.eos_token + GOOD_TOKEN,
                              hidden_tokens=(good,) if every else ())
        else:
            policy = CausalLM(model, tokenizer, max_new_tokens=self.max_new_tokens)
        with seeded(self.seed):
            samples = policy.sample_batch(self.eval_samples)
        config = {"objective": self.objective, "threshold_quantile": self.threshold_quantile,
                  "conditional_decoding": self.conditional_decoding,
                  **{k: v for k, v in data.meta.items() if k not in ("identity", "dtype")},
                  **{k: getattr(self, k) for k in _RUN_OPTIONS}, **run}
        # Factor sites read the samples as the corpus encodes text (the prior has no log a, so
        # only expectations of the factors are estimated); each sample is a document of its own.
        texts = samples.text
        diagnostics = evaluate(target, corpus.sequences(texts, [(t, 0) for t in texts]),
                               context=context)
        return Posterior(samples, engine=f"Pretraining[{self.objective}]", diagnostics=diagnostics,
                         target=target, context=context, policy=policy, law=policy.log_prob,
                         history=history, config=config)


@torch.no_grad()
def _heldout_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int,
                  device: torch.device) -> float:
    """Mean next-token NLL (nats/token) of fixed held-out blocks, in batches: `mle_loss`."""
    total = 0.0
    for chunk in blocks.split(batch_size):
        chunk = chunk.to(device)
        inputs, targets = chunk[:, :-1], chunk[:, 1:]
        # An explicit all-ones mask: packed blocks have no padding (EOS is also the pad token).
        logits = model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits
        mask = torch.ones_like(targets, dtype=torch.bool)
        total += float(mle_loss(logits, targets, mask)) * len(chunk)
    return total / len(blocks)
