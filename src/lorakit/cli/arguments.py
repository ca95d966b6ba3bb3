"""Command-line flags built from a config dataclass's `option` fields (lorakit.options), so that every default
and help text is stated once, on the config, and every --help shows the defaults.

Only the flags typed on the command line reach the namespace (argparse.SUPPRESS): the config's own defaults fill
in the rest, and a command can tell the flags given from the values left alone (`given_values`), as
`lorakit finetune --resume` does to take the others from the run it continues.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from lorakit.options import flag_of

__all__ = ["add_config_flags", "config_from_args", "given_values"]


def add_config_flags(
    parser: argparse.ArgumentParser, config_class: type, headings: tuple[str, ...] = (), required: bool = True
) -> None:
    """Adds a flag for each `option` field of `config_class`, in field order, under its group's heading;
    `headings` lists the groups in the order --help shows them (the others follow in order of appearance).
    A field without a default is a required flag; with `required=False` it is not, and `config_from_args` refuses
    its absence instead, unless the command supplies the value."""
    groups: dict[str | None, Any] = {None: parser}
    for heading in headings:
        groups[heading] = parser.add_argument_group(heading)
    exclusive: dict[str, Any] = {}
    for field in dataclasses.fields(config_class):
        meta = field.metadata.get("option")
        if meta is None:
            continue
        group_name = meta["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        target = groups[group_name]
        if meta["exclusive"]:
            if meta["exclusive"] not in exclusive:
                exclusive[meta["exclusive"]] = target.add_mutually_exclusive_group()
            target = exclusive[meta["exclusive"]]
        flags = meta["flags"] or (flag_of(config_class, field.name),)
        kwargs: dict[str, Any] = {"dest": field.name, "help": _help(field, meta), "default": argparse.SUPPRESS}
        if isinstance(field.default, bool):
            kwargs["action"] = "store_false" if field.default else "store_true"
        else:
            kwargs.update(required=required and field.default is dataclasses.MISSING, metavar=meta["metavar"])
            kwargs.update(choices=meta["choices"], type=meta["type"] or _value_type(field.default))
        target.add_argument(*flags, **kwargs)


def given_values(config_class: type, args: argparse.Namespace) -> dict[str, Any]:
    """{field: value} of the flags given on the command line, each value through its field's `parse`."""
    values = {}
    for field in dataclasses.fields(config_class):
        meta = field.metadata.get("option")
        if meta is not None and hasattr(args, field.name):
            value = getattr(args, field.name)
            values[field.name] = meta["parse"](value) if meta["parse"] and value is not None else value
    return values


def config_from_args(config_class: type, args: argparse.Namespace, base: dict[str, Any] | None = None) -> Any:
    """The config the flags describe: the flags given, over `base` ({field: value}, say a saved run's), over the
    config's own defaults.

    Raises:
        ValueError: a field without a default that neither a flag nor `base` gives (only with flags added with
            `required=False`: argparse refuses the others itself).
    """
    values = {**(base or {}), **given_values(config_class, args)}
    missing = [
        flag_of(config_class, field.name)
        for field in dataclasses.fields(config_class)
        if field.default is dataclasses.MISSING
        and field.default_factory is dataclasses.MISSING
        and field.name not in values
    ]
    if missing:
        raise ValueError(f"the following arguments are required: {', '.join(missing)}")
    return config_class(**values)


def _help(field: dataclasses.Field, meta: dict[str, Any]) -> str:
    """The flag's help with its default; "%" doubled, since argparse formats help text with it."""
    text = meta["help"]
    if field.default is not dataclasses.MISSING and not isinstance(field.default, bool):
        if meta["default_text"] is not None:
            shown = meta["default_text"]
        elif isinstance(field.default, float):
            shown = f"{field.default:g}"
        else:
            shown = str(field.default)
        text = f"{text} (default: {shown})"
    return text.replace("%", "%%")


def _value_type(default: Any) -> type:
    if isinstance(default, int | float):
        return type(default)
    return str
