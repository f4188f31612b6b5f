"""Selective scans (Mamba-1) and SSD (Mamba-2): Pallas kernels or XLA paths, one signature each.

Math and layouts are those of :mod:`kernels_pallas.selective_scan` and :mod:`kernels_pallas.ssd`.
``impl`` picks the implementation:

* ``'pallas'``: the Triton kernels (interpret mode on CPU);
* ``'sequential'``: ``lax.scan`` one step at a time (the reference; least memory, least parallel);
* ``'associative'``: ``lax.associative_scan`` over the whole sequence (parallel; keeps every
  step's state, so memory grows as ``seq * dim * state``);
* ``'chunked'``: associative scan inside chunks of ``chunk`` steps, a sequential carry between
  chunks, each chunk rematerialised in the backward pass (memory ``seq / chunk`` states);
  for SSD, the chunked SSD algorithm (matmuls inside chunks);
* ``'auto'``: ``'sequential'`` for fewer than 16 steps (decoding), else Pallas on GPU and
  ``'chunked'`` elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas import selective_scan as mamba1_kernels
from kernels_pallas import ssd as ssd_kernels

SCAN_IMPLS = ("auto", "pallas", "sequential", "associative", "chunked")


def _resolve(name, impl, gpu_choice, seq):
    if impl not in SCAN_IMPLS:
        raise ValueError(f"{name}: impl must be one of {SCAN_IMPLS}, got {impl!r}")
    if impl == "auto":
        if seq < 16:  # decoding steps: a few sequential steps beat padding a kernel's chunk
            return "sequential"
        return gpu_choice if jax.default_backend() == "gpu" else "chunked"
    return impl


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


def _recurrence_xla(u, delta, A, B, C, h0, impl, chunk):
    """(y, h_L) of the bare recurrence in float32 by the associative or chunked method."""
    batch, seq, dim = u.shape
    groups = B.shape[2]

    def per_channel(x):
        return jnp.repeat(x, dim // groups, axis=2)

    f32 = jnp.float32
    u, delta, A, B, C, h0 = (x.astype(f32) for x in (u, delta, A, B, C, h0))
    if impl == "associative":
        return _scan_block(u, delta, A, per_channel(B), per_channel(C), h0)
    pad = -(-seq // chunk) * chunk - seq  # padded steps: delta = 0, the state is unchanged

    def padded(x):
        return jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))

    def chunks(x):
        return jnp.moveaxis(
            padded(x).reshape(batch, (seq + pad) // chunk, chunk, *x.shape[2:]), 1, 0
        )

    @jax.checkpoint
    def body(h, xs):
        u_c, d_c, b_c, c_c = xs
        y, h = _scan_block(u_c, d_c, A, per_channel(b_c), per_channel(c_c), h)
        return h, y

    h, y = lax.scan(body, h0, (chunks(u), chunks(delta), chunks(B), chunks(C)))
    return jnp.moveaxis(y, 0, 1).reshape(batch, seq + pad, dim)[:, :seq], h


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
    return_final_state=False,
    impl="auto",
    chunk=64,
    block_sizes=None,
    interpret=None,
):
    """Mamba-1 selective scan; see :func:`kernels_pallas.selective_scan.selective_scan`.

    Args:
      impl: see the module docstring; chunk: steps per chunk of the ``'chunked'`` path.
    """
    name = "selective_scan"
    impl = _resolve(name, impl, "pallas", u.shape[1] if u.ndim == 3 else 0)
    kw = dict(
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        initial_state=initial_state,
        return_final_state=return_final_state,
    )
    if impl == "pallas":
        return mamba1_kernels.selective_scan(
            u, delta, A, B, C, block_sizes=block_sizes, interpret=interpret, **kw
        )
    mamba1_kernels.check_scan_arguments(name, u, delta, A, B, C, D, z, delta_bias, initial_state)
    if impl == "sequential":
        return mamba1_kernels.selective_scan_reference(u, delta, A, B, C, **kw)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"{name}: chunk must be a positive int, got {chunk!r}")
    dtype, delta = mamba1_kernels.prepare_delta(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    batch, _, dim = u.shape
    h0 = (
        jnp.zeros((batch, dim, A.shape[1]), jnp.float32) if initial_state is None else initial_state
    )
    # Never pad a short input (a decoding step) up to a whole chunk.
    y, h = _recurrence_xla(u, delta, A, B, C, h0, impl, min(chunk, u.shape[1]))
    out = mamba1_kernels.finish_output(y.astype(dtype), u, D, z, dtype, u.dtype)
    return (out, h) if return_final_state else out


def ssd(
    x,
    dt,
    A,
    B,
    C,
    *,
    chunk_size=64,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    initial_state=None,
    return_final_state=False,
    impl="auto",
    interpret=None,
):
    """Mamba-2 SSD; see :mod:`kernels_pallas.ssd`. ``chunk_size``: the chunked algorithm's chunk."""
    name = "ssd"
    impl = _resolve(name, impl, "pallas", x.shape[1] if x.ndim == 4 else 0)
    kw = dict(
        D=D,
        z=z,
        dt_bias=dt_bias,
        dt_softplus=dt_softplus,
        initial_state=initial_state,
        return_final_state=return_final_state,
    )
    if impl == "pallas":
        return ssd_kernels.ssd(x, dt, A, B, C, chunk_size=chunk_size, interpret=interpret, **kw)
    ssd_kernels.check_ssd_arguments(name, x, dt, A, B, C, D, z, dt_bias, initial_state, chunk_size)
    if impl == "sequential":
        return ssd_kernels.ssd_reference(x, dt, A, B, C, **kw)
    if impl == "chunked":
        return ssd_kernels.ssd_chunked(x, dt, A, B, C, chunk_size=min(chunk_size, x.shape[1]), **kw)
    # associative: the selective scan with one channel per (head, head_dim) pair.
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
    s = s.reshape(batch, heads, head_dim, state)
    return (out, s) if return_final_state else out


selective_state_update = mamba1_kernels.selective_state_update
ssd_state_update = ssd_kernels.ssd_state_update
