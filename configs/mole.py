"""MoLE (Wu, Huang & Wei 2024): mix LoRAs trained before, frozen, by training only a gate per layer or block.

    python train.py --config configs/mole.py \\
        --config.mole.loras=runs/news/export/adapters,runs/csqa/export/adapters
    python train.py --config configs/mole.py --config.mole.gate=block ...   # one gate per decoder block
    python train.py --config configs/mole.py --config.mole.masked=1 ...     # without LoRA 1, the rest renormalised

Sources are ``export/adapters`` directories of plain-LoRA runs of this project or PEFT LoRA directories, all for
``model.path``; their targets are the union of the sources'. Everything else (model, data, training, checkpoints)
is ``configs/llama_moelora.py``'s, whose presets apply too. MoLE's loss is the task loss plus ``balance_loss`` times
its gating balance loss ``-log prod_i q_i`` (the paper's weight, 0.5).
"""

from pathlib import Path

from ml_collections import ConfigDict

from moelora_jax.training.config_file import load_config


def get_config(preset: str = "") -> ConfigDict:
    config = load_config(Path(__file__).with_name("llama_moelora.py"), preset)
    config.output_dir = "runs/mole" + (f"_{preset}" if preset else "")
    config.adapter.kind = "mole"

    config.mole = ConfigDict()
    config.mole.loras = ""  # comma-separated LoRA directories (our export/adapters, or PEFT), at least 2
    config.mole.gate = "layer"  # layer: a gate per adapted linear layer | block: one per decoder block
    config.mole.tau = 1.0  # initial softmax temperature (learned)
    config.mole.balance_loss = 0.5  # weight of the gating balance loss
    config.mole.masked = ""  # LoRA indices left out (e.g. "1"), the other weights renormalised

    config.optim.riemann = False  # only the gates train: there are no LoRA factors to precondition
    config.optim.gate_lr = 1e-3
    config.export.peft = config.export.merged = False  # a gated mixture has neither form; export/mole holds the gates
    return config
