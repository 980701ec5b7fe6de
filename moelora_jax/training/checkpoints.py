"""Training checkpoints with orbax: everything needed to continue a run exactly, and nothing of the frozen base.

A checkpoint ``<directory>/<step>/`` holds two items:

- ``state``: the :class:`~moelora_jax.training.trainer.TrainState` (adapters, optimizer state, step, RNG as raw key
data,
  skipped-update count), each array written from the devices that hold it;
- ``meta``: JSON with the step, the data position (batches are a pure function of the data seed and the step,
  :func:`~moelora_jax.data.encoding.batch_indices`) and the run's *fingerprint*: the settings that must match for the
  saved state to mean the same thing (adapter, targets, base model, optimizer structure, training data).

Checkpoints are verified: when a save's files are all written, and before orbax commits it, the SHA-256 of every
file of its items is written beside them (``digest.json``), so the digest is part of the commit (orbax calls back on
the primary process once every process has written its part: that one digest covers all of them). A restore
hashes the files again before orbax reads any of them: a checkpoint whose bytes changed on disk (bit rot, a
truncated or lost file) is refused with one line naming the newest earlier checkpoint that verifies. A checkpoint
written before digests existed restores with a one-line warning.

Saves are atomic: orbax writes into a temporary directory and renames it when complete, so a crash, a kill or a
full disk during a save leaves the earlier checkpoints as they were (an unfinished one stays a
``<step>.orbax-checkpoint-tmp`` directory, never read), and the oldest are deleted only after a newer one is
complete (on an object store such as ``gs://``, orbax marks a complete checkpoint with a commit file instead of a
rename). A save is not started at all when a local disk lacks room for it (an object store has no free-space figure,
so there it is not checked). Saves run in the background; the next save,
:meth:`Checkpoints.wait` or :meth:`Checkpoints.close` waits for the one in flight and raises its error. Every
process of a multi-process job must call every method.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax.traverse_util import flatten_dict

from moelora_jax.errors import UserError, check_at_least, first_line
from moelora_jax.io.storage import as_path, files_under, free_bytes
from moelora_jax.training.trainer import TrainState

FORMAT = 1
"""Version of the checkpoint layout; bumped when an older checkpoint could no longer be read correctly."""

ITEMS = ("state", "meta")
DIGEST_FILE = "digest.json"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # where orbax writes a step before it renames it (on a local disk)
_HASH_CHUNK = 1 << 24


def file_digests(step_dir: epath.Path) -> dict[str, str]:
    """SHA-256 (hex) of every file of a checkpoint's items, by path relative to ``step_dir``; orbax's commit markers
    (written after the digest) are left out."""
    digests = {}
    for relative, path in sorted(files_under(step_dir)):
        if relative.split("/")[0] in ITEMS and not relative.endswith("commit_success.txt"):
            sha = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    sha.update(chunk)
            digests[relative] = sha.hexdigest()
    return digests


def damaged_files(step_dir: epath.Path) -> list[str] | None:
    """The files of the checkpoint in ``step_dir`` that are missing or differ from its digest, sorted (empty: it
    verifies); None when it has no digest (written before checkpoints were verified)."""
    digest = step_dir / DIGEST_FILE
    if not digest.exists():
        return None
    try:
        recorded = json.loads(digest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return [DIGEST_FILE]
    found = file_digests(step_dir)
    return sorted(name for name, sha in recorded.items() if found.get(name) != sha)


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: saved -> current"`` for every setting that differs between two fingerprints (nested dicts)."""
    a, b = flatten_dict(saved, sep="."), flatten_dict(current, sep=".")
    return [
        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k, "<absent>") != b.get(k, "<absent>")
    ]


