"""A method's own options: one frozen dataclass of knobs (knobs.py), declared beside the method that reads it and
registered under the name that owns it (a scaling's name, Dobi-SVD's "dobi", block tuning's "tune").

Settings (methods/settings.py) holds one instance of every registered group; the CLI makes a flag group of each
(cli/args.py) and the app a box of widgets (studio/ui.options_box), both from the dataclass's fields. So a new
option is one field of its owner's dataclass, and a new method with options of its own is its dataclass plus one
`register_options` where the method is registered; no list elsewhere names them. The pattern is transformers'
quantization configs and llm-compressor's modifiers, whose own fields are their config.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import DipSVDError


@dataclass(frozen=True)
class OptionGroup:
    """One registered options dataclass: `name` is its key in Settings (settings.<name>) and the prefix of its flags
    and widget keys; `title` heads its flag group and its box in the app; `redoes` says what a change costs there."""

    name: str
    cls: type
    title: str
    redoes: str = ""  # e.g. "changes refactor": the box's subtitle in the app


OPTION_GROUPS: dict[str, OptionGroup] = {}


def register_options(name: str, cls: type, title: str, redoes: str = "") -> type:
    """Make `cls` (a frozen dataclass whose fields are knobs, with an optional check()) the options `name` owns."""
    if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):
        raise TypeError(f"the options of {name} must be a frozen dataclass (they key caches), got {cls!r}")
    OPTION_GROUPS[name] = OptionGroup(name, cls, title, redoes)
    return cls


def unregister_options(name: str) -> None:
    OPTION_GROUPS.pop(name, None)


def option_group(name: str) -> OptionGroup:
    if name not in OPTION_GROUPS:
        raise DipSVDError(f"no options named '{name}'; registered: {', '.join(OPTION_GROUPS)}")
    return OPTION_GROUPS[name]


def default_options() -> dict:
    """Every registered group at its defaults, by name."""
    return {name: g.cls() for name, g in OPTION_GROUPS.items()}


def check_options(options) -> None:
    """Each group's own check (a group without one has nothing to check)."""
    check = getattr(options, "check", None)
    if check is not None:
        check()


def flag_of(group: str, f: dataclasses.Field) -> str:
    """A group's field's command-line flag: the knob's own, else --<group>-<field> (two groups may share a field
    name)."""
    return f.metadata.get("flag") or f"--{group}-{f.name}".replace("_", "-")
