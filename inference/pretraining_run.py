"""``bayesalign pretrain`` as a function: `Pretraining` run into a folder.

Without a target it is maximum likelihood on a `Corpus` training split (by default this
Python's standard library, ``.py`` files cut into top-level definitions) through a target with
no factor sites, measured on the held-out split: a ``from_pretrained`` folder with
``MODEL_CARD.md`` and ``card.json``. With ``--target FILE.py:NAME`` (a target declared in Python,
as uvicorn names an app) any PHF objective trains on that target's Corpus. Every run writes
``pretraining.json`` (options, absolute thresholds, diagnostics) and ``training/history.csv``;
``training/`` also holds the prepared data and the checkpoints a rerun resumes from.

Every process of ``accelerate launch -m bayesalign pretrain …`` runs this same function; only
the main one prepares the data and writes files.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shlex
import shutil
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pyro
import torch

import bayesalign as ba
from bayesalign.errors import ConfigError
from bayesalign.models.corpus_prior import Corpus
from bayesalign.models.pretraining.card import model_card, write_card
from bayesalign.models.pretraining.presets import PRESETS
from bayesalign.targets import Target
from bayesalign.training.history import history_to_csv

from .pretraining import Pretraining


def load_target(spec: str) -> Target:
    """The `Target` named by ``FILE.py:NAME`` or ``package.module:NAME``."""
    location, _, name = spec.rpartition(":")
    if not location or not name:
        raise ConfigError(f"--target {spec!r}: write FILE.py:NAME or module:NAME")
    if location.endswith(".py"):
        path = Path(location).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"--target {spec!r}: no such file {path}")
        module_name = f"_bayesalign_target_{path.stem}"
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
        loader.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(location)
        except ModuleNotFoundError as error:
            raise ConfigError(f"--target {spec!r}: cannot import {location!r} ({error})") from None
    found = getattr(module, name, None)
    if not isinstance(found, Target):
        targets = sorted(k for k, v in vars(module).items() if isinstance(v, Target))
        what = "is not a @ba.target" if found is not None else "is not defined"
        raise ConfigError(f"--target {spec!r}: {name!r} {what} in {location}; targets there: "
                          f"{', '.join(targets) or 'none'}")
    return found


def corpus_target(corpus: Corpus) -> Target:
    """The target whose posterior is the corpus itself: its prior site and no factor sites."""

    def corpus_only() -> None:
        pyro.sample("y", corpus)

    return ba.target(corpus_only)


def pretrain(output: str | Path, *, corpus: str | Path | None = None, target: str | None = None,
             heldout_fraction: float = 0.05, resume: bool = True, command: str | None = None,
             **options: Any) -> Path:
    """Train `Pretraining` (``options``: its options; ``objective`` "mle" unless given) on
    ``target`` (``FILE.py:NAME``) or, without one, by MLE on the training split of ``corpus``
    (None: the standard library); write the run folder ``output`` and return it."""
    from accelerate import PartialState

    objective = options.setdefault("objective", "mle")
    if target is None and objective != "mle":
        raise ConfigError(f"--objective {objective} needs --target FILE.py:NAME: its "
                          "factor sites score the corpus's segments")
    if target is not None and corpus is not None:
        raise ConfigError("--corpus cannot be combined with --target: the corpus is the target's "
                          "Corpus prior")
    prior = None
    if target is None:
        prior = Corpus(corpus, segment="document", split="train", seed=options.get("seed", 0),
                       heldout_fraction=heldout_fraction, segment_python=True)
        found = corpus_target(prior)
        # The preset's warm-up, as the bundled prior was trained, and a held-out curve for the card.
        options.setdefault("warmup_steps", PRESETS[options.get("preset", "tiny")].warmup_steps)
        options.setdefault("eval_every", 50)
    else:
        found = load_target(target)
    output = Path(output)
    work = output / "training"
    state = PartialState(cpu=not torch.cuda.is_available())
    if not resume and state.is_main_process:
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        (work / "pretrain.json").unlink(missing_ok=True)
    state.wait_for_everyone()
    _refuse_old_checkpoints(work)
    engine = Pretraining(**{"max_grad_norm": 1.0, "checkpoint_dir": str(work / "checkpoints"),
                            "data_dir": str(work / "data"), **options})
    posterior = engine.fit(found)
    if state.is_main_process:
        _write(output, engine, posterior, target, command or shlex.join(sys.argv), prior)
    state.wait_for_everyone()
    return output


def _refuse_old_checkpoints(work: Path) -> None:
    """Checkpoints of the ``bayesalign pretrain`` before it was `Pretraining` cannot resume."""
    if (work / "pretrain.json").exists() and any((work / "checkpoints").glob("checkpoint-*")):
        raise ConfigError(
            f"{work}: its checkpoints were written by an earlier bayesalign pretrain (see "
            f"{work / 'pretrain.json'}), whose data files and checkpoint identity this version "
            "does not read; pass --no-resume to discard them (the data are prepared again) or "
            "choose another --output"
        )


def _write(output: Path, engine: Pretraining, posterior: Any, target: str | None, command: str,
           corpus: Corpus | None) -> None:
    """The model and tokenizer, history.csv, pretraining.json and, for a corpus run, its card."""
    posterior.policy.model.save_pretrained(str(output))
    (output / "model.safetensors").chmod(0o644)  # written 0600, unreadable once installed
    posterior.policy.tokenizer.save_pretrained(str(output))
    history_to_csv(posterior.history, output / "training" / "history.csv")
    record = {"command": command, "target": target, "config": posterior.config,
              "diagnostics": posterior.diagnostics.as_dict(),
              "samples": posterior.samples.text[:8]}
    (output / "pretraining.json").write_text(json.dumps(record, indent=1, default=str))
    if corpus is not None:
        options = {f.name: getattr(engine, f.name) for f in fields(engine) if f.name != "policy"}
        options.update(corpus=corpus.source.name, heldout_fraction=corpus.heldout_fraction)
        write_card(output, model_card(output, posterior, corpus, options, command))
    print(posterior.summary())
