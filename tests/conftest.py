"""Test setup: 8 fake CPU devices for the sharding tests (must run before JAX initialises its backend)."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
