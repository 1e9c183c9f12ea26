"""``bayesalign fit FILE.py:TARGET --engine NAME [options] --output DIR``: any declared target,
any engine, its options parsed from its dataclass fields by transformers' `HfArgumentParser`,
also from a YAML or JSON ``--config`` file (flags override it); the run folder is `run_folder`'s.

Parsing is two passes: the first finds ``--engine`` and ``--config`` (on the command line or in
the file), the second parses everything with the engine's options, so ``--help`` after
``--engine NAME`` lists that engine's options and an unknown flag is named against them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bayesalign.errors import BayesAlignError, ConfigError

from . import run_folder
from .engine_options import (
    ENGINES,
    check_value,
    engine_class,
    engine_fields,
    nearest,
    options_dataclasses,
)

# Keys of a config file (and of a run's config.json) that are not engine options.
RUN_KEYS = ("engine", "target", "output", "contexts")
PROG = "bayesalign fit"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every option's help; the description and epilog as written."""


def _run_arguments(parser: argparse.ArgumentParser, with_positional: bool = True) -> None:
    """What every fit has, whatever the engine."""
    group = parser.add_argument_group("run")
    if with_positional:
        group.add_argument("target", nargs="?", metavar="FILE.py:TARGET",
                           help="a Target in FILE.py, or a function there returning one")
    group.add_argument("--engine", metavar="NAME", help=f"one of {', '.join(ENGINES)}")
    group.add_argument("--output", metavar="DIR", help="the run folder (a killed learned run "
                       "resumes from it)")
    group.add_argument("--config", metavar="FILE.yaml|FILE.json",
                       help="engine options (and engine, target, output, contexts) from a file; "
                       "flags given here override it")
    group.add_argument("--context", action="append", metavar="TEXT", help="a context to "
                       "condition on (repeat for several: policy engines train amortised over "
                       "them; cdpg needs at least one); a config file's contexts may be any JSON")


def read_config(path: str) -> dict[str, Any]:
    """A config file's mapping; a file that does not parse is named with the line and column."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = file.read_text()
    if file.suffix == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--config {path}: not valid JSON at line {error.lineno}, column "
                              f"{error.colno}: {error.msg}") from None
    elif file.suffix in (".yaml", ".yml"):
        import yaml

        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"--config {path}: not valid YAML: {_yaml_problem(error)}") from None
    else:
        raise ConfigError(f"--config {path}: give a .yaml, .yml or .json file")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"--config {path}: the file must hold a mapping of option: value, "
                          f"not a {type(value).__name__}")
    return value


def _yaml_problem(error: Exception) -> str:
    """PyYAML's problem and where (1-based line and column), and what it was parsing."""
    parts = []
    for text, mark in (("context", "context_mark"), ("problem", "problem_mark")):
        text, mark = getattr(error, text, None), getattr(error, mark, None)
        if text:
            parts.append(f"{text} at line {mark.line + 1}, column {mark.column + 1}" if mark
                         else text)
    return "; ".join(parts) or str(error)


def _checked_config(config: dict[str, Any], engine: str, path: str) -> dict[str, Any]:
    """The config file's engine options, each checked against its type; an unknown key is
    named with the nearest valid ones."""
    options = {o.name: o for o in engine_fields(engine_class(engine))[0]}
    checked = {}
    for key, value in config.items():
        if key in RUN_KEYS:
            continue
        if key not in options:
            raise ConfigError(f"--config {path}: {engine} has no option {key!r}"
                              f"{nearest(key, [*options, *RUN_KEYS])}")
        checked[key] = check_value(options[key], value, f"--config {path}")
    contexts = config.get("contexts")
    if contexts is not None and (not isinstance(contexts, list) or not contexts):
        raise ConfigError(f"--config {path}: contexts must be a non-empty list, got {contexts!r}")
    for key in ("engine", "target", "output"):
        if key in config and not isinstance(config[key], str):
            raise ConfigError(f"--config {path}: {key} must be a string, got {config[key]!r}")
    return checked


def _engine_parser(engine: str) -> argparse.ArgumentParser:
    cls = engine_class(engine)
    _, left_out = engine_fields(cls)
    epilog = ""
    if left_out:
        listed = "\n".join(f"  {name}: {kind}" for name, kind in left_out)
        epilog = (f"{cls.__name__} options a command line cannot give (objects, not values; set "
                  f"them in Python):\n{listed}")
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        options_dataclasses(cls), prog=PROG, allow_abbrev=False, formatter_class=_Formatter,
        usage=f"{PROG} FILE.py:TARGET --engine {engine} [options] --output DIR",
        description=f"--engine {engine}: {(cls.__doc__ or '').strip().splitlines()[0]}",
        epilog=epilog)
    _run_arguments(parser)
    return parser


