"""Selective scans (Mamba-1) and SSD (Mamba-2): Pallas kernels or XLA paths, one signature each.

Math and layouts are those of :mod:`kernels_pallas.selective_scan` and :mod:`kernels_pallas.ssd`.
``impl`` picks the implementation:

* ``'pallas'``: the Pallas kernels: Triton on GPU, Mosaic on TPU (interpret mode on CPU);
* ``'sequential'``: ``lax.scan`` one step at a time (the reference; least memory, least parallel);
* ``'associative'``: ``lax.associative_scan`` over the whole sequence (parallel; keeps every
  step's state, so memory grows as ``seq * dim * state``);
* ``'chunked'``: associative scan inside chunks of ``chunk_size`` steps, a sequential carry
  between chunks, each chunk rematerialised in the backward pass (memory ``seq / chunk_size``
  states);
  for SSD, the chunked SSD algorithm (matmuls inside chunks);
* ``'auto'``: ``'sequential'`` for fewer than 16 steps (decoding), else Pallas where the kernels
  compile (GPU and TPU) and ``'chunked'`` elsewhere.

Both scans return ``(out, final_state)`` whatever the implementation (under ``jax.jit`` an unused
state costs nothing: every path computes it anyway). The implementations live in two registries,
:data:`SELECTIVE_SCAN_IMPLS` and :data:`SSD_IMPLS` (:class:`jaxlab.registry.Registry`); an entry
takes the public function's arguments, all keywords after ``C``, and returns that pair.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxlab.registry import Registry
from kernels_pallas import selective_scan as mamba1_kernels
from kernels_pallas import ssd as ssd_kernels
from kernels_pallas._common import check_positive_int, round_up
from kernels_pallas._common import platform as kernel_platform

ScanFn = Callable[..., tuple[jax.Array, jax.Array]]
SELECTIVE_SCAN_IMPLS: Registry[ScanFn] = Registry(
    "selective_scan implementation", field="selective_scan: impl"
)
SSD_IMPLS: Registry[ScanFn] = Registry("ssd implementation", field="ssd: impl")


def available_impls() -> tuple[str, ...]:
    """The ``impl`` names both scans accept (what a model's ``scan_impl`` may be)."""
    return tuple(name for name in SELECTIVE_SCAN_IMPLS.names() if name in SSD_IMPLS)


def _auto(registry, rank, kernel_platforms):
    """The ``'auto'`` entry of ``registry``: picks an implementation by length and backend;
    ``kernel_platforms``: where the ``'pallas'`` kernels compile."""

    def run(x, *args, **kw):
        seq = x.shape[1] if x.ndim == rank else 0
        if seq < 16:  # decoding steps: a few sequential steps beat padding a kernel's chunk
            impl = "sequential"
        else:
            impl = "pallas" if kernel_platform() in kernel_platforms else "chunked"
        return registry.get(impl)(x, *args, **kw)

    return run


def _combine(left, right):
    """Composes h -> a_l h + b_l, then h -> a_r h + b_r."""
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def _scan_block(u, delta, A, Bd, Cd, h0):
    """Associative scan over axis 1 of one block; returns (y, last state)."""
    a = jnp.exp(delta[..., None] * A)  # [batch, steps, dim, state]
    b = (delta * u)[..., None] * Bd
    b = b.at[:, 0].add(a[:, 0] * h0)
    _, h = lax.associative_scan(_combine, (a, b), axis=1)
    return jnp.sum(h * Cd, axis=-1), h[:, -1]


def _recurrence_xla(u, delta, A, B, C, h0, impl, chunk_size):
    """(y, h_L) of the bare recurrence in float32 by the associative or chunked method."""
    batch, seq, dim = u.shape
    groups = B.shape[2]

    def per_channel(x):
        return jnp.repeat(x, dim // groups, axis=2)

    f32 = jnp.float32
    u, delta, A, B, C, h0 = (x.astype(f32) for x in (u, delta, A, B, C, h0))
    if impl == "associative":
        return _scan_block(u, delta, A, per_channel(B), per_channel(C), h0)
    # Padded steps: delta = 0, the state is unchanged.
    pad = round_up(seq, chunk_size) - seq

    def padded(x):
        return jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))

    def chunks(x):
        return jnp.moveaxis(
            padded(x).reshape(batch, (seq + pad) // chunk_size, chunk_size, *x.shape[2:]), 1, 0
        )

    @jax.checkpoint
    def body(h, xs):
        u_c, d_c, b_c, c_c = xs
        y, h = _scan_block(u_c, d_c, A, per_channel(b_c), per_channel(c_c), h)
        return h, y

    h, y = lax.scan(body, h0, (chunks(u), chunks(delta), chunks(B), chunks(C)))
    return jnp.moveaxis(y, 0, 1).reshape(batch, seq + pad, dim)[:, :seq], h


# ---------------------------------------------------------------------- Mamba-1 implementations


def _selective_pallas(u, delta, A, B, C, *, chunk_size, block_sizes, interpret, **kw):
    del chunk_size  # the kernels' chunk is block_sizes.chunk_size
    return mamba1_kernels.selective_scan(
        u,
        delta,
        A,
        B,
        C,
        **kw,
        return_final_state=True,
        block_sizes=block_sizes,
        interpret=interpret,
    )


def _check_selective(u, delta, A, B, C, *, D, z, delta_bias, initial_state, **_):
    mamba1_kernels.check_scan_arguments(
        "selective_scan", u, delta, A, B, C, D, z, delta_bias, initial_state
    )


def _selective_sequential(u, delta, A, B, C, *, chunk_size, block_sizes, interpret, **kw):
    del chunk_size, block_sizes, interpret
    _check_selective(u, delta, A, B, C, **kw)
    return mamba1_kernels.selective_scan_reference(u, delta, A, B, C, **kw, return_final_state=True)


def _selective_xla(method):
    """The associative (``method='associative'``) or chunked XLA path."""

    def run(
        u,
        delta,
        A,
        B,
        C,
        *,
        D,
        z,
        delta_bias,
        delta_softplus,
        initial_state,
        chunk_size,
        block_sizes,
        interpret,
    ):
        del block_sizes, interpret
        _check_selective(
            u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state
        )
        check_positive_int("selective_scan", "chunk_size", chunk_size)
        dtype, delta = mamba1_kernels.prepare_delta(u, delta, delta_bias, delta_softplus)
        batch, _, dim = u.shape
        h0 = (
            jnp.zeros((batch, dim, A.shape[1]), jnp.float32)
            if initial_state is None
            else initial_state
        )
        # Never pad a short input (a decoding step) up to a whole chunk.
        y, h = _recurrence_xla(u, delta, A, B, C, h0, method, min(chunk_size, u.shape[1]))
        return mamba1_kernels.finish_output(y.astype(dtype), u, D, z, dtype), h

    return run


SELECTIVE_SCAN_IMPLS.register(
    "auto", _auto(SELECTIVE_SCAN_IMPLS, rank=3, kernel_platforms=("gpu", "tpu"))
)
SELECTIVE_SCAN_IMPLS.register("pallas", _selective_pallas)
SELECTIVE_SCAN_IMPLS.register("sequential", _selective_sequential)
SELECTIVE_SCAN_IMPLS.register("associative", _selective_xla("associative"))
SELECTIVE_SCAN_IMPLS.register("chunked", _selective_xla("chunked"))


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    *,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    initial_state=None,
    impl="auto",
    chunk_size=64,
    block_sizes=None,
    interpret=None,
):
    """Mamba-1 selective scan; see :func:`kernels_pallas.selective_scan.selective_scan`.

    Args:
      impl: a name in :data:`SELECTIVE_SCAN_IMPLS` (see the module docstring).
      chunk_size: steps per chunk of the ``'chunked'`` path.
      block_sizes, interpret: the Pallas kernels' (``'pallas'`` only).

    Returns:
      ``(out [batch, seq, dim], final_state [batch, dim, state])``.
    """
    return SELECTIVE_SCAN_IMPLS.get(impl)(
        u,
        delta,
        A,
        B,
        C,
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        initial_state=initial_state,
        chunk_size=chunk_size,
        block_sizes=block_sizes,
        interpret=interpret,
    )


