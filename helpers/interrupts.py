"""Stopping a training run cleanly: Ctrl-C, SIGTERM or a time limit asks it to stop at the next safe point,
so its saved state and its log always agree."""
from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager

__all__ = ["TimeUp", "StopRequest"]


class TimeUp(KeyboardInterrupt):
    """The time limit was reached: the run stopped as Ctrl-C stops it (saved, resumable)."""


class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to stop after the current step; so does the end of `time_limit`
    seconds (0: none) counted from now. A second Ctrl-C during validation abandons it (the epoch is
    validated again on resume); anywhere else the run still stops at the next safe point.

    Use as a context manager: the previous signal handlers come back on exit.
    """

    def __init__(self, time_limit: float = 0.0) -> None:
        self.requested = False
        self.deadline = time.perf_counter() + time_limit if time_limit else math.inf
        self._abandonable = False
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested and self._abandonable:
            raise KeyboardInterrupt
        self.requested = True

    @contextmanager
    def abandonable(self):
        """Work that a second stop request may cut short, because nothing of it is kept (validation)."""
        self._abandonable = True
        try:
            yield
        finally:
            self._abandonable = False

    def check(self) -> None:
        """At a safe point: raise KeyboardInterrupt when a stop was asked for, TimeUp when time is up."""
        if self.requested:
            raise KeyboardInterrupt
        if time.perf_counter() > self.deadline:
            raise TimeUp
