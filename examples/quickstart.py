"""Quickstart: the adapter API end to end on a synthetic routed task, with and without ``riemann_precond``.

    python examples/quickstart.py

A frozen projection ``W0`` must learn a residual that depends on which of four input clusters a token comes from:
``y = x @ W0 + x @ (U_c @ V_c)``. A MoE-LoRA adapter (E=4, r=2, top-k 2) trains its experts and its gate; the
loss is printed for SGD and AdamW, each alone and after ``riemann_precond()`` in an ``optax.chain``.
"""

import jax
import jax.numpy as jnp
import optax

from moelora_jax import AdaptedDense, AdapterConfig, riemann_precond

D, CLUSTERS, STEPS, BATCH, SGD_LR = 64, 4, 400, 256, 1e-3


def make_task(key: jax.Array):
    k_w0, k_u, k_v, k_centres = jax.random.split(key, 4)
    w0 = jax.random.normal(k_w0, (D, D)) / jnp.sqrt(D)
    u = jax.random.normal(k_u, (CLUSTERS, D, 2)) / jnp.sqrt(D)
    v = jax.random.normal(k_v, (CLUSTERS, 2, D))
    centres = 2.0 * jax.random.normal(k_centres, (CLUSTERS, D))

    def batch(key: jax.Array) -> tuple[jax.Array, jax.Array]:
        k_c, k_x = jax.random.split(key)
        cluster = jax.random.randint(k_c, (BATCH,), 0, CLUSTERS)
        x = centres[cluster] + jax.random.normal(k_x, (BATCH, D))
        residual = jnp.einsum("bd,bdr,bre->be", x, u[cluster], v[cluster])
        return x, x @ w0 + residual

    return w0, batch


def train(tx: optax.GradientTransformation, w0: jax.Array, batch_fn) -> list[float]:
    module = AdaptedDense(D, adapter=AdapterConfig(num_experts=CLUSTERS, rank=2, top_k=2, alpha=4.0))
    adapters = module.init(jax.random.key(1), jnp.ones((1, D)))["adapters"]  # lora_a, lora_b, gate
    frozen = {"kernel": w0}

    def loss_fn(adapters, x, y):
        return jnp.mean((module.apply({"params": frozen, "adapters": adapters}, x) - y) ** 2)

    @jax.jit
    def step(adapters, opt_state, key):
        x, y = batch_fn(key)
        loss, grads = jax.value_and_grad(loss_fn)(adapters, x, y)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    opt_state, losses = tx.init(adapters), []
    for key in jax.random.split(jax.random.key(2), STEPS):
        adapters, opt_state, loss = step(adapters, opt_state, key)
        losses.append(float(loss))
    return losses


def main() -> None:
    w0, batch_fn = make_task(jax.random.key(0))
    runs = {
        "sgd": optax.sgd(SGD_LR),
        "precond + sgd": optax.chain(riemann_precond(1e-4), optax.sgd(SGD_LR)),
        "adamw": optax.adamw(3e-3),
        "precond + adamw": optax.chain(riemann_precond(1e-4), optax.adamw(3e-3)),
    }
    print(f"MoE-LoRA (E={CLUSTERS}, r=2, top-k 2) fitting a routed residual; mean squared error by step")
    print(f"{'step':>6} " + " ".join(f"{name:>16}" for name in runs))
    curves = {name: train(tx, w0, batch_fn) for name, tx in runs.items()}
    for i in (0, 50, 100, 200, STEPS - 1):
        print(f"{i:>6} " + " ".join(f"{curves[name][i]:>16.4f}" for name in runs))


if __name__ == "__main__":
    main()
