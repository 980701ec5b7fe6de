"""The adapter leaf-name contract: the names trainable adapter leaves go by, and how a tree path names its leaf.

The adapters create their leaves under these names; ``riemann_precond`` pairs an adapter's factors by them, the
optimizer puts each leaf in its parameter group by them, and the export writes and reads them. A leaf's name is the
last key of its path, a dict key or an attribute name, so a NamedTuple, dataclass or ``flax.struct`` adapter tree
is read exactly like the equivalent dict. Only JAX here: :mod:`moelora_jax.optim.riemann` stays importable on its own.
"""

from __future__ import annotations

import jax

FACTOR_LEAVES: tuple[str, ...] = ("lora_a", "lora_b", "mixer")
"""The low-rank product ``A [M] B``: ``lora_a (..., d_in, r)``, ``lora_b (..., r, d_out)`` and the optional MoSLoRA
``mixer (..., r, r)``; preconditioned together by ``riemann_precond``, the optimizer's ``experts`` group."""

GATE_LEAVES: tuple[str, ...] = ("gate", "log_tau")
"""A gate kernel ``gate (..., d_in, E)`` and a MoLE gate's log temperature ``log_tau (...)``; the ``gate`` group."""

ADAPTER_LEAVES: tuple[str, ...] = FACTOR_LEAVES + GATE_LEAVES
"""Every trainable adapter leaf name."""


def leaf_name(path: jax.tree_util.KeyPath) -> str | None:
    """The name of the leaf at ``path`` (a key path of ``jax.tree_util.tree_flatten_with_path``): its last key's
    dict key (``DictKey``, when a string) or attribute name (``GetAttrKey``); None for the root, a sequence index,
    a flattened index or a non-string dict key. A Flax NNX ``Variable``'s ``.value`` (as ``nnx.Optimizer`` gives a
    transform's ``init`` the model's state) is named by the Variable's own key."""
    if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    key = path[-1] if path else None
    if isinstance(key, jax.tree_util.DictKey):
        return key.key if isinstance(key.key, str) else None
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    return None
