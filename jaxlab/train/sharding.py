"""Device mesh and logical-axis sharding rules.

Model code names only logical axes; the rules that map them to the fixed mesh
``('data', 'fsdp', 'tensor')`` live in :mod:`jaxlab.models.partitioning`. One CPU gives a 1x1x1
mesh and runs the same code as a pod.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlab.models.partitioning import DEFAULT_RULES, logical_to_spec

MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    num_devices: int = 0,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ``('data', 'fsdp', 'tensor')`` mesh; one size may be -1 to take the remaining devices.

    Args:
      data, fsdp, tensor: axis sizes; their product must equal the number of devices used.
      num_devices: use only the first ``num_devices`` devices (0 = all); for single-process runs.
      devices: the devices to use instead of ``jax.devices()``.
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_devices < 0 or num_devices > len(devices):
        raise ValueError(
            f"make_mesh: num_devices must be in [0, {len(devices)}], got {num_devices}"
        )
    devices = devices[:num_devices] if num_devices else devices
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got {sizes}")
    for name, size in sizes.items():
        if size != -1 and (not isinstance(size, int) or size < 1):
            raise ValueError(f"make_mesh: mesh.{name} must be a positive int or -1, got {size!r}")
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if fill:
        if len(devices) % known:
            raise ValueError(
                f"make_mesh: {len(devices)} devices are not divisible by the fixed axes {sizes}"
            )
        sizes[fill[0]] = len(devices) // known
    if int(np.prod(list(sizes.values()))) != len(devices):
        raise ValueError(
            f"make_mesh: mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices, "
            f"{len(devices)} are available"
        )
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
    """``NamedSharding`` for every variable of an NNX state (as a pure dict, like
    ``nnx.to_pure_dict(state)``), from its flax sharding annotation.

    The annotation is flax's ``out_sharding`` metadata: jaxlab's parameters carry their logical
    axes there (``jaxlab.models.layers.logical_param``), and so does any flax layer a user adds
    with ``nnx.with_partitioning(init, ('embed', 'mlp'))`` or ``nnx.Param(..., out_sharding=...)``
    (built with ``nnx.use_eager_sharding(False)``, or under a mesh, since flax otherwise places
    annotated variables at creation). Logical names go through ``rules``; mesh axis names absent
    from them are used as they are. Variables without an annotation are replicated.

    Raises:
      ValueError: from :func:`~jaxlab.models.partitioning.logical_to_spec`, naming the
        variable's path, for a dimension its mesh axes do not divide or an unknown axis name.
    """

    def sharding_of(path, variable):
        axes = variable.get_metadata().get("out_sharding")
        if isinstance(axes, NamedSharding):
            axes = axes.spec
        if not axes:
            return variable.replace(replicated(mesh))
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        spec = logical_to_spec(tuple(axes), variable.shape, mesh, rules, name=name)
        return variable.replace(NamedSharding(mesh, spec))

    return nnx.to_pure_dict(
        jax.tree_util.tree_map_with_path(
            sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a ``[batch, ...]`` array split over the ``data`` and ``fsdp`` axes."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch_to_devices(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a host-side global batch, each process transferring only its addressable rows."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
        for k, v in batch.items()
    }


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins a multi-process run (``jax.distributed.initialize``) when one is described.

    Arguments left as None are read from ``JAXLAB_COORDINATOR_ADDRESS``, ``JAXLAB_NUM_PROCESSES``
    and ``JAXLAB_PROCESS_ID``; with no coordinator at all this is a single-process run and nothing
    happens (on managed TPU/GPU clusters, pass ``coordinator_address="auto"`` to let JAX detect
    the cluster).
    """
    import os

    coordinator_address = coordinator_address or os.environ.get("JAXLAB_COORDINATOR_ADDRESS")
    if not coordinator_address:
        return
    if coordinator_address == "auto":
        jax.distributed.initialize()
        return
    num_processes = num_processes or int(os.environ.get("JAXLAB_NUM_PROCESSES", "0"))
    if process_id is None and "JAXLAB_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAXLAB_PROCESS_ID"])
    if num_processes < 1 or process_id is None or not 0 <= process_id < num_processes:
        raise ValueError(
            "initialize_distributed: a coordinator needs num_processes >= 1 and "
            f"0 <= process_id < num_processes, got num_processes={num_processes}, "
            f"process_id={process_id}"
        )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
