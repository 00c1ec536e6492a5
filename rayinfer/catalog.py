"""The model catalog: real pretrained models that arrive through the package index.

Filled in by the offline-models work; a catalog name in a spec resolves to a folder in the
model cache (``RAYINFER_HOME``, default ``~/.cache/rayinfer``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str


ENTRIES: dict[str, CatalogEntry] = {}


def home() -> Path:
    return Path(os.environ.get("RAYINFER_HOME", Path.home() / ".cache" / "rayinfer")).expanduser()


def model_dir(name: str) -> Path:
    return home() / "models" / name


def find(ref: str) -> CatalogEntry | None:
    return ENTRIES.get(ref)


def is_installed(name: str) -> bool:
    return (model_dir(name) / ".rayinfer-complete").is_file()
