"""``train.py`` end to end on a tiny model directory, and its one-line errors for bad input."""

import json

import pytest
from train_cli import error_line, records, tiny_job, train, write_records

from moelora_jax.export import load_adapters


def test_a_tiny_job_runs_end_to_end(tiny_model_dir, tmp_path):
    records = [{"prompt": "what colour is the sky ?", "response": "the answer is blue .", "label": "blue"}] * 12
    cache = tmp_path / "xla-cache"
    job = tiny_job(tiny_model_dir, write_records(tmp_path, records))
    result = train(tmp_path / "run", *job, f"--config.compilation_cache={cache}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(cache.iterdir())) >= 2  # the compiled programs (at least the train step and generation)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval_loss_after"] < summary["eval_loss_before"]
    events = [json.loads(line)["event"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert events == ["eval", "train", "train", "train", "eval"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--config.optim.nope=1"], "error: unknown config key 'nope'"),
        (["--config.optim.lr=fast"], "error: flag --config.optim.lr=fast: could not convert string to float"),
        (["--config.adapter.top_k=30"], "top_k=30 must lie in [1, num_experts=20]"),
        (["--config.adapter.rank=0"], "rank=0 must be a positive integer"),
        (["--config.adapter.kind=mole"], "adapter.kind=mole needs the mole.* settings: use --config configs/mole.py"),
        (["--config.adapter.balance_loss=-1"], "adapter.balance_loss=-1.0 and adapter.z_loss=0.0 must be >= 0"),
        (["--config.data.task=squad"], "data.task='squad' is not a task format"),
        (["--config.data.pack_length=100"], "data.pack_length=100 must be 0 (rows as long as the window) or at least"),
        (["--config.data.length_bucket=0"], "data.length_bucket=0 must be >= 1"),
        (["--config.model.attention=flash"], "model.attention='flash' must be one of ('xla', 'cudnn')"),
        (["--config.model.path=/no/such/model"], "model path /no/such/model does not exist"),
    ],
)
def test_bad_config_fails_before_loading_anything(tmp_path, overrides, message):
    result = train(tmp_path / "run", *overrides)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]


def test_bad_data_fails_with_one_line(tiny_model_dir, tmp_path):
    good = {"prompt": "why ?", "response": "yes"}
    cases = [
        ([good, '{"prompt": "why ?", "response"\n'], "train.jsonl:2: malformed JSON line"),
        ([], "gave no 'train' examples"),
        (
            [{"prompt": " ".join(["why"] * 40), "response": "yes"}],
            "the prompt alone is 42 tokens, longer than the window of 24",
        ),
    ]
    for lines, message in cases:
        result = train(tmp_path / "run", *tiny_job(tiny_model_dir, write_records(tmp_path, lines)))
        line = error_line(result)
        assert message in line and line.startswith("error:"), result.stderr[-2000:]


def test_a_plain_lora_job_exports_peft_and_merged_weights_that_agree(tiny_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    run = tmp_path / "run"
    job = tiny_job(tiny_model_dir, write_records(tmp_path))
    result = train(run, *job, "--config.adapter.kind=lora", "--config.train.eval_before=False")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["step"] for r in records(run, "eval")] == [3]  # eval_before=False: no step-0 evaluation
    assert sorted(p.name for p in (run / "export").iterdir()) == ["adapters", "merged", "peft"]
    tokens = torch.tensor([[1, 16, 17, 18, 19, 20]])
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        plain = base(tokens).logits
        with_peft = peft.PeftModel.from_pretrained(base, run / "export" / "peft").eval()(tokens).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(run / "export" / "merged").eval()(tokens).logits
    assert (with_peft - plain).abs().max() > 1e-5  # three steps of training moved the adapter off zero
    torch.testing.assert_close(merged, with_peft, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("kind", "riemann"), [("lora", True), ("lora", False), ("moe_lora", True), ("moe_lora", False)]
)
def test_moslora_trains_through_the_trainer(tiny_model_dir, tmp_path, kind, riemann):
    run = tmp_path / "run"
    job = tiny_job(tiny_model_dir, write_records(tmp_path))
    result = train(run, *job, f"--config.adapter.kind={kind}", f"--config.optim.riemann={riemann}", config="moslora.py")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["adapter"]["mixer"] and summary["eval_loss_after"] < summary["eval_loss_before"]
    exported = load_adapters(run / "export" / "adapters")
    mixer = exported.adapters["layers"]["attn"]["q_proj"]["mixer"]
    assert mixer.shape[:2] == (2, 1 if kind == "lora" else 4) and exported.adapter.mixer
