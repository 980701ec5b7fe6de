"""MoLE: masking equals leaving a LoRA out, the balance loss's gradient, reading LoRAs, and two tasks composed."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.test_util import check_grads
from train_cli import tiny_job, train, write_records

from moelora_jax.adapters.layers import AdapterConfig, GateRouting, MoleConfig
from moelora_jax.adapters.routing import mole_balance_loss, router_stats, sown_routing
from moelora_jax.errors import UserError
from moelora_jax.formats.mole import LoraStack, load_mole, read_lora, stack_loras, with_loras
from moelora_jax.formats.native import export_adapters
from moelora_jax.formats.peft import export_peft
from moelora_jax.models.llama import Llama, LlamaConfig, init_variables

CONFIG = LlamaConfig(64, 32, 64, 2, 4, 2, 8)
TARGETS = ("q", "v", "down")


def _random_stack(num: int, rank: int = 2) -> LoraStack:
    rng = np.random.default_rng(0)
    factors = {}
    for target in TARGETS:
        d_in, d_out = (64, 32) if target == "down" else (32, 32 if target == "q" else 16)
        factors[target] = (
            rng.normal(size=(2, num, d_in, rank)).astype(np.float32),
            rng.normal(size=(2, num, rank, d_out)).astype(np.float32),
        )
    return LoraStack(tuple(f"lora{i}" for i in range(num)), rank, TARGETS, factors)


def _select(stack: LoraStack, keep: list[int]) -> LoraStack:
    factors = {t: (a[:, keep], b[:, keep]) for t, (a, b) in stack.factors.items()}
    return dataclasses.replace(stack, sources=tuple(stack.sources[i] for i in keep), factors=factors)


def _mole_model(mole: MoleConfig, stack: LoraStack, gates=None):
    model = Llama(CONFIG, adapter=mole, adapter_targets=TARGETS)
    variables = init_variables(model, jax.random.key(0))
    params = with_loras(variables["params"], stack)
    return model, params, variables["adapters"] if gates is None else gates


@pytest.mark.parametrize("gate", ["layer", "block"])
def test_masking_a_lora_equals_a_model_built_without_it(gate):
    stack, tokens = _random_stack(3), jax.random.randint(jax.random.key(1), (2, 7), 3, 64)
    model, params, gates = _mole_model(MoleConfig(3, 2, gate=gate), stack)
    gates = jax.tree.map(lambda g: g * 30.0 if g.ndim == 3 else g, gates)  # a decisive gate, far from uniform
    masked = model.clone(adapter=MoleConfig(3, 2, gate=gate, masked=(1,)))
    without = Llama(CONFIG, adapter=MoleConfig(2, 2, gate=gate), adapter_targets=TARGETS)
    kept_gates = jax.tree.map(lambda g: g[..., [0, 2]] if g.ndim == 3 else g, gates)
    expected = without.apply({"params": with_loras(params, _select(stack, [0, 2])), "adapters": kept_gates}, tokens)
    actual = masked.apply({"params": params, "adapters": gates}, tokens)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    unmasked = model.apply({"params": params, "adapters": gates}, tokens)
    assert np.abs(unmasked - expected).max() > 1e-2  # the masked LoRA mattered


def test_mole_weights_renormalise_over_the_unmasked_loras():
    stack = _random_stack(3)
    model, params, gates = _mole_model(MoleConfig(3, 2, masked=(2,)), stack)
    _, sown = model.apply({"params": params, "adapters": gates}, jnp.ones((1, 4), jnp.int32), mutable=["router"])
    for logits, _ in sown_routing(sown):
        weights = jax.nn.softmax(logits, axis=-1)
        np.testing.assert_array_equal(weights[..., 2], 0.0)
        np.testing.assert_allclose(jnp.sum(weights, axis=-1), 1.0, rtol=1e-6)


def test_balance_loss_value_and_gradient():
    logits = jax.random.normal(jax.random.key(0), (3, 2, 4, 5))
    weights = jnp.ones((2, 4)).at[1, 3].set(0)
    q = jnp.mean(jnp.sum(jax.nn.softmax(logits, -1) * weights[None, ..., None], axis=(1, 2)) / 7, axis=0)
    loss = mole_balance_loss(router_stats([GateRouting(logits, None)], weights))
    assert float(loss) == pytest.approx(-float(jnp.sum(jnp.log(q))), rel=1e-6)
    uniform = router_stats([GateRouting(jnp.zeros((1, 1, 3, 5)), None)], jnp.ones((1, 3)))
    assert float(mole_balance_loss(uniform)) == pytest.approx(5 * np.log(5), rel=1e-6)
    check_grads(
        lambda z: mole_balance_loss(router_stats([GateRouting(z, None)], weights)), (logits,), order=1, modes=["rev"]
    )


def test_a_peft_export_and_our_export_read_back_as_the_same_lora(tmp_path):
    adapter = AdapterConfig(rank=2, alpha=6.0)
    model = Llama(CONFIG, adapter=adapter, adapter_targets=TARGETS)
    adapters = init_variables(model, jax.random.key(3), ("adapters",))["adapters"]
    adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # B off zero
    export_adapters(tmp_path / "ours", adapters, adapter=adapter, targets=TARGETS, model_config=CONFIG)
    export_peft(tmp_path / "peft", adapters, adapter=adapter, targets=TARGETS)
    ours, peft = read_lora(tmp_path / "ours", CONFIG), read_lora(tmp_path / "peft", CONFIG)
    assert sorted(ours) == sorted(peft) == sorted(TARGETS)
    for target in TARGETS:
        a, b = ours[target]
        leaves = traverse_util.flatten_dict(adapters)
        block, proj = {"q": ("attn", "q_proj"), "v": ("attn", "v_proj"), "down": ("mlp", "down_proj")}[target]
        np.testing.assert_allclose(a, leaves["layers", block, proj, "lora_a"][:, 0], rtol=1e-6)
        np.testing.assert_allclose(b, 3.0 * leaves["layers", block, proj, "lora_b"][:, 0], rtol=1e-6)  # s = 6 / 2
        np.testing.assert_allclose(peft[target][0], a, rtol=1e-6)
        np.testing.assert_allclose(peft[target][1], b, rtol=1e-6)


def test_loras_of_different_ranks_stack_with_zero_padding(tmp_path):
    for rank, name in ((2, "small"), (4, "large")):
        adapter = AdapterConfig(rank=rank)
        model = Llama(CONFIG, adapter=adapter, adapter_targets=("q",))
        adapters = init_variables(model, jax.random.key(rank), ("adapters",))["adapters"]
        export_adapters(tmp_path / name, adapters, adapter=adapter, targets=("q",), model_config=CONFIG)
    stack = stack_loras([tmp_path / "small", tmp_path / "large"], CONFIG)
    a, b = stack.factors["q"]
    assert stack.rank == 4 and a.shape == (2, 2, 32, 4) and b.shape == (2, 2, 4, 32)
    np.testing.assert_array_equal(a[:, 0, :, 2:], 0.0)
    with pytest.raises(ValueError, match="at least 2 LoRAs"):
        stack_loras([tmp_path / "small"], CONFIG)
    with pytest.raises(UserError, match="is not a LoRA"):
        stack_loras([tmp_path / "small", tmp_path], CONFIG)


WORDS = ["a", "b", "c", "sky", "passage", "title", "question", "the"]


def _task(start: str, answer: str, words: list[str]) -> list[dict]:
    return [{"prompt": f"{start} {w} {v} ?", "response": f"the answer is {answer} ."} for w in words for v in WORDS]


def test_mole_composes_two_loras_trained_on_two_tasks(learnable_model_dir, tmp_path):
    """LoRA A always answers "blue" (questions starting "what"), LoRA B "no" ("why"); on a mix of both, each alone
    fails half, and a MoLE gate over the two, trained on the mix, does better than either."""
    colour, reason = _task("what", "blue", WORDS[:6]), _task("why", "no", WORDS[:6])
    held_out = _task("what", "blue", WORDS[6:]) + _task("why", "no", WORDS[6:])
    eval_path = write_records(tmp_path, held_out, "eval.jsonl")
    common = [
        "--config.data.max_length=16",
        f"--config.data.eval_path={eval_path}",
        "--config.data.max_eval_examples=32",
        "--config.train.eval_batch_size=32",
        "--config.train.batch_size=8",
        "--config.checkpoint.every=0",
    ]
    losses = {}
    for name, records in (("colour", colour), ("reason", reason)):
        job = tiny_job(learnable_model_dir, write_records(tmp_path, records, f"{name}.jsonl"))
        lora = [
            "--config.adapter.kind=lora",
            "--config.train.steps=30",
            "--config.optim.lr=3e-2",
            "--config.optim.decay_steps=40",
        ]
        result = train(tmp_path / name, *job, *common, *lora)
        assert result.returncode == 0, result.stderr[-2000:]
        losses[name] = json.loads((tmp_path / name / "summary.json").read_text())["eval_loss_after"]
    sources = f"{tmp_path / 'colour' / 'export' / 'adapters'},{tmp_path / 'reason' / 'export' / 'adapters'}"
    mixed = write_records(tmp_path, colour + reason, "mixed.jsonl")
    mole = [
        f"--config.mole.loras={sources}",
        "--config.train.steps=40",
        "--config.optim.gate_lr=3e-2",
        "--config.optim.decay_steps=50",
    ]
    result = train(tmp_path / "mole", *tiny_job(learnable_model_dir, mixed), *common, *mole, config="mole.py")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "mole" / "summary.json").read_text())
    print(
        f"held-out loss on both tasks: LoRA A {losses['colour']:.3f}, LoRA B {losses['reason']:.3f}, "
        f"MoLE {summary['eval_loss_after']:.3f}"
    )
    assert summary["eval_loss_after"] < 0.6 * min(losses.values())  # measured: 0.24 against 0.59 and 1.70
    mole_config, read_sources, targets, gates = load_mole(tmp_path / "mole" / "export" / "mole")
    assert (mole_config.num_loras, ",".join(read_sources), targets) == (2, sources, ("q", "k", "v", "o"))
    assert gates["layers"]["attn"]["q_proj"]["mole_gate"]["gate"].shape == (2, 32, 2)  # (layers, d, LoRAs)


@pytest.mark.parametrize(
    ("loras", "message"),
    [
        ("", "mole.loras='' must list at least 2 LoRA directories"),
        ("/no/a,/no/b", "mole.loras: /no/a is not a LoRA: it needs adapters.json (our export) or adapter_config.json"),
    ],
)
def test_bad_mole_sources_fail_with_one_line(tmp_path, loras, message):
    result = train(tmp_path / "run", f"--config.mole.loras={loras}", config="mole.py")
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