# -------------------------------------------------------------------------- SSD implementations


def _ssd_pallas(x, dt, A, B, C, *, chunk_size, block_sizes, interpret, **kw):
    return ssd_kernels.ssd(
        x,
        dt,
        A,
        B,
        C,
        chunk_size=chunk_size,
        **kw,
        return_final_state=True,
        block_sizes=block_sizes,
        interpret=interpret,
    )


def _check_ssd(x, dt, A, B, C, chunk_size, *, D, z, dt_bias, initial_state, **_):
    ssd_kernels.check_ssd_arguments("ssd", x, dt, A, B, C, D, z, dt_bias, initial_state, chunk_size)


def _ssd_sequential(x, dt, A, B, C, *, chunk_size, block_sizes, interpret, **kw):
    del block_sizes, interpret
    _check_ssd(x, dt, A, B, C, chunk_size, **kw)
    return ssd_kernels.ssd_reference(x, dt, A, B, C, **kw, return_final_state=True)


def _ssd_chunked(x, dt, A, B, C, *, chunk_size, block_sizes, interpret, **kw):
    del block_sizes, interpret
    _check_ssd(x, dt, A, B, C, chunk_size, **kw)
    return ssd_kernels.ssd_chunked(
        x, dt, A, B, C, chunk_size=min(chunk_size, x.shape[1]), **kw, return_final_state=True
    )


