"""What the command lines (``train.py``, ``python -m moelora_jax.compile``) share: absl flag parsing in which every
bad ``--config`` override is one ``error:`` line and exit code 2."""

from __future__ import annotations

import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with every bad ``--config`` override (unknown key, wrong type) as one line and exit 2."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        message = str(e)
        if "Traceback" in message:  # an exception inside the config file: keep its last line
            message = message.strip().splitlines()[-1]
        if isinstance(e, AttributeError | KeyError):
            key = message.strip("\"'")
            message = f"unknown config key {key!r} in a --config override; the config file lists the valid keys"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
