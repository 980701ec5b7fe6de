"""moelora_jax: mixtures of LoRA experts with Riemannian preconditioning, in JAX/Flax."""

from moelora_jax.adapters import (
    AdaptedDense,
    AdapterConfig,
    GateRouting,
    MoleConfig,
    moe_lora_delta,
    topk_softmax_gate,
)
from moelora_jax.errors import UserError
from moelora_jax.riemann import riemann_precond

__all__ = [
    "AdaptedDense",
    "AdapterConfig",
    "GateRouting",
    "MoleConfig",
    "UserError",
    "moe_lora_delta",
    "riemann_precond",
    "topk_softmax_gate",
]
__version__ = "0.1.0"
