"""Orbax checkpoints of the train state: exact resume, refusal of other configs, damaged and interrupted saves."""

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from moelora_jax import AdapterConfig
from moelora_jax.errors import UserError
from moelora_jax.models.llama import Llama, LlamaConfig, init_variables
from moelora_jax.optim.optimizer import OptimConfig, build_optimizer
from moelora_jax.parallel.sharding import make_mesh
from moelora_jax.training.checkpoints import DIGEST_FILE, ITEMS, Checkpoints, fingerprint_differences
from moelora_jax.training.trainer import Trainer, TrainState

CONFIG = LlamaConfig(64, 32, 64, 2, 4, 2, 8)
ROOT = Path(__file__).resolve().parents[1]
ADAPTER = AdapterConfig(num_experts=4, rank=2, top_k=2, dropout=0.1)


def _trainer(adapter=ADAPTER, mesh=(4, 2, 1)):
    model = Llama(CONFIG, adapter=adapter)
    params = init_variables(model, jax.random.key(0), ("params",))["params"]
    adapters = init_variables(model, jax.random.key(1), ("adapters",))["adapters"]
    optimizer = build_optimizer(OptimConfig(family="adamw", lr=3e-2, gate_lr=1e-2, riemann=True), adapters)
    trainer = Trainer(model, optimizer, make_mesh(*mesh, devices=jax.devices("cpu")[: int(np.prod(mesh))]))
    return trainer, trainer.place_params(params)


def _batch(step):
    rng = np.random.RandomState(step)
    tokens = rng.randint(3, 64, (2, 8, 12)).astype(np.int32)
    return {"tokens": tokens, "attention_mask": np.ones_like(tokens), "loss_mask": np.ones_like(tokens, bool)}


def _host(state):
    return jax.tree.map(np.asarray, state._replace(rng=jax.random.key_data(state.rng)))


def _assert_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, _host(a), _host(b))


def test_resumed_training_is_bit_identical(tmp_path):
    """Dropout on, Adam + riemann_precond: a run stopped at step 3 and restored into a freshly built trainer (another
    seed) continues exactly as the uninterrupted run; restoring onto another mesh layout reads the same values."""
    trainer, params = _trainer()
    state, losses = trainer.init(jax.random.key(0)), []
    for step in range(6):
        state, metrics = trainer.train_step(state, params, _batch(step))
        losses.append(float(metrics["loss"]))
        if step == 2:
            checkpoints = Checkpoints(tmp_path, {"run": "a"})
            checkpoints.save(state)
            checkpoints.close()
            at_three = _host(state)

    other_mesh, _ = _trainer(mesh=(2, 1, 1))
    jax.tree.map(
        np.testing.assert_array_equal,
        _host(Checkpoints(tmp_path, {"run": "a"}).restore(other_mesh.init(jax.random.key(7)))),
        at_three,
    )
    trainer, params = _trainer()
    resumed = Checkpoints(tmp_path, {"run": "a"}).restore(trainer.init(jax.random.key(99)))
    assert int(resumed.step) == 3
    resumed_losses = []
    for step in range(3, 6):
        resumed, metrics = trainer.train_step(resumed, params, _batch(step))
        resumed_losses.append(float(metrics["loss"]))
    assert resumed_losses == losses[3:]
    _assert_equal(resumed, state)


def test_only_the_newest_are_kept_and_a_named_step_restores(tmp_path):
    trainer, params = _trainer()
    state = trainer.init(jax.random.key(0))
    checkpoints = Checkpoints(tmp_path, {}, keep=2)
    saved = {}
    for step in range(4):
        state, _ = trainer.train_step(state, params, _batch(step))
        checkpoints.save(state)
        saved[step + 1] = _host(state)
    checkpoints.wait()
    assert checkpoints.steps() == [3, 4] and checkpoints.latest_step() == 4
    jax.tree.map(np.testing.assert_array_equal, _host(checkpoints.restore(state, step=3)), saved[3])
    with pytest.raises(ValueError, match=r"no checkpoint for step 1 .* it has steps \[3, 4\]"):
        checkpoints.restore(state, step=1)
    checkpoints.close()


