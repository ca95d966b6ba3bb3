"""The finished points of a study, kept on disk so that an interrupted study resumes where it stopped.

One JSON file per point under `DIR/points/` ("full.json", "lora-r8-seed0.json", "did-256.json", ...), each written
atomically when its training run has finished and been evaluated: a killed study loses at most the run it was in,
and a resumed one reads the others back instead of training them again.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, MutableMapping
from pathlib import Path

from lorakit.io.atomic import write_text_atomic
from lorakit.io.files import read_json_object

__all__ = ["PointStore"]

KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class PointStore(MutableMapping[str, dict]):
    """A dict of points backed by one JSON file each in `directory` (created on the first write).

    Args:
        directory: where the point files live.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        if not isinstance(key, str) or not KEY.fullmatch(key):
            raise KeyError(f"a point's key is letters, digits, '_', '.' and '-', got {key!r}")
        return self.directory / f"{key}.json"

    def __getitem__(self, key: str) -> dict:
        path = self._path(key)
        if not path.is_file():
            raise KeyError(key)
        return read_json_object(path)

    def __setitem__(self, key: str, point: dict) -> None:
        write_text_atomic(self._path(key), json.dumps(point, indent=1, allow_nan=False) + "\n")

    def __delitem__(self, key: str) -> None:
        path = self._path(key)
        if not path.is_file():
            raise KeyError(key)
        path.unlink()

    def __iter__(self) -> Iterator[str]:
        names = sorted(self.directory.glob("*.json")) if self.directory.is_dir() else []
        return iter(path.stem for path in names if KEY.fullmatch(path.stem))

    def __len__(self) -> int:
        return sum(1 for _ in self)
