"""The path layer against a GCS emulator on loopback: remote inputs read through local copies fetched once per
version, and a remote output directory mirrored from its local staging copy without touching the checkpoints."""

import os

import pytest
from gcs_emulator import files, upload

from moelora_jax.errors import UserError
from moelora_jax.io import storage
from moelora_jax.io.storage import OutputDirectory, is_remote, local_copy


def test_remote_and_local_paths_are_told_apart(tmp_path):
    assert is_remote("gs://bucket/run") and is_remote("s3://bucket/key")
    assert not is_remote("runs/x") and not is_remote(tmp_path)
    assert os.fspath(storage.as_path("gs://bucket/a/b")) == "gs://bucket/a/b"
    assert os.fspath(storage.as_path("runs/x")) == os.fspath(tmp_path.cwd() / "runs" / "x")
    assert local_copy(tmp_path / "model") == tmp_path / "model"  # a local path is read in place


def test_a_remote_directory_is_copied_once_per_version_of_each_file(gcs, tmp_path, monkeypatch):
    source = tmp_path / "model"
    (source / "sub").mkdir(parents=True)
    (source / "config.json").write_text('{"a": 1}')
    (source / "sub" / "weights.bin").write_bytes(b"\x01" * 1000)
    bucket = gcs.bucket()
    remote = upload(source, bucket / "model")
    fetched = []
    fetch = storage._fetch
    monkeypatch.setattr(storage, "_fetch", lambda s, t: (fetched.append(t.name), fetch(s, t)))

    copy = local_copy(os.fspath(remote), cache=tmp_path / "cache")
    assert copy == tmp_path / "cache" / "gs" / bucket.name / "model"
    assert (copy / "config.json").read_text() == '{"a": 1}' and (
        copy / "sub" / "weights.bin"
    ).read_bytes() == b"\1" * 1000
    assert sorted(fetched) == ["config.json", "weights.bin"]

    fetched.clear()
    assert local_copy(os.fspath(remote), cache=tmp_path / "cache") == copy
    assert fetched == []  # nothing changed: nothing fetched

    (remote / "config.json").write_text('{"a": 2}')  # same size, a new version
    (remote / "sub" / "weights.bin").unlink()
    local_copy(os.fspath(remote), cache=tmp_path / "cache")
    assert fetched == ["config.json"]
    assert (copy / "config.json").read_text() == '{"a": 2}' and not (copy / "sub" / "weights.bin").exists()

    fetched.clear()
    single = local_copy(os.fspath(remote / "config.json"), cache=tmp_path / "files")
    assert single.read_text() == '{"a": 2}' and fetched == ["config.json"]
    assert local_copy(os.fspath(remote / "config.json"), cache=tmp_path / "files") == single
    assert fetched == ["config.json"]  # a single file too is fetched once per version


def test_missing_remote_inputs_and_buckets_fail_in_one_line(gcs, tmp_path):
    bucket = gcs.bucket()
    with pytest.raises(UserError, match=r"^gs://.*/absent does not exist: check the bucket and the path\.$"):
        local_copy(os.fspath(bucket / "absent"), cache=tmp_path)
    output = OutputDirectory("gs://no-such-bucket-here/run", staging=tmp_path)
    with pytest.raises(UserError, match=r"^output_dir gs://no-such-bucket-here/run is not writable \("):
        output.prepare()


def test_a_remote_output_directory_mirrors_its_staging_copy_but_not_the_checkpoints(gcs, tmp_path):
    bucket = gcs.bucket()
    root = bucket / "run"
    output = OutputDirectory(os.fspath(root), staging=tmp_path / "host1")
    output.prepare()
    assert output.remote and output.local == tmp_path / "host1" / "gs" / bucket.name / "run"
    (root / "checkpoints" / "4" / "state").write_text("orbax writes here itself")
    (root / "export" / "merged" / "model.safetensors").write_text("an earlier export")
    (output.local / "tensorboard").mkdir()
    (output.local / "tensorboard" / "events.1").write_text("e1")
    (output.local / "metrics.jsonl").write_text('{"step": 1}\n')
    output.push()
    staged = {"tensorboard/events.1", "metrics.jsonl"}
    assert files(root) == {"checkpoints/4/state", "export/merged/model.safetensors", *staged}

    # another host resumes: its staging copy is the remote files, without checkpoints and exports
    resumed = OutputDirectory(os.fspath(root), staging=tmp_path / "host2")
    resumed.pull()
    assert {p.relative_to(resumed.local).as_posix() for p in resumed.local.rglob("*") if p.is_file()} == staged
    (resumed.local / "tensorboard" / "events.1").unlink()  # a fresh attempt drops the old events
    (resumed.local / "tensorboard" / "events.2").write_text("e2")
    (resumed.local / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (resumed.local / "export" / "adapters").mkdir(parents=True)
    (resumed.local / "export" / "adapters" / "adapters.safetensors").write_text("new")
    resumed.push()
    assert files(root) == {
        "checkpoints/4/state",
        "export/merged/model.safetensors",  # not staged here, so not this run's to delete
        "export/adapters/adapters.safetensors",
        "tensorboard/events.2",
        "metrics.jsonl",
    }
    assert (root / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    assert output.remote_path(output.local / "export" / "adapters") == os.fspath(root / "export" / "adapters")
