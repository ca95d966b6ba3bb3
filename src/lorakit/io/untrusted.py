"""Reading what comes from outside in bounded time and memory: JSON, regular expressions from config files, and
sizes that a file's header claims.

A file lorakit reads may be damaged or made to hurt: JSON nested a hundred thousand levels deep (Python's parser
recurses), a 100 MB adapter_config.json, a number of five thousand digits, a pattern that backtracks for ever on
a module name, a header that claims a terabyte. Each is refused here, before the work or the allocation, with one
ValueError that names the file, key or pattern:

- `read_json` / `loads_json`: at most MAX_JSON_BYTES read, MAX_JSON_DEPTH levels, MAX_INT_DIGITS digits a number;
- `fullmatch`: a regular expression matched with the `regex` package's timeout (PATTERN_SECONDS a match);
- `check_memory`: an estimate of what a piece of work allocates against the memory the system has available.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, BinaryIO

import regex

__all__ = [
    "MAX_INT_DIGITS",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "PATTERN_SECONDS",
    "available_memory",
    "check_memory",
    "check_npy",
    "check_pattern",
    "fullmatch",
    "loads_json",
    "read_json",
]

MAX_JSON_BYTES = 16 * 2**20  # a PEFT config is a few kB, a 405B model's shard index a few hundred
MAX_JSON_DEPTH = 64  # PEFT configs are 3 levels deep, chat messages with tool calls about 8
MAX_INT_DIGITS = 100  # past any count, size or seed; Python's own limit (4,300) fails with a hint about sys
PATTERN_SECONDS = 0.2  # one match of one pattern against one module name: microseconds when it is sane


# -- JSON ----------------------------------------------------------------------------------------------------------


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise ValueError(f"a number of {digits} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def loads_json(text: str) -> Any:
    """`json.loads(text)` for text from outside: at most MAX_JSON_DEPTH levels of nesting and MAX_INT_DIGITS
    digits a number.

    Raises:
        json.JSONDecodeError: not valid JSON (as json.loads).
        ValueError: nested too deeply, or a number too long (no JSONDecodeError: the text is valid, and too big).
    """
    try:
        value = json.loads(text, parse_int=_bounded_int)
    except RecursionError:  # the C parser recurses per level and stops at the interpreter's limit (about 1,000)
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    _check_depth(value)
    return value


def _check_depth(value: Any) -> None:
    """Refuses containers nested deeper than MAX_JSON_DEPTH, walking them without recursion."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        pending.extend((child, depth + 1) for child in children)


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in file `path`, its size checked before it is read, its contents through `loads_json`.

    Raises:
        OSError: the file cannot be read (FileNotFoundError, PermissionError, ...: they name it).
        ValueError: larger than `max_bytes`, not UTF-8, not valid JSON, nested too deeply or a number too long,
            naming the file.
    """
    path = Path(path)
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_bytes:
            raise ValueError(f"{path} is {size:,} bytes, more than the {max_bytes:,} a JSON file of lorakit's may be")
        data = handle.read(max_bytes + 1)  # a file that grows while being read is cut off, never read whole
    if len(data) > max_bytes:
        raise ValueError(f"{path} is more than the {max_bytes:,} bytes a JSON file of lorakit's may be")
    try:
        return loads_json(data.decode("utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: not UTF-8 ({error.reason} at byte {error.start})") from None
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


# -- regular expressions -------------------------------------------------------------------------------------------


def check_pattern(pattern: Any, key: str) -> None:
    """Refuses a `pattern` (from config field `key`) that is no string or no valid regular expression, naming both.

    Patterns are compiled by the `regex` package (re's syntax, and a global flag such as "(?i)" anywhere in it).
    """
    if not isinstance(pattern, str):
        raise ValueError(f"{key}: a pattern must be text, got {pattern!r}")
    try:
        regex.compile(pattern)
    except (regex.error, OverflowError, RecursionError) as error:  # a repeat count past C's, a pattern nested deep
        raise ValueError(f"{key}: invalid regular expression {pattern!r}: {error}") from None


def fullmatch(pattern: str, text: str, key: str) -> bool:
    """Whether regular expression `pattern` (from config field `key`) matches the whole of `text`, decided within
    about PATTERN_SECONDS.

    Raises:
        ValueError: an invalid pattern, or one that takes longer than that on `text` (catastrophic backtracking:
            a pattern such as "(a|aa)+b" tries exponentially many ways), naming `key` and the pattern.
    """
    check_pattern(pattern, key)
    try:
        return regex.fullmatch(pattern, text, timeout=PATTERN_SECONDS) is not None
    except TimeoutError:
        raise ValueError(
            f"{key}: the regular expression {pattern!r} takes more than {PATTERN_SECONDS} s to match {text!r} "
            "(it backtracks without end): refused"
        ) from None


# -- memory --------------------------------------------------------------------------------------------------------


def available_memory() -> int | None:
    """The bytes of memory the system can give this process now without swapping (Linux's MemAvailable, else
    the free physical pages), or None where the system does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # Windows and macOS have no such sysconf names
        return None


def check_memory(nbytes: int, what: str) -> None:
    """Refuses work that would allocate about `nbytes` where the system has less memory available, with both
    figures: a clear error before the allocation, instead of a MemoryError traceback or the kernel's OOM killer
    after it.

    Raises:
        ValueError: `nbytes` above `available_memory()`.
    """
    available = available_memory()
    if available is not None and nbytes > available:
        raise ValueError(f"{what} needs about {_size(nbytes)} of memory, and {_size(available)} are available")


def _size(nbytes: int) -> str:
    """A byte count in GB, or MB below one GB (powers of 1000)."""
    return f"{nbytes / 1e9:,.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:,.1f} MB"


def check_npy(handle: BinaryIO, path: Path, copies: int) -> None:
    """Checks the header of the .npy file open in `handle` before its array is read: the data it announces must
    be in the file, and `copies` arrays of its shape in float64 must fit in memory. Leaves `handle` where it was.

    Raises:
        ValueError: not a .npy header, an array larger than the file holds (a damaged or forged header: numpy
            would try to allocate it whole), or more than the memory available.
    """
    import numpy as np

    start = handle.tell()
    try:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(handle)
    except (ValueError, EOFError, OSError) as error:  # not .npy, or a header version this numpy cannot read
        raise ValueError(f"{path} is not a readable .npy array: {error}") from None
    count = math.prod(shape)
    held = os.fstat(handle.fileno()).st_size - handle.tell()
    if count * dtype.itemsize > held:
        raise ValueError(
            f"{path} is not a readable .npy array: its header announces shape {shape} ({count * dtype.itemsize:,} "
            f"bytes), and the file holds {held:,} (damaged or truncated)"
        )
    check_memory(copies * count * 8, f"{path}, an array of shape {shape} in float64")
    handle.seek(start)
