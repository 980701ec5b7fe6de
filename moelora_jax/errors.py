"""The one error type for problems in what a user gave: a config, data, model files, checkpoints, a directory."""

from __future__ import annotations


class UserError(ValueError):
    """A problem in the user's input, stated in one line that names it and its fix.

    ``train.py`` prints it as ``error: <message>`` and exits with code 2. Any other exception is a bug in this
    library (or its dependencies) and propagates with its traceback. A ``ValueError`` subclass, so library callers
    that validate arguments by catching ``ValueError`` keep working.
    """


def check_choice(name: str, value: object, choices: tuple) -> None:
    """``name=value`` must be one of ``choices``: the one wording of that check, wherever a setting is read."""
    if value not in choices:
        raise UserError(f"{name}={value!r} must be one of {choices}.")


def check_at_least(name: str, value: float, minimum: float) -> None:
    """``name=value`` must be ``>= minimum``."""
    if value < minimum:
        raise UserError(f"{name}={value} must be >= {minimum}.")
