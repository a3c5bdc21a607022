"""Config dataclasses as command-line options: one declaration per option.

A field declared with `option(default, help)` carries its help text; `add_options` turns a
config dataclass's fields into argparse options (`--field-name`, or the field's `flag`),
typed from its annotation: `bool` becomes `--x/--no-x`, a `Literal` a choice, a tuple of
ints a comma-separated list, `X | None` an optional X; a nested config dataclass (the
trainer's `tower`) gets its own call, under a dotted prefix. `given_options` reads back only
the options the user gave, keyed by the field's dotted path, so the defaults stay the
config's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal

NOT_GIVEN = argparse.SUPPRESS  # an option not on the command line is absent from the namespace


def option(default: Any, help: str, *, flag: str | None = None) -> Any:
    """A dataclass field with `default`, documented by `help`; `flag`: the option's name
    when it is not the field's (without the leading dashes)."""
    if isinstance(default, list | dict | set):
        raise TypeError("mutable defaults: use a tuple")
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag})


def add_options(
    group: argparse._ActionsContainer,
    config: type,
    prefix: str = "",
    note: typing.Callable[[str], str] = lambda path: "",
) -> None:
    """One option per field of the dataclass `config` in `group` (a parser or an argument
    group); nested config dataclasses are left to their own call, with `prefix` their field's
    name and a dot. `note(path)` adds to a field's help, e.g. the defaults of a preset."""
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        kind, path = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(kind):
            continue
        name = (f.metadata.get("flag") or f.name).replace("_", "-")
        shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        text = f"{f.metadata.get('help', '')} (default: {shown}{note(path)})"
        kwargs: dict[str, Any] = {"dest": path, "default": NOT_GIVEN, "help": text}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            typed = _typed(kind)
            if "choices" not in typed:
                typed.setdefault("metavar", name.upper().replace("-", "_"))
            kwargs |= typed
        group.add_argument(f"--{name}", **kwargs)


def _typed(kind: Any) -> dict[str, Any]:
    """argparse's `type` / `choices` for a field annotation."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        return {"choices": list(args)}
    if origin in (typing.Union, types.UnionType):  # X | None: an optional X
        (inner,) = [a for a in args if a is not type(None)]
        return _typed(inner)
    if origin is tuple:
        return {"type": _int_list, "metavar": "N,N,..."}
    return {"type": kind}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers") from None


def given_options(args: argparse.Namespace, config: type, prefix: str = "") -> dict[str, Any]:
    """`{dotted field path: value}` of the options of `config` present in `args`."""
    given: dict[str, Any] = {}
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        path = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            given |= given_options(args, hints[f.name], prefix=f"{path}.")
        elif path in vars(args):
            given[path] = vars(args)[path]
    return given