def _unknown(parser: argparse.ArgumentParser, remaining: list[str], engine: str) -> None:
    flags = [s for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")]
    for item in remaining:
        if item.startswith("-"):
            flag = item.split("=", 1)[0]
            parser.error(f"{engine} has no option {flag}{nearest(flag, flags)}")
    parser.error(f"unexpected argument(s): {' '.join(remaining)}")


def parse(argv: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """The engine name and the run: target, output, contexts and the engine's options."""
    first = argparse.ArgumentParser(
        prog=PROG, add_help=False, allow_abbrev=False,
        usage=f"{PROG} FILE.py:TARGET --engine NAME [options] --output DIR",
        description="Run an engine on a declared target and write a run folder; "
        "`bayesalign fit --engine NAME --help` lists that engine's options.")
    _run_arguments(first, with_positional=False)
    first.add_argument("-h", "--help", action="store_true",
                       help="this help; with --engine NAME, that engine's options")
    known, _ = first.parse_known_args(argv)
    config = read_config(known.config) if known.config else {}
    engine = known.engine or config.get("engine")
    if engine is None:
        if known.help:
            first.print_help()
            raise SystemExit(0)
        raise ConfigError(f"give --engine NAME (one of {', '.join(ENGINES)}); "
                          "`bayesalign fit --engine NAME --help` lists its options")
    engine_class(engine)  # an unknown engine is named against the valid ones
    options = _checked_config(config, engine, known.config) if config else {}
    parser = _engine_parser(engine)
    parser.set_defaults(**options, target=config.get("target"), output=config.get("output"))
    *groups, run, remaining = parser.parse_args_into_dataclasses(
        list(argv), return_remaining_strings=True, look_for_args_file=False)
    if remaining:
        _unknown(parser, remaining, engine)
    merged = {k: v for group in groups for k, v in asdict(group).items()}
    contexts = run.context if run.context is not None else config.get("contexts")
    if run.target is None:
        parser.error("give the target: bayesalign fit FILE.py:TARGET --engine ...")
    if run.output is None:
        parser.error("give --output DIR, the run folder")
    if engine == "cdpg" and not contexts:
        parser.error("cdpg fits DPG over several contexts: give them with --context (repeat it) "
                     "or a config file's contexts: [...]")
    return engine, {"target": run.target, "output": run.output, "contexts": contexts,
                    "options": merged}


def fit_run(engine: str, run: dict[str, Any], argv: Sequence[str]) -> Path:
    """Load the target, build the engine, prepare the folder, fit, write the results."""
    from .target_file import load_target

    cls = engine_class(engine)
    output = Path(run["output"])
    options = dict(run["options"])
    # A learned engine checkpoints inside the folder; config.json keeps the option as given, so
    # that a rerun from it with another --output checkpoints there, not here.
    if "checkpoint_dir" in options and options["checkpoint_dir"] is None:
        options["checkpoint_dir"] = str(output / run_folder.CHECKPOINTS)
    target = load_target(run["target"])
    fitter = cls(**options)  # checks the options' values before any folder is made
    contexts = run["contexts"]
    config = {"engine": engine, "target": run["target"],
              **({"contexts": contexts} if contexts else {}), **run["options"]}
    run_folder.check(output, config)
    main = _is_main_process()
    if main:
        run_folder.start(output, config)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    if engine == "cdpg" or (contexts and len(contexts) > 1):
        posterior = fitter.fit(target, contexts=contexts)
    elif contexts:
        posterior = fitter.fit(target, contexts[0])
    else:
        posterior = fitter.fit(target)
    if main:
        from .cli import versions

        run_folder.write(output, posterior, {
            "command": shlex.join(["bayesalign", "fit", *argv]), "started": started,
            "processes": int(os.environ.get("WORLD_SIZE", "1")), "versions": versions()})
    return output


def _is_main_process() -> bool:
    """Rank 0 writes the folder under ``accelerate launch``; a plain run is its own rank 0."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return True
    import torch
    from accelerate import PartialState

    # As the Trainer's Accelerator: on CPUs a state made without cpu=True is not distributed,
    # and the shared state made first is the one every later Accelerator gets.
    return PartialState(cpu=not torch.cuda.is_available()).is_main_process


def main(argv: Sequence[str]) -> int:
    """``bayesalign fit``: 0 on success, 2 for bad input, 1 when the fit itself fails."""
    try:
        engine, run = parse(argv)
        output = fit_run(engine, run, argv)
    except ConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except BayesAlignError as error:
        print(f"{PROG}: error: {error}\n{run['output']} is left unfinished (no "
              f"{run_folder.COMPLETE}).", file=sys.stderr)
        return 1
    if _is_main_process():
        print(f"Wrote the {engine} run to {output}; `bayesalign show {output}` prints its "
              "diagnostics")
    return 0


def show_main(folder: str) -> int:
    """``bayesalign show DIR``: the diagnostics table of a finished run."""
    try:
        print(run_folder.show(Path(folder)))
    except ConfigError as error:
        print(f"bayesalign show: error: {error}", file=sys.stderr)
        return 2
    return 0
