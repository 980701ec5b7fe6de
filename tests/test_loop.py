"""The loop that never waits on the host: batches prepared ahead, metrics fetched late, stops agreed every few steps,
and the job built once by ``setup`` (or from shapes alone by ``setup_shapes``).

The tests that run a background thread have timeouts: a thread wedged beside XLA's runtime must fail the test, not
hang CI.
"""

import signal
import socket
import threading
import time

import jax
import numpy as np
import pytest
from train_cli import ROOT, apply_overrides, records, start, tiny_job, write_records

from moelora_jax.data.encoding import batch_indices
from moelora_jax.data.pipeline import Prefetcher
from moelora_jax.errors import UserError
from moelora_jax.models.llama import LlamaConfig
from moelora_jax.training import loop
from moelora_jax.training.config_file import load_config
from moelora_jax.training.job import setup, setup_shapes
from moelora_jax.training.preemption import EXIT_PREEMPTED
from moelora_jax.training.settings import Settings

pytestmark = pytest.mark.timeout(300)


def _settings(model_dir, data_path, output_dir, **overrides) -> Settings:
    """The tiny job of ``train_cli.tiny_job`` as settings, 8 examples per step over the 8 test devices."""
    config = apply_overrides(
        load_config(ROOT / "configs" / "llama_moelora.py", "smoke"), tiny_job(model_dir, data_path)
    )
    config.output_dir, config.compilation_cache = str(output_dir), ""
    config.train.batch_size = config.train.eval_batch_size = 8
    config.mesh.tensor = 2  # the 8 test devices as 4 data shards x 2-way tensor parallelism
    for key, value in overrides.items():
        section, name = key.split("__")
        config[section][name] = value
    return Settings.from_config(config)


@pytest.fixture
def tiny_settings(tiny_model_dir, tmp_path):
    rows = [{"prompt": "what colour is the sky ? " * (i % 3 + 1), "response": "blue"} for i in range(24)]
    data = write_records(tmp_path, rows)  # three lengths, so that batches differ from step to step
    return lambda **overrides: _settings(tiny_model_dir, data, tmp_path / "run", **overrides)


def test_prefetched_batches_equal_the_plain_path_at_every_step_and_after_a_resume(tiny_settings):
    job = setup(tiny_settings(train__steps=12, train__micro_batches=2, data__pack_length=48))
    batches, encoded = job.batches, job.data.train

    def plain(step):  # drawn and laid out directly, as the loop before prefetching did
        examples = [encoded[i] for i in batch_indices(len(encoded), 8, seed=0, step=step - 1)]
        rows = batches.layout(examples, batches.pad_id)
        return {k: v.reshape(2, -1, *v.shape[1:]) for k, v in rows.items()}, sum(len(e.tokens) for e in examples)

    for first in (1, 7):  # a fresh run, and one resumed at step 6
        with Prefetcher(batches, range(first, 13)) as prefetched:
            seen = list(prefetched)
        assert [b.step for b in seen] == list(range(first, 13))
        for batch in seen:
            arrays, tokens = plain(batch.step)
            assert batch.tokens == tokens and batch.arrays.keys() == arrays.keys()
            for name, value in arrays.items():
                placed = batch.arrays[name]
                assert placed.sharding == jax.sharding.NamedSharding(job.mesh, jax.P(None, ("data", "fsdp")))
                np.testing.assert_array_equal(np.asarray(placed), value, err_msg=f"step {batch.step} {name}")
    job.log.close()


def test_an_error_in_the_batch_thread_surfaces_as_itself_and_the_thread_ends():
    error = UserError("bad row 3")

    def produce(item):
        if item == 3:
            raise error
        return item * 10

    with pytest.raises(UserError) as raised, Prefetcher(produce, range(6)) as prefetched:
        got = []
        for value in prefetched:
            got.append(value)
    assert raised.value is error and got == [0, 10, 20]
    assert any(frame.name == "produce" for frame in raised.traceback)  # the traceback reaches into the thread
    assert not any(t.name == "moelora_jax-prefetch" for t in threading.enumerate())


def test_a_consumer_that_stops_early_stops_the_thread():
    produced = []

    def produce(item):
        produced.append(item)
        return item

    with Prefetcher(produce, range(1000), depth=2) as prefetched:
        for value in prefetched:
            if value == 2:
                break
    assert not any(t.name == "moelora_jax-prefetch" for t in threading.enumerate())
    assert len(produced) <= 3 + 2 + 1  # what was consumed, the queue's depth, and the one in progress


