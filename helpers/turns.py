"""Turns between a user's controls and background work: one thread at a time, controls first."""
from __future__ import annotations

import threading
from contextlib import contextmanager

__all__ = ["Turns"]


class Turns:
    """One thread at a time (reentrant), and a waiting control goes before the background work.

    The explorer holds its model and state through it: a slider never waits behind more than one
    background chunk of predictions.
    """

    def __init__(self) -> None:
        self._cond, self._owner, self._depth, self._controls_waiting = threading.Condition(), None, 0, 0

    @contextmanager
    def take(self, control: bool = True):
        """Hold the turn for the `with` block; `control` (a widget callback) goes before background work."""
        me = threading.get_ident()
        with self._cond:
            if self._owner != me:
                self._controls_waiting += control
                try:
                    self._cond.wait_for(lambda: self._owner is None and (control or not self._controls_waiting))
                finally:
                    self._controls_waiting -= control
                self._owner = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._owner = None
                    self._cond.notify_all()
