"""README command 1's job and its real training examples, shared by the benchmarks that run on real batches."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from moelora_jax.config_file import load_config as load_config_file
from moelora_jax.data import Encoded, batch_indices, encode_examples
from moelora_jax.pretrained import load_config, load_tokenizer, resolve_model_dir
from moelora_jax.settings import Settings
from moelora_jax.tasks import load_task

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "llama_moelora.py"


@dataclasses.dataclass(frozen=True)
class Command1:
    """``configs/llama_moelora.py`` as command 1 runs it: its config, settings, model and encoded BBC examples."""

    config: Any
    settings: Settings
    directory: Path
    model_config: Any
    tokenizer: Any
    encoded: list[Encoded]

    @classmethod
    def load(cls) -> Command1:
        config = load_config_file(CONFIG)
        directory = resolve_model_dir(None)
        tokenizer = load_tokenizer(directory)
        _, examples = load_task(config.data.task, None, config.data.train_split)
        encoded, _ = encode_examples(tokenizer, examples, config.data.max_length)
        return cls(config, Settings.from_config(config), directory, load_config(directory), tokenizer, encoded)

    def step_examples(self, batch_size: int, steps: int) -> list[list[Encoded]]:
        """The examples of training steps ``0 .. steps - 1`` (seed 0), as the trainer draws them."""
        return [
            [self.encoded[i] for i in batch_indices(len(self.encoded), batch_size, seed=0, step=s)]
            for s in range(steps)
        ]
