"""Files written whole or not at all: write to a temporary name beside the target, then rename.
A crash or a full disk never leaves half a checkpoint, cache or card behind."""
from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["save", "write_text"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or a platform that cannot tell: leave its file alone
    return True


def _remove_stale(path: Path) -> None:
    """Temporary files of writers that were killed (SIGKILL runs no cleanup) are removed by the next writer."""
    for tmp in path.parent.glob(f".{path.name}.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _replace(path: str | os.PathLike, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
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
