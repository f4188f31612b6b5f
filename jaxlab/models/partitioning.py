"""Logical axis names -> mesh partitioning, for parameters and activations.

Model code names logical axes only (``batch, seq, embed, heads, kv_heads, head_dim, mlp, vocab,
state, layers``). A rules table maps each to zero or more axes of the mesh
``('data', 'fsdp', 'tensor')``. Parameters carry their names in flax's own sharding metadata
(``out_sharding``, what ``nnx.with_partitioning`` and ``nnx.Param(..., out_sharding=...)`` set),
so ``nnx.get_partition_spec`` under ``nnx.logical_axis_rules(DEFAULT_RULES)`` sees them, and a
flax layer a user adds is placed by the same rules (see ``jaxlab.train.sharding``). Activations
are pinned with :func:`constrain` where layouts must not be left to the compiler (without it,
FSDP-sharded weights make XLA shard the contraction dimension and run every device on the whole
batch). :func:`constrain` is a no-op unless an :func:`activation_sharding` context is active while
the function is traced, so models run unchanged outside a mesh.
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
    ("layers", None),  # the stacked-layer axis of scan_layers models
)

_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "jaxlab_activation_sharding", default=None
)


def logical_to_spec(
    axes: Sequence[str | tuple[str, ...] | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    *,
    name: str = "array",
) -> PartitionSpec:
    """Mesh partitioning of the array ``name`` with logical ``axes`` and ``shape``.

    Each entry of ``axes`` is None (replicated), a logical axis looked up in ``rules``, a mesh
    axis absent from ``rules`` (used as is, as flax does), or a tuple of these (the dimension is
    split over all of them). A mesh axis is used at most once per array (the first logical axis
    wins) and mesh axes of size 1 are left out.

    Raises:
      ValueError: naming ``name``, the dimension, its size and its mesh axes when the size is not
        divisible by them (nothing is replicated silently: a rule set to None replicates), or
        naming an axis that is neither in ``rules`` nor on the mesh.
    """
    if len(axes) != len(shape):
        raise ValueError(
            f"{name}: logical axes {tuple(axes)} must name each of its {len(shape)} dimensions "
            f"(shape {tuple(shape)})"
        )
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, (entry, size) in enumerate(zip(axes, shape, strict=True)):
        mesh_axes: list[str] = []
        for logical in (entry,) if isinstance(entry, str) or entry is None else tuple(entry):
            if logical is None:
                continue
            if logical in table:
                target = table[logical]
            elif logical in mesh.shape:
                target = logical
            else:
                raise ValueError(
                    f"{name}: logical axis {logical!r} of dimension {dim} has no rule in "
                    f"{tuple(table)} and is not a mesh axis {tuple(mesh.axis_names)}"
                )
            mesh_axes += [target] if isinstance(target, str) else list(target or ())
        mesh_axes = [a for a in mesh_axes if a not in used and mesh.shape[a] > 1]
        parts = int(np.prod([mesh.shape[a] for a in mesh_axes]))
        if size % parts:
            raise ValueError(
                f"{name}: dimension {dim} ({entry!r}) of size {size} is not divisible by its mesh "
                f"axes {tuple(mesh_axes)} of size {parts}; set the rule of {entry!r} to None to "
                "replicate it, or use a mesh that divides it"
            )
        used.update(mesh_axes)
        spec.append(
            None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes)
        )
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
    spec = logical_to_spec(axes, x.shape, mesh, rules, name=f"activation {tuple(axes)}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def mesh_parts(logical: str) -> int:
    """How many shards the active :func:`activation_sharding` context splits the logical axis
    ``logical`` into (1 outside a context)."""
    context = _CONTEXT.get()
    if context is None:
        return 1
    mesh, rules = context
    target = dict(rules).get(logical, logical if logical in mesh.shape else None)
    names = [target] if isinstance(target, str) else list(target or ())
    return int(np.prod([mesh.shape[a] for a in names]))


def per_shard(
    fn, in_axes: Sequence[Sequence[str | None] | None], out_axes, *, whole: Sequence[str] = ()
):
    """``fn`` run on each device's shard (``jax.shard_map``) of the active
    :func:`activation_sharding` context's mesh, every argument and result split along its logical
    axes; ``fn`` itself outside a context.

    ``in_axes``: one tuple of logical axes per positional argument (anything for an argument
    that is None); ``out_axes``: the result's axes, or one tuple per result when ``fn`` returns
    a tuple. Arguments are resharded to these layouts where they differ. ``whole``: logical
    axes ``fn`` is not independent along (a scan's sequence, a sum's axis); they stay unsplit
    whatever the rules map them to.

    For computations that XLA cannot partition itself, such as Pallas Mosaic (TPU) kernels
    ("Mosaic kernels cannot be automatically partitioned"), and that are independent along the
    split axes: the caller vouches for that.
    """
    context = _CONTEXT.get()
    if context is None:
        return fn
    mesh, rules = context

    def spec(axes, x, what):
        if x is None:
            return None
        axes = tuple(None if a in whole else a for a in axes)
        return logical_to_spec(axes, x.shape, mesh, rules, name=f"per_shard {what} {axes}")

    def run(*args):
        if len(args) != len(in_axes):
            raise ValueError(
                f"per_shard: in_axes names {len(in_axes)} arguments, got {len(args)} arguments"
            )
        outs = jax.eval_shape(fn, *args)
        in_specs = tuple(spec(a, x, "argument") for a, x in zip(in_axes, args, strict=True))
        if isinstance(outs, tuple):
            out_specs = tuple(spec(a, x, "result") for a, x in zip(out_axes, outs, strict=True))
        else:
            out_specs = spec(out_axes, outs, "result")
        # check_vma=False: a Pallas kernel's outputs carry no varying-axes annotation.
        return jax.shard_map(
            fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )(*args)

    return run