def test_another_configuration_is_refused_with_what_differs(tmp_path):
    trainer, _ = _trainer()
    checkpoints = Checkpoints(tmp_path, {"adapter": {"num_experts": 4, "rank": 2}, "data": {"seed": 0}})
    checkpoints.save(trainer.init(jax.random.key(0)))
    checkpoints.close()
    other = Checkpoints(tmp_path, {"adapter": {"num_experts": 8, "rank": 2}, "data": {"seed": 0}})
    with pytest.raises(ValueError, match=r"another configuration \(adapter\.num_experts: 4 -> 8\)"):
        other.restore(_trainer(AdapterConfig(num_experts=8, rank=2, top_k=2))[0].init(jax.random.key(0)))
    assert fingerprint_differences({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == ["a.c: '<absent>' -> 2"]


def _three_checkpoints(directory):
    """Checkpoints 0, 1 and 2 of a training run in ``directory``, and the states saved."""
    trainer, params = _trainer()
    state, saved = trainer.init(jax.random.key(0)), {}
    checkpoints = Checkpoints(directory, {})
    for step in range(3):
        if step:
            state, _ = trainer.train_step(state, params, _batch(step))
        checkpoints.save(state, step=step)
        saved[step] = _host(state)
    checkpoints.close()
    return trainer, saved


def _damage(path, how):
    data = path.read_bytes()
    if how == "flip":  # 16 bytes in the middle, the size and the structure kept: bit rot
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0x5A for b in data[middle : middle + 16]) + data[middle + 16 :])
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.unlink()


def _contents(directory):
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_checkpoint_whose_files_changed_is_refused_naming_the_newest_that_verifies(tmp_path):
    """Each file of the latest checkpoint's items in turn, with 16 bytes flipped (bit rot), cut short or deleted:
    restoring is refused in one line naming that file and the checkpoint to resume from, before orbax reads
    anything, and the directory is left as it was; that checkpoint restores exactly. With the earlier ones damaged
    too, the line says none verifies."""
    trainer, saved = _three_checkpoints(tmp_path)
    files = sorted(p for item in ITEMS for p in (tmp_path / "2" / item).rglob("*") if p.is_file())
    files = [p for p in files if p.name != "commit_success.txt"]
    assert len(files) > 5
    checkpoints, like = Checkpoints(tmp_path, {}), trainer.init(jax.random.key(5))
    for how in ("flip", "truncate", "delete"):
        for path in files:
            intact = path.read_bytes()
            _damage(path, how)
            before = _contents(tmp_path)
            message = (
                rf"checkpoint \S*/2 is damaged: {re.escape(path.relative_to(tmp_path / '2').as_posix())} differ "
                r"from the digest written when it was saved: restore step 1 instead, the newest checkpoint that "
                r"verifies, or move the damaged one aside\.$"
            )
            with pytest.raises(UserError, match=message):
                checkpoints.restore(like)
            assert _contents(tmp_path) == before, how
            path.write_bytes(intact)
    _damage(files[-1], "flip")
    jax.tree.map(np.testing.assert_array_equal, _host(checkpoints.restore(like, 1)), saved[1])
    for step in (0, 1):
        _damage(tmp_path / str(step) / files[-1].relative_to(tmp_path / "2"), "flip")
    with pytest.raises(UserError, match="no earlier checkpoint verifies: move the checkpoints aside to start afresh"):
        checkpoints.restore(like)
    checkpoints.close()


