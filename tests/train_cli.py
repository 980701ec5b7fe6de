"""Running ``train.py`` as a user does, in a subprocess, on a tiny model directory (shared by the CLI tests)."""

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from moelora_jax.training.run_log import METRICS_FILE, read_records

ROOT = Path(__file__).resolve().parents[1]
# One persistent XLA compilation cache for every run of the session: the runs compile the same few programs.
XLA_CACHE = tempfile.mkdtemp(prefix="moelora_jax_test_xla_cache-")
atexit.register(shutil.rmtree, XLA_CACHE, ignore_errors=True)
RECORDS = [{"prompt": "what colour is the sky ?", "response": "the answer is blue .", "label": "blue"}] * 12


def write_records(directory: Path, records=RECORDS, name: str = "train.jsonl") -> Path:
    path = directory / name
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records))
    return path


def tiny_job(model_dir: Path, data_path: Path) -> list[str]:
    """Overrides of the smoke preset for a tiny prompt/response job on ``model_dir``."""
    return [
        f"--config.model.path={model_dir}",
        "--config.data.task=prompt_response",
        f"--config.data.train_path={data_path}",
        "--config.data.eval_split=train",
        "--config.data.max_length=24",
        "--config.adapter.num_experts=4",
        "--config.adapter.top_k=2",
        "--config.train.eval_batch_size=4",
        "--config.data.max_eval_examples=4",
    ]


def apply_overrides(config, overrides: list[str]):
    """``config`` (a ``ConfigDict``) with ``--config.section.key=value`` overrides applied, each value converted to
    the type of the key's default, as ``train.py`` does for these simple values."""
    for flag in overrides:
        key, value = flag.removeprefix("--config.").split("=", 1)
        section, name = key.split(".")
        default = config[section][name]
        config[section][name] = (value == "True") if isinstance(default, bool) else type(default)(value)
    return config


def command(
    output_dir: Path | str, *overrides: str, preset: str = "smoke", config: str = "llama_moelora.py"
) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        f"--config={ROOT / 'configs' / config}:{preset}",
        f"--config.output_dir={output_dir}",
        *overrides,
    ]


def environment(devices: int = 1, extra: dict[str, str] | None = None) -> dict[str, str]:
    flags = "--xla_cpu_multi_thread_eigen=false"
    if devices > 1:
        flags += f" --xla_force_host_platform_device_count={devices}"
    return {
        **os.environ,
        "XLA_FLAGS": flags,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": XLA_CACHE,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        **(extra or {}),
    }


def train(
    output_dir: Path | str,
    *overrides: str,
    preset: str = "smoke",
    devices: int = 1,
    config: str = "llama_moelora.py",
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """``train.py --config configs/<config>:<preset>`` to completion; stdout and stderr captured. ``env`` adds to the
    environment; ``cwd`` defaults to the output directory's parent (a remote ``output_dir`` needs one)."""
    return subprocess.run(
        command(output_dir, *overrides, preset=preset, config=config),
        capture_output=True,
        text=True,
        env=environment(devices, env),
        cwd=cwd or Path(output_dir).parent,
        timeout=600,
    )


def start(
    output_dir: Path | str,
    *overrides: str,
    devices: int = 1,
    log: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """``train.py`` in the background, its output to ``log`` (default: beside a local output directory)."""
    log = log or Path(output_dir).parent / f"{Path(output_dir).name}.log"
    with open(log, "w") as out:
        return subprocess.Popen(
            command(output_dir, *overrides), stdout=out, stderr=subprocess.STDOUT, env=environment(devices, env)
        )


def error_line(result: subprocess.CompletedProcess) -> str:
    """The ``error: ...`` line of a failed run (or its last line)."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    return next((line for line in lines if line.startswith("error:")), lines[-1] if lines else "")


def records(output_dir: Path, event: str = "train") -> list[dict]:
    """The run's ``event`` records; a missing ``metrics.jsonl`` raises, a half-written last line too."""
    path = output_dir / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(path)
    return [r for r in read_records(path) if r["event"] == event]


def one_job_on_processes(
    output_dirs: list[Path | str], args: list[str], log_dir: Path, envs: list[dict[str, str]] | None = None
) -> tuple[list[int], str]:
    """One ``jax.distributed`` job on localhost, process ``i`` writing to ``output_dirs[i]`` with 2 CPU devices and
    ``envs[i]`` added to its environment; returns the exit codes and the tail of each process's log."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    count = len(output_dirs)
    processes = [
        start(
            output_dir,
            *args,
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            f"--config.distributed.num_processes={count}",
            f"--config.distributed.process_id={i}",
            devices=2,
            log=log_dir / f"process{i}.log",
            env=envs[i] if envs else None,
        )
        for i, output_dir in enumerate(output_dirs)
    ]
    codes = [p.wait(timeout=600) for p in processes]
    return codes, "\n".join((log_dir / f"process{i}.log").read_text()[-1500:] for i in range(count))
