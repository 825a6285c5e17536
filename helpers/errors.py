"""The project's errors: where a user looks (a notebook, the app's page) they show as their message alone.

    class DataNotFoundError(errors.OneLineError, RuntimeError): ...   # a project error, shown as one line
    raise errors.InputError(f"batch_size must be at least 1, got {n}")  # a bad argument: a ValueError

IPython (Jupyter, Voila) asks an exception for ``_render_traceback_()`` before it prints a traceback.
Ours answer with the message: it already says what went wrong and what to do, and the frames and
chained causes (a socket error under a failed download, say) would bury it. Outside IPython nothing
changes: Python prints the usual traceback.
"""
from __future__ import annotations

__all__ = ["OneLineError", "InputError", "InputTypeError", "StateError"]


class OneLineError(Exception):
    """A mixin for the project's error classes: IPython shows ``Name: message`` without the traceback."""

    def _render_traceback_(self) -> list[str]:
        """The lines IPython shows instead of the traceback: the class name and the message.

        Returns:
            one string per line of the message (most are one line).
        """
        return f"{type(self).__name__}: {self}".splitlines() or [type(self).__name__]


class InputError(OneLineError, ValueError):
    """An argument of the right kind with a wrong value (a range, a shape, a length); a ValueError."""


class InputTypeError(OneLineError, TypeError):
    """An argument of the wrong kind (a list or a NumPy array where a tensor is wanted); a TypeError."""


class StateError(OneLineError, RuntimeError):
    """A call that the object's state does not allow now (say, images fed and not yet finished); a RuntimeError."""
