"""``adapter.init_from``: a run that starts from existing adapters (ours, or a LoRA written by PEFT itself) computes
what they compute, and is told apart from resuming a checkpoint by its fingerprint."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from train_cli import error_line, tiny_job, train, write_records

from moelora_jax import AdapterConfig
from moelora_jax.errors import UserError
from moelora_jax.formats.warm_start import warm_adapters
from moelora_jax.models.llama import Llama, abstract_variables
from moelora_jax.models.pretrained import load_config, load_params

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


def _fresh(model):
    return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nn.unbox(abstract_variables(model))["adapters"])


def _tokens():
    return np.random.RandomState(0).randint(3, 96, (2, 9)).astype(np.int32)


@pytest.mark.parametrize("rslora", [False, True])
def test_a_lora_written_by_peft_starts_our_model_at_peft_s_forward(tiny_llama, tmp_path, rslora):
    hf, directory = tiny_llama()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, use_rslora=rslora
    )
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(hf, config).eval()  # init_lora_weights=False: B random, not zero
    peft_model.save_pretrained(tmp_path / "lora")
    with torch.no_grad():
        theirs = peft_model(torch.from_numpy(_tokens()).long()).logits.numpy()
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            untouched = base(torch.from_numpy(_tokens()).long()).logits.numpy()
    assert np.abs(theirs - untouched).max() > 1e-2  # the LoRA changes the forward

    model_config = load_config(directory)
    adapter = AdapterConfig(num_experts=1, rank=4, alpha=16.0)  # another scale: B is rescaled to keep the function
    model = Llama(model_config, adapter=adapter, adapter_targets=("q", "v", "down"))
    adapters = warm_adapters(
        tmp_path / "lora", _fresh(model), adapter=adapter, targets=("q", "v", "down"), model_config=model_config
    )
    ours = model.apply({"params": load_params(directory, model_config), "adapters": adapters}, _tokens())
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5 * np.abs(theirs).max(), rtol=0)

    with pytest.raises(UserError, match=r"adapts down,q,v but the adapter's targets are q,v: target the source's"):
        warm_adapters(tmp_path / "lora", _fresh(model), adapter=adapter, targets=("q", "v"), model_config=model_config)
    wide = AdapterConfig(num_experts=1, rank=8, alpha=16.0)
    wide_model = Llama(model_config, adapter=wide, adapter_targets=("q", "v", "down"))
    with pytest.raises(UserError, match=r"has rank 4 but the adapter's is 8: give the adapter rank 4"):
        warm_adapters(
            tmp_path / "lora", _fresh(wide_model), adapter=wide, targets=("q", "v", "down"), model_config=model_config
        )
    mixture = AdapterConfig(num_experts=4, rank=4, top_k=2, alpha=16.0)
    mixture_model = Llama(model_config, adapter=mixture, adapter_targets=("q", "v", "down"))
    with pytest.raises(
        UserError, match=r"is a PEFT LoRA, which warm-starts a plain LoRA only \(this adapter is moe_lora\)"
    ):
        warm_adapters(
            tmp_path / "lora",
            _fresh(mixture_model),
            adapter=mixture,
            targets=("q", "v", "down"),
            model_config=model_config,
        )
    with pytest.raises(UserError, match=r"is not an adapter directory: it needs adapters\.json"):
        warm_adapters(tmp_path, _fresh(model), adapter=adapter, targets=("q",), model_config=model_config)


def _eval_losses(run):
    return [
        json.loads(line)["eval_loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line
    ]


def test_a_run_started_from_an_export_begins_at_its_held_out_loss(tiny_model_dir, tmp_path):
    """MoE-LoRA (E=4) trained 6 steps and exported; a new run from that export evaluates at step 0 to the loss
    the first ended with; its checkpoints are refused to a run started from other adapters."""
    job = [*tiny_job(tiny_model_dir, write_records(tmp_path)), "--config.optim.decay_steps=100"]
    first = train(tmp_path / "first", *job, "--config.train.steps=6")
    assert first.returncode == 0, first.stderr[-2000:]
    source = tmp_path / "first" / "export" / "adapters"
    warm = train(tmp_path / "warm", *job, "--config.train.steps=2", f"--config.adapter.init_from={source}")
    assert warm.returncode == 0, warm.stderr[-2000:]
    assert f"adapters: initialised from {source}; the optimizer starts fresh at step 0." in warm.stdout
    assert _eval_losses(tmp_path / "warm")[0] == pytest.approx(_eval_losses(tmp_path / "first")[-1], rel=1e-6)
    assert _eval_losses(tmp_path / "warm")[0] < _eval_losses(tmp_path / "first")[0]  # not the untrained start

    other = train(tmp_path / "warm", *job, "--config.train.steps=4")  # the same output_dir, a random start
    assert other.returncode == 2
    assert "belongs to another configuration (adapter.init_from: " in error_line(other), other.stderr[-2000:]
    wrong = train(tmp_path / "wrong", *job, "--config.adapter.rank=8", f"--config.adapter.init_from={source}")
    assert wrong.returncode == 2
    assert error_line(wrong) == (
        f"error: adapter.init_from: {source} has rank=4 but the adapter's is 8: a warm start keeps the adapter's shape "
        "(give the adapter the source's rank)."
    )
