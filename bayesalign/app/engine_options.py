"""The engines ``bayesalign fit`` runs and their options: each engine's dataclass fields, with
the one-line comment beside each field in the engine's source as its ``--help`` text.

The docs stay in one place, the engine's source (TRL-style: a field, its default, a comment):
they are read from it with `ast` and `tokenize`, so a new field documented there is documented
here. A field's ``metadata["help"]`` (transformers' ``HfArg``), where an engine sets one, wins.
Fields whose type a command line cannot spell (a policy, a proposal distribution, a twist
callable) are left out of the CLI and listed as such in ``--help``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from functools import cache
from typing import Any, Literal, Union

from bayesalign.errors import ConfigError

# CLI name -> class in bayesalign.inference. ``cdpg`` is DPG fitted over several contexts (SPEC
# §2.5): the same class, run with fit(target, contexts=...).
ENGINES = {
    "exact": "Exact",
    "rejection": "Rejection",
    "qrs": "QRS",
    "importance": "Importance",
    "best_of_n": "BestOfN",
    "smc": "SMC",
    "dpg": "DPG",
    "cdpg": "DPG",
    "klrl": "KLRL",
}
SCALARS = (bool, int, float, str)


def nearest(name: str, valid: typing.Iterable[str]) -> str:
    """``"; did you mean a, b?"`` for the valid names closest to ``name`` (difflib), or ``""``."""
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def engine_class(name: str) -> type:
    """The engine class of a CLI engine name; an unknown name names the nearest valid ones."""
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}{nearest(name, ENGINES)} "
                          f"(engines: {', '.join(ENGINES)})")
    from bayesalign import inference

    return getattr(inference, ENGINES[name])


@dataclasses.dataclass(frozen=True)
class Option:
    """One engine option as the CLI sees it: its name, the type a command line can give, its
    default and its one-line doc."""

    name: str
    type: Any  # bool, int, float, str, a Literal, or Optional of one of them
    default: Any
    doc: str

    @property
    def optional(self) -> bool:
        return type(None) in typing.get_args(self.type)

    @property
    def base(self) -> Any:
        """The type without ``None``."""
        members = [t for t in typing.get_args(self.type) if t is not type(None)]
        return members[0] if self.optional else self.type


def _cli_type(hint: Any) -> Any | None:
    """The type a command line can give for a field of type ``hint``, or None if none can.

    A union keeps its scalar members when there is one (SMC's ``proposal: Distribution | str |
    None`` is a string on the CLI: ``"twisted"``) and keeps ``None`` as a config-file value.
    """
    if hint in SCALARS or typing.get_origin(hint) is Literal:
        return hint
    if typing.get_origin(hint) in (Union, types.UnionType):
        members = typing.get_args(hint)
        scalars = [t for t in members if t in SCALARS or typing.get_origin(t) is Literal]
        if len(scalars) != 1:
            return None
        return scalars[0] | None if type(None) in members else scalars[0]
    return None


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's trailing ``# comment`` in the source of ``cls`` and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        comments = {token.start[0]: token.string.lstrip("#").strip()
                    for token in tokenize.generate_tokens(io.StringIO(source).readline)
                    if token.type == tokenize.COMMENT}
        (node,) = ast.parse(source).body
        for statement in node.body:
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                if statement.end_lineno in comments:
                    docs[statement.target.id] = comments[statement.end_lineno]
    return docs


@cache
def engine_fields(cls: type) -> tuple[tuple[Option, ...], tuple[tuple[str, str], ...]]:
    """The options of ``cls`` a command line can give, and (name, type) of those it cannot."""
    # Engines import some option types for type checking only (they would load transformers).
    from bayesalign.models.lora_options import LoraOptions

    hints = typing.get_type_hints(cls, localns={"LoraOptions": LoraOptions})
    docs = field_docs(cls)
    options, left_out = [], []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        cli_type = _cli_type(hints[field.name])
        if cli_type is None:
            left_out.append((field.name, _type_name(hints[field.name])))
            continue
        default = field.default if field.default is not dataclasses.MISSING \
            else field.default_factory()  # type: ignore[misc]
        doc = field.metadata.get("help") or docs.get(field.name, "")
        options.append(Option(field.name, cli_type, default, doc))
    return tuple(options), tuple(left_out)


def _type_name(hint: Any) -> str:
    """``SequenceDistribution | None`` rather than ``bayesalign.distribution.Seq…``."""
    return re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", getattr(hint, "__name__", None) or str(hint))


def options_dataclasses(cls: type) -> list[type]:
    """Dataclasses of the CLI options of engine ``cls`` for transformers' `HfArgumentParser`,
    one per class that declares some (``--help`` groups them: the engine's own, the training
    loop's, the divergence monitor's), each field with ``metadata["help"]``."""
    options, _ = engine_fields(cls)
    by_title: dict[str, list] = {}
    for o in options:
        # A private base (Rejection's _AcceptReject) is part of the engine's own group.
        klass = next(k for k in cls.__mro__ if o.name in vars(k).get("__annotations__", {}))
        title = cls.__name__ if klass.__name__.startswith("_") else klass.__name__
        help_text = (o.doc or "(no comment on this field in its engine)").replace("%", "%%")
        by_title.setdefault(title, []).append(
            (o.name, o.type, dataclasses.field(default=o.default, metadata={"help": help_text})))
    order = [k.__name__ for k in cls.__mro__]  # the engine's own options first
    groups = []
    for title, fields in sorted(by_title.items(), key=lambda item: order.index(item[0])):
        group = dataclasses.make_dataclass(f"{title}Options", fields)
        group._argument_group_name = f"{title} options"
        groups.append(group)
    return groups


def check_value(option: Option, value: Any, where: str) -> Any:
    """``value`` from a config file, checked against the option's type (ints become floats)."""
    base = option.base
    if value is None and option.optional:
        return None
    if typing.get_origin(base) is Literal:
        if value in typing.get_args(base):
            return value
        expected = " or ".join(repr(v) for v in typing.get_args(base))
    elif base is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    else:
        expected = base.__name__
    if option.optional:
        expected += " or null"
    raise ConfigError(f"{where}: option {option.name!r} must be {expected}, got {value!r}")

