"""A training run's folder: ``last.pt`` (the state to resume), ``best.pt`` (the weights chosen on
validation), ``log.jsonl`` (one line an epoch) and a lock that keeps a second run out."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from .errors import OneLineError

try:
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None

__all__ = ["FolderBusy", "RunFolder"]


class FolderBusy(OneLineError, RuntimeError):
    """Another run writes to the folder."""


class RunFolder:
    """The files of one run under `path`.

    Args:
        path: the run's folder (made when the run starts).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.state, self.best, self.log = self.path / "last.pt", self.path / "best.pt", self.path / "log.jsonl"

    @contextmanager
    def lock(self):
        """Hold the folder while training, so a second run into it is refused instead of interleaving its
        files with ours; the operating system lets go when the process ends, however it ends.

        Raises:
            OSError: the folder cannot be made or written (the message names it).
            FolderBusy: another run holds it.
        """
        if int(os.environ.get("RANK", 0)) != 0:  # under torchrun rank 0 holds the lock
            yield
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / ".lock", "w")
        except OSError as e:
            raise OSError(f"cannot write to {self.path} ({e.strerror or e}): choose a folder you can write to") from None
        with handle:
            if fcntl is not None:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise FolderBusy(f"another training run is writing to {self.path}: wait for it to end, "
                                     "or choose another --out") from None
            try:
                yield
            finally:
                if [p.name for p in self.path.iterdir()] == [".lock"]:  # a run that wrote nothing leaves nothing
                    (self.path / ".lock").unlink()
                    self.path.rmdir()

    def append(self, record: dict) -> None:
        """Add one epoch's line to the log, flushed to the disk."""
        with open(self.log, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[dict]:
        """The log's lines, oldest first (none before the first epoch ends)."""
        if not self.log.is_file():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
