"""``model.path=org/name``: resolved through huggingface_hub's own cache, offline (``HF_HUB_OFFLINE=1``), from a
cache laid out here as the hub lays it out; safetensors only; a local path of the same name wins."""

import json
import shutil

from train_cli import error_line, tiny_job, train, write_records

from moelora_jax.io.hub import is_hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache, repo_id, files_from=None, files=None):
    """``repo_id`` in a hub cache at ``cache``: ``models--org--name/{refs/main, snapshots/<commit>/...}``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    if files_from is not None:
        for path in files_from.iterdir():
            shutil.copy(path, snapshot / path.name)
    for name, text in (files or {}).items():
        (snapshot / name).write_text(text)
    return snapshot


def test_hub_ids_are_told_from_paths():
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") and is_hub_id("org/name@v1.0")
    assert not is_hub_id("/models/llama") and not is_hub_id("runs/x/y") and not is_hub_id("model.gguf")
    assert not is_hub_id("gs://bucket/model") and not is_hub_id("./org/name") and not is_hub_id("org/model.gguf")


def test_a_hub_id_trains_from_the_offline_cache_and_bad_ones_fail_in_one_line(tiny_model_dir, tmp_path):
    cache = tmp_path / "hub"
    _cache_repo(cache, "tiny-org/tiny-llama", files_from=tiny_model_dir)
    _cache_repo(cache, "tiny-org/pickled", files={"config.json": json.dumps({}), "pytorch_model.bin": "x"})
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    data = write_records(tmp_path)
    result = train(tmp_path / "run", *tiny_job("tiny-org/tiny-llama", data), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model"] == str(cache / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT)

    missing = train(tmp_path / "missing", *tiny_job("tiny-org/absent", data), env=env)
    assert error_line(missing).startswith(
        "error: model.path=tiny-org/absent is not in the Hugging Face cache and cannot be downloaded (offline"
    ), missing.stderr[-2000:]
    pickled = train(tmp_path / "pickled", *tiny_job("tiny-org/pickled", data), env=env)
    assert error_line(pickled).startswith("error: model.path=tiny-org/pickled has no safetensors weights (pickled")

    local = tmp_path / "tiny-org" / "tiny-llama"  # a local directory of the same name wins over the hub id
    shutil.copytree(tiny_model_dir, local)
    result = train(tmp_path / "local", *tiny_job("tiny-org/tiny-llama", data), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "local" / "summary.json").read_text())["model"] == "tiny-org/tiny-llama"
