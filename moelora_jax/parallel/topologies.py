"""Accelerator slices by their Cloud names, and compile-only devices of them, for compiling without the hardware.

A :class:`Topology` is a slice as Google Cloud names it (``v5e-8``: 8 chips; ``v4-8`` and ``v5p-8`` count
TensorCores, so they are 4 chips) or a GPU node (``h100-8``). :func:`compile_devices` gives its devices as
``jax.experimental.topologies`` builds them, which compile but never run: libtpu (``pip install
'moelora_jax[tpu]'``) for TPUs, the CUDA plugin (``moelora_jax[cuda]``) and an XLA GPU target description shipped
in ``moelora_jax/parallel/gpu_specs/`` for GPUs.

Chip figures are the vendors' published per-chip numbers: dense bfloat16 peak, HBM capacity and bandwidth
(Cloud TPU system architecture pages for v4, v5e, v5p and v6e; NVIDIA's H100 SXM datasheet, and the memory size
XLA's H100 target description states).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import jax

from moelora_jax.errors import UserError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    bf16_flops: float  # dense, per second
    hbm_bandwidth: float  # bytes per second


CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1.2e12),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 8.19e11),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2.765e12),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1.64e12),
    "h100": Chip("NVIDIA H100 SXM 80GB", 84_929_347_584, 989e12, 3.35232e12),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice: its ``chip``, how many ``chips``, and what ``get_topology_desc`` takes: the topology (``v5e:2x4``;
    a GPU's is ``<nodes>x<hosts>x<gpus per host>``) and, for TPUs, the chip configuration (``megacore``: the two
    TensorCores of a v4 or v5p chip as one device, as JAX runs them)."""

    name: str
    chip: Chip
    chips: int
    platform: str
    topology: str
    chip_config: str = "default"


def _tpu(name: str, generation: str, shape: str) -> Topology:
    chips = 1
    for size in shape.split("x"):
        chips *= int(size)
    megacore = generation in ("v4", "v5p")
    return Topology(
        name, CHIPS[generation], chips, "tpu", f"{generation}:{shape}", "megacore" if megacore else "default"
    )


TOPOLOGIES = {
    t.name: t
    for t in (
        _tpu("v4-8", "v4", "2x2x1"),
        _tpu("v4-32", "v4", "2x2x4"),
        _tpu("v5e-4", "v5e", "2x2"),
        _tpu("v5e-8", "v5e", "2x4"),
        _tpu("v5e-16", "v5e", "4x4"),
        _tpu("v5p-8", "v5p", "2x2x1"),
        _tpu("v5p-32", "v5p", "2x2x4"),
        _tpu("v5p-128", "v5p", "4x4x4"),
        _tpu("v6e-8", "v6e", "2x4"),
        _tpu("v6e-16", "v6e", "4x4"),
        Topology("h100-1", CHIPS["h100"], 1, "cuda", "1x1x1"),
        Topology("h100-8", CHIPS["h100"], 8, "cuda", "1x1x8"),
    )
}
GPU_SPECS = {"h100": Path(__file__).with_name("gpu_specs") / "h100_sxm_80gb.txtpb"}


def topology(name: str) -> Topology:
    """The slice called ``name`` (a key of :data:`TOPOLOGIES`), or a one-line error listing them."""
    if name not in TOPOLOGIES:
        raise UserError(f"unknown topology {name!r}; choose one of {', '.join(TOPOLOGIES)}")
    return TOPOLOGIES[name]


def compile_devices(slice_: Topology) -> list[jax.Device]:
    """Compile-only devices of ``slice_``; a one-line error when its compiler plugin is not installed."""
    from jax.experimental import topologies

    if slice_.platform == "tpu":
        if importlib.util.find_spec("libtpu") is None:
            raise UserError(
                f"compiling for {slice_.name} needs libtpu: pip install 'moelora_jax[tpu]' (no TPU is needed)"
            )
        # what libtpu would otherwise ask a TPU VM's metadata server for
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", slice_.name.replace("v5e", "v5litepod"))
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        # no TPU is opened, so several compile checks may run at once (libtpu otherwise takes a lock file)
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        desc = topologies.get_topology_desc(slice_.topology, "tpu", chip_config_name=slice_.chip_config)
        return list(desc.devices)
    if importlib.util.find_spec("jax_cuda12_plugin") is None:
        raise UserError(f"compiling for {slice_.name} needs JAX's CUDA plugin: pip install 'moelora_jax[cuda]'")
    # no GPU here: skip the plugin's check of the CUDA installation, hide any local GPU, and do not autotune
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_autotune_level=0".strip()
    generation = next(key for key, chip in CHIPS.items() if chip is slice_.chip)
    spec = GPU_SPECS[generation].read_text()
    desc = topologies.get_topology_desc(platform="cuda", target_config=spec, topology=slice_.topology)
    return list(desc.devices)