def test_the_steady_state_loop_fetches_only_the_logged_steps_each_while_the_next_step_runs(tiny_settings, monkeypatch):
    """Every read from the devices goes through ``fetch``; with ``log_every=3`` over 9 steps it is called three
    times, each for a step whose successor has already been dispatched (the last, after the loop's end)."""
    job = setup(tiny_settings(train__steps=9, train__log_every=3, train__eval_before=False, checkpoint__every=0))
    dispatched, fetched = [], []
    train_step = job.trainer.train_step

    def counting_step(state, params, batch):
        out = train_step(state, params, batch)
        dispatched.append(len(dispatched) + 1)
        return out

    def counting_fetch(tree):
        fetched.append(len(dispatched))
        return jax.device_get(tree)

    monkeypatch.setattr(job.trainer, "train_step", counting_step)
    monkeypatch.setattr(loop, "fetch", counting_fetch)
    state, training = loop.train_loop(job, job.state)
    assert dispatched == list(range(1, 10))
    assert fetched == [4, 7, 9]  # steps 3 and 6 read after steps 4 and 7 were dispatched; step 9 at the end
    assert [r["step"] for r in job.log.records if r["event"] == "train"] == [3, 6, 9]
    assert training.tokens == sum(job.batches(s).tokens for s in range(1, 10))
    assert int(state.step) == 9
    job.log.close()


def test_a_refused_attempt_leaves_the_run_record_untouched(tiny_settings):
    """A resume refused for its fingerprint changes neither ``config.json`` nor ``commands.jsonl`` nor the
    metrics: the setup checks before it records."""
    job = setup(tiny_settings(train__steps=2))
    loop.train_loop(job, job.state)
    job.log.close()
    run = job.output.local
    before = {name: (run / name).read_bytes() for name in ("config.json", "commands.jsonl", "metrics.jsonl")}
    with pytest.raises(UserError, match="belongs to another configuration"):
        setup(tiny_settings(train__steps=4, adapter__targets="q,v"))
    assert {name: (run / name).read_bytes() for name in before} == before


def test_setup_shapes_bounds_every_real_batch_and_compiles_the_step_that_runs_on_random_weights(tiny_settings):
    settings = tiny_settings(train__steps=6, train__micro_batches=2, data__pack_length=48)
    job = setup(settings)
    shapes = setup_shapes(settings)  # model.path's config.json only
    assert shapes.model_config == job.model_config
    for step in range(1, 7):
        real = job.batches.host(step)
        assert real.keys() == shapes.train_batch.keys()
        for name, value in real.items():
            bound = shapes.train_batch[name]
            assert value.dtype == bound.dtype and value.ndim == len(bound.shape)
            assert all(r <= b for r, b in zip(value.shape, bound.shape, strict=True)), (name, value.shape)
    for batch in job.eval_batches:
        assert all(batch[k].shape[0] <= shapes.eval_batch[k].shape[0] for k in batch)
    abstract_state = jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), shapes.state)
    assert abstract_state == jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), job.state)
    params = shapes.random_params(jax.random.key(1))
    assert jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), params) == jax.tree.map(
        lambda x: (x.shape, x.dtype, x.sharding), shapes.params
    )
    compiled = shapes.trainer.compile_train_step(shapes.state, shapes.params, shapes.train_batch)
    worst = {k: np.zeros(v.shape, v.dtype) for k, v in shapes.train_batch.items()}
    worst["tokens"][...], worst["attention_mask"][...], worst["segment_ids"][...] = 3, 1, 1
    worst["positions"][...] = np.arange(worst["tokens"].shape[-1])
    worst["loss_mask"][..., 1:] = True
    worst["targets"][...] = np.arange(worst["targets"].shape[-1])
    state, metrics = compiled(job.trainer.init(jax.random.key(0)), params, job.trainer.put_batch(worst, leading=1))
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
    job.log.close()


def test_setup_shapes_of_a_published_shape_needs_no_files(tiny_settings):
    shapes = setup_shapes(tiny_settings(), "llama-3.1-8b")
    assert isinstance(shapes.model_config, LlamaConfig) and shapes.model_config.hidden_size == 4096
    embedding = shapes.params["embedding"]
    assert embedding.shape == (128256, 4096) and embedding.sharding.mesh == shapes.mesh
    assert shapes.train_batch["tokens"].shape == (1, 8, 24)  # 8 examples per step, each alone in a row of 24


@pytest.mark.timeout(600)
def test_two_processes_stop_together_within_stop_check_every_steps_and_exit_75(tiny_model_dir, tmp_path):
    """SIGTERM to process 1 alone: both processes checkpoint the same step, the first multiple of
    ``stop_check_every`` after the signal, and exit 75."""
    args = [*tiny_job(tiny_model_dir, write_records(tmp_path)), "--config.train.steps=40"]
    args += ["--config.train.stop_check_every=3", "--config.checkpoint.every=0", "--config.optim.decay_steps=100"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    processes = [
        start(
            run,
            *args,
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}",
            devices=2,
            log=tmp_path / f"process{i}.log",
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in processes), "a process ended before the signal"
        try:
            logged = max(r["step"] for r in records(run))
        except (FileNotFoundError, ValueError, KeyError):
            logged = 0
        if logged >= 4:
            break
        time.sleep(0.01)
    processes[1].send_signal(signal.SIGTERM)
    assert [p.wait(timeout=300) for p in processes] == [EXIT_PREEMPTED] * 2
    stopped = max(r["step"] for r in records(run))
    assert stopped % 3 == 0 and logged <= stopped <= logged + 2 + 3, (logged, stopped)
    assert [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()] == [stopped]
    last = (tmp_path / "process0.log").read_text().strip().splitlines()[-1]
    assert last.startswith(f"stopped by a signal on another process after step {stopped}")
