"""A setting declared once: its default, its help and its command-line flag live on the dataclass field.

`knob(default, help, ...)` is a dataclasses.field whose metadata the CLI reads to make its flags (cli.py) and the
app reads for its widgets' help, so that a new setting is one field, not a field plus a flag plus a widget text
that each repeat the default. A nested settings dataclass (Dobi-SVD's DobiConfig inside Settings) is a field
too; its own knobs become flags of their own group.
"""
from __future__ import annotations

import dataclasses


def knob(default=dataclasses.MISSING, help: str = "", flag: str | None = None, kind: str | None = None,
         choices=None, cli: bool = True, default_factory=dataclasses.MISSING):
    """A dataclass field with its help text and flag. `flag` defaults to --name-with-dashes; `kind` names the
    parser type ("positive", "ratio", "float", "int", "str"; default: the default's type); `choices` is a
    callable giving the allowed values when the parser is built (registries may grow); `cli=False` keeps it
    off the command line."""
    meta = {"help": help, "flag": flag, "kind": kind, "choices": choices, "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def help_of(cls, name: str) -> str:
    """The help text of field `name` of dataclass `cls`."""
    return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)


def default_of(cls, name: str):
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default
