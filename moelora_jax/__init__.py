"""moelora_jax: mixtures of LoRA experts with Riemannian preconditioning, in JAX/Flax.

The public API, importable from here; the subpackages hold the rest (see ``docs/ARCHITECTURE.md``).
"""

from moelora_jax.adapters.layers import (
    AdaptedDense,
    AdapterConfig,
    GateRouting,
    MoleConfig,
    moe_lora_delta,
    topk_softmax_gate,
)
from moelora_jax.errors import UserError
from moelora_jax.formats.merged import export_merged, merge_adapters
from moelora_jax.formats.mole import export_mole, load_mole
from moelora_jax.formats.native import export_adapters, load_adapters
from moelora_jax.formats.peft import export_peft
from moelora_jax.models.generation import generate
from moelora_jax.models.llama import Llama, LlamaConfig
from moelora_jax.models.pretrained import build_model, load_config, load_params, load_pretrained, load_tokenizer
from moelora_jax.optim.optimizer import OptimConfig, build_optimizer
from moelora_jax.optim.riemann import Factor, riemann_precond
from moelora_jax.training.trainer import Trainer, TrainState

__all__ = [
    "AdaptedDense",
    "AdapterConfig",
    "Factor",
    "GateRouting",
    "Llama",
    "LlamaConfig",
    "MoleConfig",
    "OptimConfig",
    "TrainState",
    "Trainer",
    "UserError",
    "build_model",
    "build_optimizer",
    "export_adapters",
    "export_merged",
    "export_mole",
    "export_peft",
    "generate",
    "load_adapters",
    "load_config",
    "load_mole",
    "load_params",
    "load_pretrained",
    "load_tokenizer",
    "merge_adapters",
    "moe_lora_delta",
    "riemann_precond",
    "topk_softmax_gate",
]
__version__ = "0.1.0"
