"""What the command lines (``train.py``, ``python -m moelora_jax.compile``) share: absl flag parsing in which every
bad ``--config`` (a file that cannot be loaded, an unknown key, a wrong type) is one ``error:`` line and exit code 2."""

from __future__ import annotations

import sys
from typing import NoReturn

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with a config file that cannot be loaded and every bad ``--config`` override (unknown key,
    wrong type) as one line and exit 2."""
    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS:
            # ml_collections defers a config file it cannot read to the config's first use: use it now
            getattr(flags.FLAGS["config"].value, "keys", None)
        return rest
    except SyntaxError as e:
        _fail(f"the config file {e.filename} has a syntax error at line {e.lineno}: {e.msg}")
    except OSError as e:
        _fail(
            f"cannot load the config file: {str(e).strip().splitlines()[-1].strip()}; give --config a configs/*.py file"
        )
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        message = str(e)
        if "Traceback" in message:  # an exception inside the config file: keep its last line
            message = message.strip().splitlines()[-1]
        if isinstance(e, AttributeError | KeyError):
            key = message.strip("\"'")
            message = f"unknown config key {key!r} in a --config override; the config file lists the valid keys"
        _fail(message)


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