def _ssd_associative(
    x, dt, A, B, C, *, D, z, dt_bias, dt_softplus, initial_state, chunk_size, block_sizes, interpret
):
    """The selective scan's associative path with one channel per (head, head_dim) pair."""
    del block_sizes, interpret
    _check_ssd(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state)
    batch, seq, heads, head_dim = x.shape
    state = B.shape[3]
    dtype, dt = ssd_kernels.prepare_delta(x, dt, dt_bias, dt_softplus)
    s0 = (
        jnp.zeros((batch, heads, head_dim, state), jnp.float32)
        if initial_state is None
        else initial_state
    )
    A_ch = jnp.broadcast_to(jnp.repeat(A, head_dim)[:, None], (heads * head_dim, state))
    u, delta = x.reshape(batch, seq, -1), jnp.repeat(dt, head_dim, axis=2)
    h0 = s0.reshape(batch, heads * head_dim, state)
    y, s = _recurrence_xla(u, delta, A_ch, B, C, h0, "associative", 0)
    out = ssd_kernels.finish_output(y.reshape(x.shape).astype(dtype), x, D, z, dtype)
    return out, s.reshape(batch, heads, head_dim, state)


SSD_IMPLS.register("auto", _auto(SSD_IMPLS, rank=4, kernel_platforms=("gpu", "tpu")))
SSD_IMPLS.register("pallas", _ssd_pallas)
SSD_IMPLS.register("sequential", _ssd_sequential)
SSD_IMPLS.register("associative", _ssd_associative)
SSD_IMPLS.register("chunked", _ssd_chunked)


def ssd(
    x,
    dt,
    A,
    B,
    C,
    *,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    initial_state=None,
    impl="auto",
    chunk_size=64,
    block_sizes=None,
    interpret=None,
):
    """Mamba-2 SSD; see :mod:`kernels_pallas.ssd`.

    Args:
      impl: a name in :data:`SSD_IMPLS` (see the module docstring).
      chunk_size: the chunked algorithm's chunk (the kernels round it to a tile: in [16, 64] on
        GPU, [8, 256] on TPU).
      block_sizes, interpret: the Pallas kernels' (``'pallas'`` only).

    Returns:
      ``(out [batch, seq, heads, head_dim], final_state [batch, heads, head_dim, state])``.
    """
    return SSD_IMPLS.get(impl)(
        x,
        dt,
        A,
        B,
        C,
        D=D,
        z=z,
        dt_bias=dt_bias,
        dt_softplus=dt_softplus,
        initial_state=initial_state,
        chunk_size=chunk_size,
        block_sizes=block_sizes,
        interpret=interpret,
    )


selective_state_update = mamba1_kernels.selective_state_update
ssd_state_update = ssd_kernels.ssd_state_update
