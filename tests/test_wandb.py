"""Weights & Biases as a tracker: an offline run (``WANDB_MODE=offline``) holds the run's metrics and resolved config,
read back from W&B's own run file with W&B's own record schema; a resumed attempt continues the same W&B run."""

import json
import struct

import pytest
from train_cli import records, tiny_job, train, write_records

wandb_internal_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")

BLOCK, HEADER = 32768, 7


def _wandb_records(path):
    """The protobuf ``Record``s of a ``.wandb`` file: after a 7-byte file header, LevelDB's log format (32 KiB blocks
    of chunks, each ``crc32 (4) | length (2, little-endian) | type (1: full, 2: first, 3: middle, 4: last)``)."""
    data, position, pending, found = path.read_bytes(), HEADER, b"", []
    assert data[:4] == b":W&B"
    while position + HEADER <= len(data):
        room = BLOCK - position % BLOCK
        if room < HEADER:  # a block's tail too short for a chunk header is padding
            position += room
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + HEADER])
        chunk = data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            found.append(record)
            pending = b""
        elif kind in (2, 3):
            pending += chunk
        else:
            break  # zeros past the last record
    return found


def test_an_offline_wandb_run_holds_the_metrics_and_the_config(tiny_model_dir, tmp_path):
    job = [*tiny_job(tiny_model_dir, write_records(tmp_path)), "--config.log.wandb=True"]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    run = tmp_path / "run"
    for steps in (2, 4):  # a second attempt resumes the first's W&B run
        result = train(run, *job, f"--config.train.steps={steps}", "--config.checkpoint.every=2", env=env)
        assert result.returncode == 0, result.stderr[-2000:]
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    run_id = (run / "wandb_id").read_text()
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    history, config, names = {}, {}, set()
    for path in files:
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                history[items["_step"]] = history.get(items["_step"], {}) | items
            elif kind == "run":
                names.add((record.run.project, record.run.display_name))
                config |= {item.key: json.loads(item.value_json) for item in record.run.config.update}
            elif kind == "config":
                config |= {item.key: json.loads(item.value_json) for item in record.config.update}
    assert names == {("moelora_jax", "run")}
    assert config["adapter"]["config"]["num_experts"] == 4 and config["train"]["steps"] in (2, 4)
    losses = {r["step"]: r["loss"] for r in records(run)}
    assert sorted(losses) == [1, 2, 3, 4]
    for step, loss in losses.items():
        assert history[step]["train/loss"] == pytest.approx(loss, rel=1e-6), step
    assert "eval/eval_loss" in history[0] and "eval/eval_loss" in history[4]
