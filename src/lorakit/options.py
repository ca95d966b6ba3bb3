"""Config fields that are also command-line flags, stated once, on the dataclass:

    lr: float = option(2e-4, "AdamW learning rate of A", group="optimization")

`lorakit.cli.arguments` builds each flag from its field: the name (`--lr`, or `flags`), the type, the default
and the help, which always ends with the default. A config's own checks name the flag the user typed
(`flag_of`), so an error reads the same from Python and from the command line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

__all__ = ["flag_of", "option"]


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flags: tuple[str, ...] | None = None,
    metavar: str | None = None,
    group: str | None = None,
    type: Callable[[str], Any] | None = None,
    choices: tuple[Any, ...] | None = None,
    exclusive: str | None = None,
    default_text: str | None = None,
    parse: Callable[[Any], Any] | None = None,
) -> Any:
    """A dataclass field that is also a command-line flag.

    Args:
        default: the field's default; none makes the flag required.
        help: what the flag does, without its default (added from `default`, or `default_text`).
        flags: the flag's names (default: `--field-name`). A boolean that defaults to True gets `--no-NAME`.
        metavar: the value's name in --help.
        group: the --help section the flag is listed under.
        type: how to read the value from text (default: the default's type, else str).
        choices: the values allowed.
        exclusive: flags with the same key exclude each other (say, --epochs and --steps).
        default_text: the default as --help states it, where the value itself says too little (None).
        parse: applied to the flag's value before it reaches the config (say, "q_proj,v_proj" → a list).

    Returns:
        A `dataclasses.field` whose metadata holds the flag.
    """
    metadata = {
        "help": help,
        "flags": flags,
        "metavar": metavar,
        "group": group,
        "type": type,
        "choices": choices,
        "exclusive": exclusive,
        "default_text": default_text,
        "parse": parse,
    }
    return dataclasses.field(default=default, metadata={"option": metadata})


def flag_of(config: Any, name: str) -> str:
    """The command-line flag of field `name` of a config class or instance, as the user types it ("--rank")."""
    field = next(f for f in dataclasses.fields(config) if f.name == name)
    meta = field.metadata.get("option", {})
    if meta.get("flags"):
        return meta["flags"][0]
    prefix = "--no-" if field.default is True else "--"
    return prefix + name.replace("_", "-")
