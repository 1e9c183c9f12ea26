"""``FILE.py:TARGET``: the target a user declared in a Python file, a `Target` or a function of
no arguments returning one, loaded with errors that point at the user's code, not ours."""

from __future__ import annotations

import importlib.util
import inspect
import sys
import traceback
from pathlib import Path
from types import ModuleType, TracebackType

from bayesalign.errors import ConfigError
from bayesalign.targets import Target


class TargetFileError(ConfigError):
    """The target file raised: the message is its own traceback, from its first frame on."""


def load_target(spec: str) -> Target:
    """The `Target` named by ``FILE.py:TARGET`` (a `Target`, or a function that returns one)."""
    location, colon, name = spec.rpartition(":")
    if not colon:
        location, name = spec, ""
    path = Path(location).expanduser().resolve()
    if not location.endswith(".py"):
        raise ConfigError(f"target {spec!r}: write FILE.py:TARGET")
    if not path.is_file():
        raise ConfigError(f"target {spec!r}: no such file {path}")
    module = _import(path)
    if not name:
        raise ConfigError(f"target {spec!r} names no target: write {location}:TARGET; "
                          f"{_listing(module)}")
    if name not in vars(module):
        raise ConfigError(f"target {spec!r}: {location} defines no {name!r}; {_listing(module)}")
    found = vars(module)[name]
    if isinstance(found, Target):
        return found
    if not callable(found):
        raise ConfigError(f"target {spec!r}: {name!r} is a {type(found).__name__}, not a Target "
                          f"or a function returning one; {_listing(module)}")
    try:
        made = found()
    except Exception as error:
        raise TargetFileError(f"target {spec!r}: {name}() raised:\n"
                              f"{_user_traceback(error, path)}") from None
    if not isinstance(made, Target):
        raise ConfigError(f"target {spec!r}: {name}() returned a {type(made).__name__}, not a "
                          f"Target (decorate the model with @ba.target)")
    return made


def _import(path: Path) -> ModuleType:
    """Run the file as a module registered under a private name (dataclasses and pickling look
    modules up in ``sys.modules``)."""
    module_name = f"_bayesalign_target_{path.stem}"
    loader = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader)
    sys.modules[module_name] = module
    try:
        loader.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise TargetFileError(f"{path} raised on import:\n{_user_traceback(error, path)}") from None
    return module


def _user_traceback(error: BaseException, path: Path) -> str:
    """The traceback of ``error`` from the first frame in the user's file (ours dropped); a
    syntax error, which has no frame there, is shown as Python shows it (file, line, caret)."""
    tb: TracebackType | None = error.__traceback__
    while tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve() != path:
        tb = tb.tb_next
    if tb is None:
        return "".join(traceback.format_exception_only(type(error), error)).rstrip()
    return "".join(traceback.format_exception(type(error), error, tb)).rstrip()


def _listing(module: ModuleType) -> str:
    """What the file offers: its `Target` objects and its functions annotated to return one."""
    targets = sorted(k for k, v in vars(module).items() if isinstance(v, Target))
    makers = sorted(k for k, v in vars(module).items()
                    if inspect.isfunction(v) and v.__module__ == module.__name__
                    and "Target" in str(v.__annotations__.get("return", "")))
    found = [*targets, *(f"{k}()" for k in makers)]
    return f"targets there: {', '.join(found)}" if found else "it declares no Target"
