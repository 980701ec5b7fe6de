"""Device meshes and logical-axis sharding rules.

Every parameter and the main activations name their axes logically (``"embed"``, ``"heads"``, ``"rank"``...);
a rules table maps each name to mesh axes (``data``, ``fsdp``, ``tensor``). Parameters follow FSDP on their
embedding axis and tensor parallelism on heads / MLP / vocabulary axes; activations shard their batch over
``data x fsdp``; adapter ``expert`` and ``rank`` axes are always replicated.
A dimension that a mesh axis does not divide evenly stays replicated on that axis, so any model runs on any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from moelora_jax.errors import UserError

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: LogicalRules = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("head_dim", None),
    ("cache_length", None),
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("expert", None),
    ("rank", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh with Auto (compiler-propagated, pjit-style) axes.

    One size may be ``-1``: it takes whatever the others leave of ``len(devices)`` (all devices by default).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"mesh sizes (data, fsdp, tensor)={tuple(sizes)}: give positive sizes, at most one -1.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise UserError(f"{len(devices)} devices cannot be split into a mesh with fsdp x tensor = {known}.")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise UserError(
            f"mesh (data, fsdp, tensor)={tuple(sizes)} needs {math.prod(sizes)} devices but {len(devices)} are given."
        )
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _mesh_axes_for(
    shape: Sequence[int], names: Sequence[str | None], mesh_shape: dict[str, int], rules
) -> PartitionSpec:
    """Logical names -> a PartitionSpec, dropping mesh axes absent from the mesh or not dividing the dimension."""
    spec = nn.logical_to_mesh_axes(tuple(names), rules)
    dims = []
    for size, axes in zip(shape, spec, strict=True):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        kept, prod = [], 1
        for axis in axes:
            n = mesh_shape.get(axis, 1)
            if n > 1 and size % (prod * n) == 0:
                kept.append(axis)
                prod *= n
        dims.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*dims)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """``NamedSharding`` per leaf of a tree of ``nn.LogicallyPartitioned`` boxes (e.g. from ``jax.eval_shape(init)``).

    Unboxed leaves are replicated. The result has the structure of ``nn.unbox(boxed_tree)``.
    """
    mesh_shape = dict(mesh.shape)

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, _mesh_axes_for(leaf.value.shape, leaf.names, mesh_shape, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def logical_spec(names: tuple[str | None, ...], shape: Sequence[int]) -> PartitionSpec | None:
    """The ``PartitionSpec`` of an array of ``shape`` whose axes have these logical names, under the active rules
    (``nn.logical_axis_rules``) and mesh (``jax.set_mesh``); None when either is missing."""
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return None
    return _mesh_axes_for(shape, names, dict(mesh.shape), rules)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """``with_sharding_constraint`` by logical names (:func:`logical_spec`); a no-op without rules and a mesh."""
    spec = logical_spec(names, x.shape)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Shard a batch's axis ``leading`` (after that many unsharded axes, e.g. micro-batches) over ``data x fsdp``;
    later axes (sequence, features) are replicated."""
    return NamedSharding(mesh, PartitionSpec(*([None] * leading), ("data", "fsdp")))
