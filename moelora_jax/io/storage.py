"""Where a job's files live: local directories or object stores (``gs://``, ``s3://``, ...), behind one path type.

Paths are :class:`etils.epath.Path`, the type orbax itself uses (backed by ``gcsfs`` for ``gs://``): checkpoints on a
bucket go straight to it and keep orbax's commit protocol there. Everything else a job writes (metrics, TensorBoard
events, summary, curves, exports) is written as before into a local directory, whole files renamed into place, which
:class:`OutputDirectory` mirrors to the remote one. Remote inputs (a model directory, a data file) are read through a
local copy (:func:`local_copy`) fetched once per version of each file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import fsspec
from etils import epath

from moelora_jax.errors import UserError
from moelora_jax.io.atomic import write_text_atomically


def cache_root() -> Path:
    """``$MOELORA_JAX_CACHE`` or ``~/.cache/moelora_jax``: converted models, copies of remote files, staging."""
    return Path(os.environ.get("MOELORA_JAX_CACHE", Path.home() / ".cache" / "moelora_jax"))


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an object in a store (``scheme://bucket/key``) rather than a local file."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an :class:`epath.Path`: a remote one as given (it must name a bucket), a local one with ``~``
    expanded, made absolute."""
    if not is_remote(path):
        return epath.Path(Path(path).expanduser().absolute())
    scheme, rest = os.fspath(path).split("://", 1)
    if not rest.split("/")[0]:
        raise UserError(f"{os.fspath(path)} names no bucket: write {scheme}://<bucket>/<path>.")
    return epath.Path(os.fspath(path))


def _key(path: epath.Path) -> Path:
    """``scheme://bucket/a/b`` as the relative local path ``scheme/bucket/a/b``."""
    scheme, rest = os.fspath(path).split("://", 1)
    return Path(scheme, *[part for part in rest.split("/") if part])


def files_under(root: epath.Path, skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, epath.Path]]:
    """``(relative posix path, path)`` of every file under the directory ``root``, leaving out the top-level entries
    named in ``skip``; none when ``root`` does not exist (an object store has no empty directories)."""
    pending = [(root, "")] if root.is_dir() else []
    while pending:
        directory, prefix = pending.pop()
        for child in directory.iterdir():
            relative = prefix + child.name
            if not prefix and child.name in skip:
                continue
            if child.is_dir():
                pending.append((child, relative + "/"))
            else:
                yield relative, child


def _version(path: epath.Path) -> str:
    """A key that changes with every new version of the remote file ``path``: fsspec's hash of its metadata (for GCS,
    that includes the object's generation and checksum)."""
    filesystem, key = fsspec.core.url_to_fs(os.fspath(path))
    return filesystem.ukey(key)