def test_a_checkpoint_without_a_digest_restores_with_a_warning_and_unreadable_fails_in_one_line(tmp_path, capsys):
    """Checkpoints written before digests: restored unverified, saying so; one whose files are cut short fails in
    one line naming the earlier step (orbax's and tensorstore's errors caught, not a traceback)."""
    trainer, saved = _three_checkpoints(tmp_path)
    for step in range(3):
        (tmp_path / str(step) / DIGEST_FILE).unlink()
    checkpoints = Checkpoints(tmp_path, {})
    jax.tree.map(np.testing.assert_array_equal, _host(checkpoints.restore(trainer.init(jax.random.key(5)))), saved[2])
    assert capsys.readouterr().err == (
        f"warning: checkpoint {tmp_path / '2'} has no digest (written before checkpoints were verified): restoring it "
        "unverified.\n"
    )
    for path in (tmp_path / "2" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 64:
            _damage(path, "truncate")
    with pytest.raises(UserError, match=r"checkpoint .*/2 cannot be read \(.*\): move it aside to resume from step 1"):
        checkpoints.restore(trainer.init(jax.random.key(0)))
    checkpoints.close()


_SAVER = textwrap.dedent(
    """
    import sys, jax, numpy as np
    from moelora_jax.training.checkpoints import Checkpoints
    from moelora_jax.training.trainer import TrainState

    def state(step, fill):
        big = {"w": np.full((8, 1024, 1024), fill, np.float32)}  # 32 MiB: the save takes a while
        return TrainState(np.int32(step), big, {}, jax.random.key(step), np.int32(0))

    checkpoints = Checkpoints(sys.argv[1], {})
    checkpoints.save(state(1, 1.0))
    checkpoints.wait()
    print("saving", flush=True)
    checkpoints.save(state(2, 2.0))
    checkpoints.wait()
    print("saved", flush=True)
    """
)


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3])
def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path, delay):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    saver = subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    assert saver.stdout.readline().strip() == "saving"
    time.sleep(delay)
    saver.send_signal(signal.SIGKILL)
    saver.wait(timeout=60)

    like = TrainState(np.int32(0), {"w": np.zeros((8, 1024, 1024), np.float32)}, {}, jax.random.key(0), np.int32(0))
    like = jax.tree.map(jax.numpy.asarray, like)
    checkpoints = Checkpoints(tmp_path, {})
    assert 1 in checkpoints.steps()
    for step in checkpoints.steps():  # step 1 for sure; step 2 only if it was complete, and then whole
        restored = checkpoints.restore(like, step=step)
        assert int(restored.step) == step and np.all(np.asarray(restored.adapters["w"]) == float(step))
    # The resumed run reaches step 2 again: its save goes through whatever the killed one left behind.
    checkpoints.save(like._replace(step=np.int32(2), adapters={"w": like.adapters["w"] + 3.0}), step=2)
    checkpoints.close()
    restored = Checkpoints(tmp_path, {}).restore(like)
    assert int(restored.step) == 2 and np.all(np.asarray(restored.adapters["w"]) == 3.0)


# tensorstore's write callbacks outlive the failed save's event loop and complain about it; harmless here
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_disk_that_fills_during_a_save_fails_in_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, tmpfs):
    """The space check before a save refuses one that cannot fit; when the disk fills anyway (another writer), the
    failed background save is reported as one UserError and the previous checkpoint stays whole."""
    with tmpfs(tmp_path / "disk", "size=3m") as disk:
        noise = np.random.RandomState(0).standard_normal((256, 1024)).astype(np.float32)  # 1 MiB, incompressible
        state = TrainState(np.int32(1), {"w": noise}, {}, jax.random.key(1), np.int32(0))
        state = jax.tree.map(jax.numpy.asarray, state)
        checkpoints = Checkpoints(disk / "ck", {}, keep=1)
        checkpoints.save(state)
        checkpoints.wait()
        with open(disk / "filler", "wb") as f:
            f.write(b"\0" * (shutil.disk_usage(disk).free - 256 * 1024))
        with pytest.raises(UserError, match=r"checkpoint 2 needs about 2\.0 MiB .* \(steps \[1\]\) are intact"):
            checkpoints.save(state._replace(step=np.int32(2)))
        monkeypatch.setattr("moelora_jax.training.checkpoints.free_bytes", lambda directory: 1 << 40)
        with pytest.raises(UserError, match=r"could not be written .* \(steps \[1\]\) are intact"):
            checkpoints.save(state._replace(step=np.int32(2), adapters={"w": noise + 1}))
            checkpoints.wait()
        restored = Checkpoints(disk / "ck", {}).restore(state)
        assert int(restored.step) == 1 and np.array_equal(np.asarray(restored.adapters["w"]), noise)


def test_a_save_in_flight_keeps_its_values_when_the_next_step_donates_the_state(tmp_path):
    """The training loop donates the state to the next step right after ``save`` returns."""
    w = jax.random.normal(jax.random.key(0), (16, 1024, 1024))  # 64 MiB: the write is still running
    saved = np.asarray(w).copy()
    state = TrainState(jax.numpy.int32(1), {"w": w}, {}, jax.random.key(1), jax.numpy.int32(0))
    overwrite = jax.jit(lambda s: s._replace(adapters={"w": s.adapters["w"] * 0 + 7.0}), donate_argnums=0)
    checkpoints = Checkpoints(tmp_path, {})
    checkpoints.save(state)
    state = jax.block_until_ready(overwrite(state))
    checkpoints.close()
    restored = Checkpoints(tmp_path, {}).restore(state)
    np.testing.assert_array_equal(np.asarray(restored.adapters["w"]), saved)