class Checkpoints:
    """An orbax ``CheckpointManager`` over ``directory`` for one run's :class:`TrainState`.

    Args:
      directory: where the step directories live (created if missing), local or remote (``gs://bucket/run/...``).
      fingerprint: JSON-compatible settings stored with each checkpoint and required to match on restore.
      keep: how many of the newest checkpoints to keep.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: dict[str, Any], *, keep: int = 3) -> None:
        check_at_least("keep", keep, 1)
        self.directory = as_path(directory)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back: tuples become lists
        self._saving: int | None = None  # the step of the save in flight
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_digest),
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, oldest first (read afresh: a failed save can leave the
        manager's own list stale)."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, state: TrainState, *, step: int | None = None) -> None:
        """Start writing ``state`` as checkpoint ``step`` (default ``state.step``), replacing an existing one of that
        step; returns once the arrays are copied off the devices, so the caller may donate or update ``state``."""
        self.wait()  # the save in flight is finished, digest and all, before this one names its step
        step = int(state.step) if step is None else step
        need = sum(x.nbytes for x in jax.tree.leaves(state)) + _SPACE_MARGIN
        free = free_bytes(self.directory)
        if free is not None and free < need:
            raise UserError(
                f"checkpoint {step} needs about {need / 2**20:.1f} MiB but {self.directory} has {free / 2**20:.1f} MiB "
                f"free; the complete checkpoints there (steps {self.steps()}) are intact: free space, then rerun to "
                "resume."
            )
        if step in self._manager.all_steps():  # a run resumed from an earlier step redoes this one
            self._manager.delete(step)
        meta = {"format": FORMAT, "step": step, "data_position": step, "fingerprint": self.fingerprint}
        self._saving = step
        with self._reporting_write_errors():
            self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(_storable(state)), meta=ocp.args.JsonSave(meta)),
                force=True,
            )

    def _write_digest(self) -> None:
        """Orbax's call once every process has written the save in flight, before it commits it (primary process
        only): the digest of its files, written beside them (where orbax renames the step, in the temporary
        directory; on an object store, in place, before the commit marker)."""
        final = self.directory / str(self._saving)
        step_dir = self.directory / f"{self._saving}{_TMP_SUFFIX}"
        step_dir = step_dir if step_dir.exists() else final
        (step_dir / DIGEST_FILE).write_text(json.dumps({"algorithm": "sha256", "files": file_digests(step_dir)}))

    def restore(self, like: TrainState, step: int | None = None) -> TrainState:
        """Checkpoint ``step`` (default: the latest) read onto the shapes, dtypes and shardings of ``like``.

        Raises a one-line ``UserError`` when there is no such checkpoint, when its files differ from its digest
        (naming the newest earlier checkpoint that verifies), when it was written by another configuration (listing
        what differs), or when its files cannot be read (see :func:`_unreadable_error`; anything else is a bug and
        propagates).
        """
        steps = self.steps()
        if step is None:
            if not steps:
                raise UserError(f"no checkpoint to resume from in {self.directory}.")
            step = steps[-1]
        if step not in steps:
            raise UserError(f"no checkpoint for step {step} in {self.directory}: it has steps {steps}.")
        path = self.directory / str(step)
        self._verify(path, steps, step)
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            if not _unreadable_error(e):
                raise
            raise UserError(_unreadable(path, steps, step, e)) from e
        if meta.get("format") != FORMAT:
            raise UserError(f"checkpoint {path} has format {meta.get('format')}, this version reads {FORMAT}.")
        differences = fingerprint_differences(meta["fingerprint"], self.fingerprint)
        if differences:
            raise UserError(
                f"checkpoint {path} belongs to another configuration ({'; '.join(differences)}): resume with the "
                "settings it was written with, or write this run to another output_dir."
            )
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _storable(like))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))[
                "state"
            ]
        except Exception as e:
            if not _unreadable_error(e):
                raise
            raise UserError(_unreadable(path, steps, step, e)) from e
        return restored._replace(rng=jax.random.wrap_key_data(restored.rng))

    def _verify(self, path: epath.Path, steps: list[int], step: int) -> None:
        """Refuse checkpoint ``step`` in one line when its files differ from its digest, naming the newest earlier
        one that verifies; warn (once, from the primary process) when it has no digest."""
        damaged = damaged_files(path)
        if damaged is None:
            if jax.process_index() == 0:
                print(
                    f"warning: checkpoint {path} has no digest (written before checkpoints were verified): "
                    "restoring it unverified.",
                    file=sys.stderr,
                )
            return
        if not damaged:
            return
        intact = next((s for s in reversed(steps) if s < step and damaged_files(self.directory / str(s)) == []), None)
        fix = (
            f"restore step {intact} instead, the newest checkpoint that verifies, or move the damaged one aside"
            if intact is not None
            else "no earlier checkpoint verifies: move the checkpoints aside to start afresh"
        )
        named = ", ".join(damaged[:3]) + (f" and {len(damaged) - 3} more" if len(damaged) > 3 else "")
        raise UserError(
            f"checkpoint {path} is damaged: {named} differ from the digest written when it was saved: {fix}."
        )

    def wait(self) -> None:
        """Block until the save in flight is complete; raises its error, if any."""
        with self._reporting_write_errors():
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish the save in flight and release the manager's threads."""
        with self._reporting_write_errors():
            self._manager.close()

    @contextlib.contextmanager
    def _reporting_write_errors(self) -> Iterator[None]:
        """A failed background save (full disk, lost permissions...) as one ``UserError`` line."""
        try:
            yield
        except _UNREADABLE as e:
            raise UserError(
                f"a checkpoint could not be written to {self.directory} ({first_line(e, 300)}); the complete "
                f"checkpoints there (steps {self.steps()}) are intact: free space or fix the directory, then rerun to "
                "resume."
            ) from e


_UNREADABLE = (OSError, ValueError)
"""What orbax and tensorstore raise for files that cannot be read or written: tensorstore's errors are
``ValueError``, a JSON file cut short gives ``json.JSONDecodeError`` (also a ``ValueError``), the OS ``OSError``."""


def _unreadable_error(error: Exception) -> bool:
    """Whether ``error`` says that a checkpoint's files cannot be read: one of :data:`_UNREADABLE`, or the bare
    ``Exception`` orbax raises from tensorstore's ``ValueError`` when reading an array's shard."""
    return isinstance(error, _UNREADABLE) or (type(error) is Exception and isinstance(error.__cause__, _UNREADABLE))


_SPACE_MARGIN = 1 << 20
"""Bytes asked for beyond the arrays' own size (metadata, JSON), before a save is started."""


def _storable(state: TrainState) -> TrainState:
    """The state with its typed PRNG key as raw key data (what orbax stores)."""
    return state._replace(rng=jax.random.key_data(state.rng))


def _unreadable(path: Any, steps: list[int], step: int, error: Exception) -> str:
    earlier = [s for s in steps if s < step]
    fix = (
        f"move it aside to resume from step {earlier[-1]}, or restore step {earlier[-1]} instead"
        if earlier
        else "move it aside to start afresh"
    )
    return f"checkpoint {path} cannot be read ({first_line(error, 200)}): {fix}."