def _fetch(source: epath.Path, target: Path) -> None:
    """Copy ``source`` to the local ``target`` under a temporary name, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        source.copy(epath.Path(partial), overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


MANIFEST = ".moelora-remote.json"
"""In a local copy of a remote directory: each file's remote version when it was fetched (``.<name>`` + this for a
copy of a single file)."""


def _refresh(files: dict[str, epath.Path], local: Path, manifest: Path, *, delete: bool) -> None:
    """Fetch into ``local`` each of ``files`` (relative name -> remote path) whose version differs from the one
    ``manifest`` records; with ``delete``, also delete the files fetched before that are gone remotely."""
    fetched = json.loads(manifest.read_text()) if manifest.exists() else {}
    current = {relative: _version(path) for relative, path in files.items()}
    for relative, version in current.items():
        if fetched.get(relative) != version or not (local / relative).exists():
            _fetch(files[relative], local / relative)
    if delete:
        for relative in fetched.keys() - current.keys():
            (local / relative).unlink(missing_ok=True)
    local.mkdir(parents=True, exist_ok=True)
    write_text_atomically(manifest, json.dumps(current))


def local_copy(source: str | os.PathLike, cache: Path | None = None) -> Path:
    """``source`` itself when it is local; for a remote file or directory, a local copy of it.

    The copy lives at ``cache/<scheme>/<bucket>/<key>`` (``cache`` defaults to ``cache_root()/remote``). A file whose
    remote version is the one recorded when it was fetched is not fetched again. Each file arrives under a temporary
    name and is renamed into place, so an interrupted copy, or one made by several processes at once, never leaves
    a partial file under its real name. Files deleted from a remote directory are deleted from its copy.
    """
    if not is_remote(source):
        return Path(source).expanduser()
    remote = as_path(source)
    local = (cache or cache_root() / "remote") / _key(remote)
    try:
        if not remote.exists():
            raise UserError(f"{source} does not exist: check the bucket and the path.")
        if remote.is_dir():
            _refresh(dict(files_under(remote)), local, local / MANIFEST, delete=True)
        else:
            _refresh({local.name: remote}, local.parent, local.parent / f".{local.name}{MANIFEST}", delete=False)
    except OSError as e:
        raise UserError(f"{source} cannot be read ({e.strerror or e}): check the path and the credentials.") from e
    return local


def free_bytes(directory: epath.Path) -> int | None:
    """Free bytes on the filesystem of the local ``directory``; None for an object store, which has no such figure."""
    return None if is_remote(directory) else shutil.disk_usage(os.fspath(directory)).free


class OutputDirectory:
    """A job's output directory, local or remote, as a local directory to write files in.

    For a local ``root``, :attr:`local` is ``root`` itself and :meth:`pull`/:meth:`push` do nothing. For a remote one,
    :attr:`local` is a staging directory, ``staging/<scheme>/<bucket>/<key>`` (default ``cache_root()/staging``):
    :meth:`pull` fills it afresh from the remote files, and :meth:`push` makes the remote files equal to it (changed
    files uploaded, ones it no longer has deleted). Uploading a file replaces its object in one step.

    Two kinds of top-level entries are exempt. Those in :attr:`REMOTE_ONLY` (orbax's checkpoints, the compilation
    cache) are written at ``root`` directly and never mirrored. Those in :attr:`PUSHED_ONLY` (the exports, which can
    be as large as the model and are written anew by every run that finishes) are not pulled; below them, a remote
    directory is mirrored only once the staging directory has one of its name.
    """

    REMOTE_ONLY = frozenset({"checkpoints", "compilation_cache"})
    PUSHED_ONLY = frozenset({"export"})

    def __init__(self, root: str | os.PathLike, staging: Path | None = None) -> None:
        self.root = as_path(root)
        self.remote = is_remote(self.root)
        self.local = (staging or cache_root() / "staging") / _key(self.root) if self.remote else Path(self.root)
        self._pushed: dict[str, tuple[int, int]] = {}

    def __str__(self) -> str:
        return os.fspath(self.root)

    def prepare(self) -> None:
        """Create the directory (and the local one) and check a file can be written in it; a ``UserError`` if not."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
            self.local.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"output_dir {self.root} is not writable ({e.strerror or e}): choose another --config.output_dir."
            ) from e

    def remote_path(self, local: str | os.PathLike) -> str:
        """Where the file or directory ``local`` (under :attr:`local`) lives in :attr:`root`."""
        return os.fspath(self.root / Path(local).relative_to(self.local).as_posix())

    def pull(self) -> None:
        """Replace the staging directory by a copy of the remote files (but the exempt ones)."""
        if not self.remote:
            return
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        for relative, path in files_under(self.root, self.REMOTE_ONLY | self.PUSHED_ONLY):
            if not Path(relative).name.startswith("."):
                _fetch(path, self.local / relative)
        self._pushed = self._local_versions()

    def push(self) -> None:
        """Upload the staged files changed since the last pull or push; delete the remote files no longer staged."""
        if not self.remote:
            return
        versions = self._local_versions()
        for relative, version in versions.items():
            if self._pushed.get(relative) != version:
                epath.Path(self.local / relative).copy(self.root / relative, overwrite=True)
        for relative, path in files_under(self.root, self.REMOTE_ONLY):
            parts = relative.split("/")
            mirrored = parts[0] not in self.PUSHED_ONLY or (self.local / "/".join(parts[:2])).exists()
            if relative not in versions and mirrored and not parts[-1].startswith("."):
                path.unlink()
        self._pushed = versions

    def _local_versions(self) -> dict[str, tuple[int, int]]:
        versions = {}
        for path in self.local.rglob("*"):
            if path.is_file() and not path.name.startswith("."):  # partial files of writes in progress
                stat = path.stat()
                versions[path.relative_to(self.local).as_posix()] = (stat.st_size, stat.st_mtime_ns)
        return versions
