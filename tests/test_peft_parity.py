"""Parity with PEFT: our E == 1 adapter under optax.chain(riemann_precond, ...) vs create_riemannian_optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moelora_jax import AdaptedDense, AdapterConfig, riemann_precond

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from peft.optimizers import create_riemannian_optimizer  # noqa: E402

D_IN, D_OUT, R, ALPHA, BATCH, STEPS = 24, 16, 4, 8.0, 32, 6


class _Projection(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(D_IN, D_OUT, bias=False)

    def forward(self, x):
        return self.proj(x)


def _data(seed: int):
    rng = np.random.default_rng(seed)
    weights = {
        "kernel": rng.normal(size=(D_IN, D_OUT)) / np.sqrt(D_IN),
        "lora_a": rng.normal(size=(1, D_IN, R)) / np.sqrt(D_IN),
        "lora_b": rng.normal(size=(1, R, D_OUT)) / np.sqrt(R),  # non-zero, so both factors move from step 1
    }
    batches = [(rng.normal(size=(BATCH, D_IN)), rng.normal(size=(BATCH, D_OUT))) for _ in range(STEPS)]
    weights = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    return weights, [(np.asarray(x, np.float32), np.asarray(y, np.float32)) for x, y in batches]


def _peft_trajectory(weights, batches, optimizer_cls, reg, **opt_kwargs):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=0.0)
    model = peft.get_peft_model(_Projection(), config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.from_numpy(weights["kernel"].T))
        layer.lora_A["default"].weight.copy_(torch.from_numpy(weights["lora_a"][0].T))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(weights["lora_b"][0].T))
    optimizer = create_riemannian_optimizer(model, optimizer_cls, reg=reg, **opt_kwargs)
    trajectory = []
    for x, y in batches:
        optimizer.zero_grad()
        loss = torch.mean((model(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2)
        loss.backward()
        optimizer.step()
        a = layer.lora_A["default"].weight.detach().numpy().T
        b = layer.lora_B["default"].weight.detach().numpy().T
        trajectory.append((loss.item(), a.copy(), b.copy()))
    return trajectory


def _our_trajectory(weights, batches, tx):
    module = AdaptedDense(D_OUT, adapter=AdapterConfig(num_experts=1, rank=R, alpha=ALPHA))
    frozen = {"kernel": jnp.asarray(weights["kernel"])}
    adapters = {"lora_a": jnp.asarray(weights["lora_a"]), "lora_b": jnp.asarray(weights["lora_b"])}

    def loss_fn(adapters, x, y):
        return jnp.mean((module.apply({"params": frozen, "adapters": adapters}, x) - y) ** 2)

    @jax.jit
    def step(adapters, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(adapters, x, y)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    opt_state, trajectory = tx.init(adapters), []
    for x, y in batches:
        adapters, opt_state, loss = step(adapters, opt_state, x, y)
        trajectory.append((float(loss), np.asarray(adapters["lora_a"][0]), np.asarray(adapters["lora_b"][0])))
    return trajectory


@pytest.mark.parametrize("reg", [1e-2, 1e-4])
@pytest.mark.parametrize("family", ["sgd", "adamw"])
def test_matches_peft_riemannian_optimizer(family, reg):
    weights, batches = _data(0)
    if family == "sgd":
        ours = optax.chain(riemann_precond(reg), optax.sgd(0.05))
        theirs = _peft_trajectory(weights, batches, torch.optim.SGD, reg, lr=0.05)
    else:
        ours = optax.chain(riemann_precond(reg), optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01))
        theirs = _peft_trajectory(
            weights, batches, torch.optim.AdamW, reg, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01
        )
    mine = _our_trajectory(weights, batches, ours)
    for step, ((loss_o, a_o, b_o), (loss_t, a_t, b_t)) in enumerate(zip(mine, theirs, strict=True)):
        np.testing.assert_allclose(loss_o, loss_t, rtol=1e-5, err_msg=f"loss at step {step}")
        np.testing.assert_allclose(a_o, a_t, rtol=1e-5, atol=1e-5, err_msg=f"lora_a after step {step}")
        np.testing.assert_allclose(b_o, b_t, rtol=1e-5, atol=1e-5, err_msg=f"lora_b after step {step}")
    # The run must actually move the factors, or parity would be vacuous.
    assert np.abs(mine[-1][1] - weights["lora_a"][0]).max() > 1e-3
    assert np.abs(mine[-1][2] - weights["lora_b"][0]).max() > 1e-3


def test_preconditioning_changes_the_trajectory():
    """Guards the oracle: PEFT with preconditioning must differ from plain SGD, so parity above is informative."""
    weights, batches = _data(1)
    preconditioned = _peft_trajectory(weights, batches, torch.optim.SGD, 1e-2, lr=0.05)
    plain = _our_trajectory(weights, batches, optax.sgd(0.05))
    assert np.abs(preconditioned[-1][1] - plain[-1][1]).max() > 1e-2
