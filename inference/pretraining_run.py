"""``bayesalign pretrain --objective … --target FILE.py:NAME``: load a target declared in Python
(as uvicorn names an app) and train on it with `Pretraining`, writing a ``from_pretrained``
folder, ``pretraining.json`` (options, absolute thresholds, diagnostics) and ``history.csv``.

Every process of ``accelerate launch -m bayesalign pretrain …`` runs this same function; only
the main one prepares the data and writes files.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from bayesalign.errors import ConfigError
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


def pretrain_target(options: dict[str, Any], command: str) -> Path:
    """Run `Pretraining` with the ``bayesalign pretrain`` options; return the output folder."""
    from accelerate import PartialState

    if options["corpus"] is not None:
        raise ConfigError("--corpus cannot be combined with --target: the corpus is the target's "
                          "Corpus prior")
    target = load_target(options["target"])
    output = Path(options["output"])
    work = output / "training"
    state = PartialState(cpu=not torch.cuda.is_available())
    if not options["resume"] and state.is_main_process:
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
    state.wait_for_everyone()
    engine = Pretraining(
        objective=options["objective"], preset=options["preset"], steps=options["max_steps"],
        seed=options["seed"], batch_size=options["batch_size"] or 16,
        block_size=options["block_size"], learning_rate=options["learning_rate"],
        gradient_accumulation_steps=options["gradient_accumulation_steps"],
        mixed_precision=options["mixed_precision"] or "auto", max_grad_norm=1.0,
        checkpoint_dir=str(work / "checkpoints"), checkpoint_every=options["checkpoint_every"],
        data_dir=str(work / "data"), score_cache=options["score_cache"],
        threshold_quantile=options["threshold_quantile"],
        drop_token_fraction=options["drop_token_fraction"],
        conditional_decoding=options["conditional_decoding"],
        unlikelihood_mode=options["unlikelihood_mode"], awr_alpha=options["awr_alpha"],
        awr_beta=options["awr_beta"], num_samples=options["num_samples"],
    )
    posterior = engine.fit(target)
    if state.is_main_process:
        posterior.policy.model.save_pretrained(str(output))
        posterior.policy.tokenizer.save_pretrained(str(output))
        history_to_csv(posterior.history, work / "history.csv")
        record = {"command": command, "target": options["target"], "config": posterior.config,
                  "diagnostics": posterior.diagnostics.as_dict(),
                  "samples": posterior.samples.text[:8]}
        (output / "pretraining.json").write_text(json.dumps(record, indent=1, default=str))
        print(posterior.summary())
    state.wait_for_everyone()
    return output
