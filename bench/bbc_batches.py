"""README command 1's job and its real training examples, shared by the benchmarks that run on real batches."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from moelora_jax.data.encoding import Encoded, Layout, batch_indices
from moelora_jax.models.pretrained import load_config, load_tokenizer, resolve_model_dir
from moelora_jax.training.config_file import load_config as load_config_file
from moelora_jax.training.job import batch_layout, build_trainer, job_mesh, load_data
from moelora_jax.training.settings import Settings
from moelora_jax.training.trainer import Trainer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "llama_moelora.py"


@dataclasses.dataclass(frozen=True)
class Command1:
    """``configs/llama_moelora.py`` as command 1 runs it: its config, settings, model and encoded BBC examples, read
    by the job's own setup pieces (:mod:`moelora_jax.training.job`)."""

    config: Any
    settings: Settings
    directory: Path
    model_config: Any
    tokenizer: Any
    encoded: list[Encoded]

    @classmethod
    def load(cls) -> Command1:
        config = load_config_file(CONFIG)
        settings = Settings.from_config(config)
        directory = resolve_model_dir(None)
        tokenizer = load_tokenizer(directory)
        encoded = load_data(settings, tokenizer).train
        return cls(config, settings, directory, load_config(directory), tokenizer, encoded)

    def trainer(self, **model: Any) -> Trainer:
        """The job's trainer on all devices, with ``model.*`` settings replaced by ``model`` (e.g. ``remat="full"``,
        ``quantize="nf4"``)."""
        settings = dataclasses.replace(self.settings, model=dataclasses.replace(self.settings.model, **model))
        return build_trainer(settings, self.model_config, job_mesh(settings))

    def layout(self) -> Layout:
        """The job's training batch layout (one device: rows unrounded)."""
        return batch_layout(self.settings.data, self.encoded, 1)

    def step_examples(self, batch_size: int, steps: int) -> list[list[Encoded]]:
        """The examples of training steps ``0 .. steps - 1`` (seed 0), as the trainer draws them."""
        return [
            [self.encoded[i] for i in batch_indices(len(self.encoded), batch_size, seed=0, step=s)]
            for s in range(steps)
        ]
