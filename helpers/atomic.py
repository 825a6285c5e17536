"""Files written whole or not at all: write to a temporary name beside the target, then rename.
A crash or a full disk never leaves half a checkpoint, cache or card behind."""
from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["save", "write_text"]


def _replace(path: str | os.PathLike, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(obj, path: str | os.PathLike) -> None:
    """torch.save(obj, path), atomically."""
    _replace(path, lambda tmp: torch.save(obj, tmp))


def write_text(path: str | os.PathLike, text: str) -> None:
    _replace(path, lambda tmp: Path(tmp).write_text(text))
