"""Several processes, one program: ``jax.distributed`` start-up, host-local batches into global arrays, gathers.

Every process runs the same script over the same config; the mesh spans the devices of all processes. Each process
tokenizes the same data, so every process knows the global batch; :func:`host_local_batch` collates and transfers
only the rows its own devices hold. Results needed on the host (generated tokens, exported adapters) are gathered
from all processes with :func:`to_host`; only process 0 writes logs and exports (:func:`is_primary`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from moelora_jax.errors import UserError, check_choice

INITIALIZE_CHOICES = ("auto", "yes", "no")


def on_cloud_tpu_vm(pci_devices: str | os.PathLike = "/sys/bus/pci/devices") -> bool:
    """Whether a Google TPU (PCI vendor 0x1ae0) is attached: the test JAX itself uses for a Cloud TPU VM, where
    ``jax.distributed.initialize()`` finds its peers from the VM's metadata (one process on a single host)."""
    return any(p.read_text().strip() == "0x1ae0" for p in Path(pci_devices).glob("*/vendor") if p.is_file())


def initialize(mode: str = "auto", coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
    """Join a multi-process JAX job; call before any other JAX computation. Returns whether it did.

    ``mode``: ``"no"`` never; ``"yes"`` always (addresses auto-detected by JAX on TPU VMs, Slurm, Open MPI, ... unless
    given); ``"auto"`` when a ``coordinator_address`` is given or on a Cloud TPU VM. ``num_processes`` and
    ``process_id`` go with an explicit coordinator (e.g. ``127.0.0.1:1234``, 2, 0 on localhost). CPU processes
    exchange collectives over gloo.
    """
    check_choice("mode", mode, INITIALIZE_CHOICES)
    if mode == "no" or (mode == "auto" and not coordinator_address and not on_cloud_tpu_vm()):
        return False
    if coordinator_address and (num_processes < 1 or not 0 <= process_id < num_processes):
        raise UserError(
            f"coordinator_address={coordinator_address!r} needs num_processes >= 1 and "
            f"0 <= process_id < num_processes (got {num_processes}, {process_id})."
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    explicit = {}
    if coordinator_address:
        explicit = {
            "coordinator_address": coordinator_address,
            "num_processes": num_processes,
            "process_id": process_id,
        }
    jax.distributed.initialize(**explicit)
    return True


def is_primary() -> bool:
    """Process 0: the one that writes logs, plots and exports."""
    return jax.process_index() == 0


def host_local_batch(
    rows: Callable[[Sequence[int]], dict[str, np.ndarray]], shape: tuple[int, ...], sharding: jax.sharding.Sharding
) -> dict[str, jax.Array]:
    """A global batch of ``shape`` (batch axes, e.g. ``(n_micro, B)``) whose every array has ``sharding``.

    ``rows(flat_positions)`` collates the requested rows (row-major positions in ``shape``) into arrays of shape
    ``(len(positions), ...)``. Only the rows held by this process's devices are asked for and transferred.
    """
    count = int(np.prod(shape))
    needed = np.zeros(shape, bool)
    for index in sharding.addressable_devices_indices_map(shape).values():
        needed[index[: len(shape)]] = True
    positions = np.flatnonzero(needed.ravel())
    local = rows(positions.tolist())
    out = {}
    for name, values in local.items():
        host = np.zeros((count, *values.shape[1:]), values.dtype)
        host[positions] = values  # rows held elsewhere stay zero and are never read
        host = host.reshape(*shape, *values.shape[1:])
        out[name] = jax.make_array_from_callback(host.shape, sharding, lambda index, host=host: host[index])
    return out


def to_host(tree: Any) -> Any:
    """Numpy copies of a tree of (possibly multi-process, sharded) arrays: every process gets the whole values.

    With several processes this is a collective: every process must call it.
    """
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def fetch(tree: Any) -> Any:
    """Numpy copies of a tree of arrays that every process holds whole (replicated results: a step's metrics, loss
    sums); waits for the computations that produce them. Not a collective. The training loop and evaluation read
    results from the devices through this one function."""
    return jax.device_get(tree)


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (a collective with several processes)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def check_shared_directory(directory: Any) -> None:
    """Refuse a multi-process job whose ``directory`` (an :class:`epath.Path`) is not the same place for every
    process, as a directory on each host's own disk is: orbax's checkpoints need one that all of them see.

    Process 0 writes a marker named by a random token it broadcasts; every process then looks for it. A collective:
    every process must call it; all of them raise the same ``UserError`` when any did not see the marker.
    """
    if jax.process_count() == 1:
        return
    token = int(multihost_utils.broadcast_one_to_all(np.random.default_rng().integers(1 << 62)))
    marker = directory / f".shared-check-{token}"
    if is_primary():
        marker.write_text(str(token))
    multihost_utils.sync_global_devices("moelora_jax: shared-directory marker written")
    seen = marker.exists() and marker.read_text() == str(token)
    blind = np.flatnonzero(~multihost_utils.process_allgather(np.asarray(seen)))
    if is_primary():
        marker.unlink()
    if len(blind):
        raise UserError(
            f"output_dir {directory} is not shared by the job's {jax.process_count()} processes (process "
            f"{', '.join(map(str, blind))} cannot see what process 0 wrote there): give every host the same "
            "directory, a gs:// bucket on TPU VMs or a shared filesystem."
        )
