"""Test setup, before JAX initialises its backends.

- 8 fake CPU devices for the sharding tests (which place their meshes on CPU devices explicitly).
- Full float32 matmul precision, so that oracle tolerances mean the same on CPU and on GPU/TPU, where the default
  lets float32 matmuls run in TF32/bfloat16 passes.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
