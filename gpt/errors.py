"""The project's convention for bad input: a ``UserError`` carries one line fit to show a user as is.

The command lines catch ``UserError`` and print ``error: <message>`` with exit code 1, never a
traceback. Each module raises its own subclass (``DataError``, ``CheckpointError``, ...).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or files; the message is one line."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
