"""The one error type for problems in what a user gave: a config, data, model files, checkpoints, a directory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class UserError(ValueError):
    """A problem in the user's input, stated in one line that names it and its fix.

    ``train.py`` prints it as ``error: <message>`` and exits with code 2. Any other exception is a bug in this
    library (or its dependencies) and propagates with its traceback. A ``ValueError`` subclass, so library callers
    that validate arguments by catching ``ValueError`` keep working.
    """


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an error's message (at most ``limit`` characters), or its type's name when it has none:
    how another library's error is quoted inside a ``UserError``'s one line."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def check_choice(name: str, value: object, choices: tuple) -> None:
    """``name=value`` must be one of ``choices``: the one wording of that check, wherever a setting is read."""
    if value not in choices:
        raise UserError(f"{name}={value!r} must be one of {choices}.")


def check_at_least(name: str, value: float, minimum: float) -> None:
    """``name=value`` must be ``>= minimum``."""
    if value < minimum:
        raise UserError(f"{name}={value} must be >= {minimum}.")


@contextlib.contextmanager
def in_setting(name: str) -> Iterator[None]:
    """A ``UserError`` raised inside, said of the setting that gave the input: ``name: <its line>``. The library
    states what is wrong in its own terms (an argument, a directory); the command's boundary adds the setting."""
    try:
        yield
    except UserError as e:
        raise UserError(f"{name}: {e}") from e
