"""Test setup, before JAX initialises its backends.

- 8 fake CPU devices for the sharding tests (which place their meshes on CPU devices explicitly).
- Full float32 matmul precision, so that oracle tolerances mean the same on CPU and on GPU/TPU, where the default
  lets float32 matmuls run in TF32/bfloat16 passes.
- Single-threaded Eigen on the CPU: XLA's multi-threaded Eigen pool has been seen to wedge forever on small
  (2-core) machines; the tests' tensors are small, so this costs them nothing measurable and keeps CI from hanging.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    flag for flag in (os.environ.get("XLA_FLAGS", ""), "--xla_cpu_multi_thread_eigen=false") if flag
)

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
