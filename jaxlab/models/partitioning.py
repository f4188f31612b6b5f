"""Logical axis names -> mesh partitioning, for parameters and activations.

Model code names logical axes only (``batch, seq, embed, heads, kv_heads, head_dim, mlp, vocab,
state``). A rules table maps each to zero or more axes of the mesh ``('data', 'fsdp', 'tensor')``.
Parameters carry their names as ``logical_axes`` metadata (see ``jaxlab.train.sharding``);
activations are pinned with :func:`constrain` where layouts must not be left to the compiler
(without it, FSDP-sharded weights make XLA shard the contraction dimension and run every device on
the whole batch). :func:`constrain` is a no-op unless an :func:`activation_sharding` context is
active while the function is traced, so models run unchanged outside a mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# logical axis -> mesh axis, tuple of mesh axes, or None (replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("state", None),
)

_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "jaxlab_activation_sharding", default=None
)


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> PartitionSpec:
    """Mesh partitioning of an array with logical ``axes`` and ``shape``.

    A mesh axis is used at most once per array (first logical axis wins), and a dimension whose
    size is not divisible by its mesh axes stays replicated, so tiny test models shard too.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape, strict=True):
        target = table.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        if mesh_axes and size % int(np.prod([mesh.shape[a] for a in mesh_axes])) == 0:
            used.update(mesh_axes)
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Rules = DEFAULT_RULES):
    """Makes :func:`constrain` pin activations on ``mesh`` while functions are traced inside."""
    token = _CONTEXT.set(None if mesh is None else (mesh, tuple(rules)))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` of ``x`` to its logical ``axes``, inside a sharding context."""
    context = _CONTEXT.get()
    if context is None:
        return x
    mesh, rules = context
    spec = logical_to_spec(axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
