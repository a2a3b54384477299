"""A setting declared once: its default, its help and its command-line flag live on the dataclass field.

`knob(default, help, ...)` is a dataclasses.field whose metadata the CLI reads to make its flags (cli.py) and the
app reads for its widgets' help, so that a new setting is one field, not a field plus a flag plus a widget text
that each repeat the default. A method's own options are a dataclass of knobs too (options.py); each becomes a
flag group of its own and a box of widgets (a knob's `widget`).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple


class Widget(NamedTuple):
    """How the app shows a knob (studio/ui.options_box): a number box by default, a slider, or for a knob with
    choices a radio; a bool is a checkbox. Declared here, drawn there: this module imports no UI."""

    label: str
    lo: float | None = None
    hi: float | None = None
    step: float | None = None
    format: str | None = None  # printf-style, e.g. "%.3f"
    slider: bool = False


def knob(default=dataclasses.MISSING, help: str = "", flag: str | None = None, kind: str | None = None,
         choices=None, cli: bool = True, default_factory=dataclasses.MISSING, widget: Widget | None = None):
    """A dataclass field with its help text and flag. `flag` defaults to --name-with-dashes; `kind` names the
    parser type ("positive", "ratio", "float", "int", "str"; default: the default's type); `choices` is a
    callable giving the allowed values when the parser is built (registries may grow); `cli=False` keeps it
    off the command line; `widget` is how the app draws it (a knob without one is not in the app)."""
    meta = {"help": help, "flag": flag, "kind": kind, "choices": choices, "cli": cli, "widget": widget}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def knobs_in_order(cls) -> list[dataclasses.Field]:
    """A dataclass's fields in the order a person reads them, in its flag group and its box of widgets: its own
    first, then those it inherits (block tuning's and distillation's epochs before the AdamW schedule they share)."""
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name not in inherited] + [f for f in fields if f.name in inherited]


def help_of(cls, name: str) -> str:
    """The help text of field `name` of dataclass `cls`."""
    return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)


def default_of(cls, name: str):
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default
