"""Fine-tune a LLaMA-family model with (MoE-)LoRA adapters: ``python train.py --config configs/llama_moelora.py``.

Overrides: ``--config.optim.lr=1e-4``; presets: ``--config configs/llama_moelora.py:smoke``. Unknown keys, wrong
types and invalid values stop the run with one line and exit code 2 before any model or data is loaded; so does any
other problem with the input (:class:`~moelora_jax.errors.UserError`: bad data, model files, unreadable checkpoints,
unwritable output directories). Any other exception is a bug and keeps its traceback. SIGTERM or SIGINT stop the
run at the next step boundary with a checkpoint and exit code 75; the same command resumes it.
"""

from __future__ import annotations

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from moelora_jax.errors import UserError
from moelora_jax.training.cli import parse_flags
from moelora_jax.training.preemption import EXIT_PREEMPTED, PreemptedError
from moelora_jax.training.run import run

# transformers announces at import that torch is absent; we use only its tokenizers and configs, on purpose.
std_logging.getLogger("transformers").addFilter(lambda r: not r.getMessage().startswith("PyTorch was not found"))

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file, optionally with ':preset'")
flags.mark_flag_as_required("config")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: settings go through --config.KEY=VALUE.")
    # orbax logs a failed background save with tracebacks at ERROR; the run re-raises it as one line
    logging.set_verbosity(logging.FATAL)
    config = _CONFIG.value
    try:
        run(config, sys.orig_argv)  # validates the whole config before loading anything
    except PreemptedError as e:
        print(str(e), file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
