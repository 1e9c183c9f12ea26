"""Renamed options: an old keyword keeps working for one release, with a `DeprecationWarning`."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TypeVar

from .errors import ConfigError

C = TypeVar("C", bound=type)


def renamed_options(**renames: str) -> Callable[[C], C]:
    """Class decorator mapping ``old=new`` keyword names of the constructor.

    >>> @renamed_options(eval_samples="diagnostic_samples")     # doctest: +SKIP
    ... @dataclass
    ... class Engine: diagnostic_samples: int = 4096

    ``Engine(eval_samples=8)`` warns and sets ``diagnostic_samples``; giving both is refused.
    """

    def wrap(cls: C) -> C:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs) -> None:
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise ConfigError(f"{cls.__name__}: {old}= is the old name of {new}=; "
                                      f"give {new}= only")
                warnings.warn(f"{cls.__name__}({old}=...) is deprecated and will be removed in "
                              f"the next release; use {new}=", DeprecationWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        return cls

    return wrap
