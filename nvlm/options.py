"""Command-line options made from a settings dataclass, so that each option is defined once.

A field becomes ``--field-name`` (underscores as dashes) with the field's default, its type (``int``,
``float`` or ``str``, optional or not; a ``bool`` is a switch) and ``help`` / ``choices`` / ``flag`` (another
option name) from its metadata. ``from_args`` builds the dataclass back from the parsed options.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, field, fields
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")
_TYPES: dict[str, type] = {"int": int, "float": float, "str": str}


def option(default: Any = MISSING, help: str | None = None, **metadata: Any) -> Any:
    """A dataclass field with its command-line help (and optionally ``choices``, ``flag``)."""
    return field(default=default, metadata={"help": help, **metadata})


def _flag(f: Field[Any]) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_options(parser: argparse._ActionsContainer, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One option per field of the dataclass ``cls`` that has help in its metadata, except those in ``skip``."""
    for f in fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        kind = str(f.type).replace(" | None", "")
        default = None if f.default is MISSING else f.default
        extra = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        if kind == "bool":
            parser.add_argument(_flag(f), dest=f.name, action="store_true", default=default, help=f.metadata["help"])
        elif kind in _TYPES:
            parser.add_argument(
                _flag(f), dest=f.name, type=_TYPES[kind], default=default, help=f.metadata["help"], **extra
            )
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line option for a {f.type}")


def from_args(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """``cls`` from the parsed options of its fields (those ``add_options`` made), and ``given``."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in given and hasattr(args, f.name)}
    return cls(**values, **given)
