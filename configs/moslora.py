"""MoSLoRA (Wu et al. 2024, "Mixture-of-Subspaces in Low-Rank Adaptation"): LoRA with a trainable r x r mixer.

    python train.py --config configs/moslora.py                                   # LoRA + mixer, riemann_precond
    python train.py --config configs/moslora.py --config.optim.riemann=False      # without the preconditioner
    python train.py --config configs/moslora.py --config.adapter.kind=moe_lora    # MoE-LoRA, a mixer per expert

``dW = A M B`` with ``M`` Kaiming-uniform (zero would not train; the identity is plain LoRA). ``riemann_precond``
preconditions each factor by the Gram matrix of the rest of the product (see ``moelora_jax.optim.riemann``). Everything
else is ``configs/llama_moelora.py``'s, whose presets (``smoke``, ``paper``) apply too.
"""

from pathlib import Path

from ml_collections import ConfigDict

from moelora_jax.training.config_file import load_config


def get_config(preset: str = "") -> ConfigDict:
    config = load_config(Path(__file__).with_name("llama_moelora.py"), preset)
    config.output_dir = "runs/moslora" + (f"_{preset}" if preset else "")
    config.adapter.kind = "lora"
    config.adapter.mixer = True
    return config
