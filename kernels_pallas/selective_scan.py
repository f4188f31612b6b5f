"""Mamba-1 selective scan (Gu & Dao 2023) as Pallas GPU (Triton) kernels; on TPU the same
function as Mosaic kernels (:mod:`kernels_pallas.selective_scan_tpu`).

Math, per batch row, channel ``d`` and state index ``n`` (the function of mamba_ssm's
``selective_scan_ref``, in a ``[batch, seq, ...]`` layout)::

    delta_t = softplus(delta_t + delta_bias)          (bias and softplus optional)
    h_t     = exp(delta_t[d] A[d, n]) h_{t-1} + delta_t[d] u_t[d] B_t[g(d), n]
    y_t[d]  = sum_n C_t[g(d), n] h_t[d, n] + D[d] u_t[d]
    out_t   = y_t * silu(z_t)                          (z optional)

with ``g(d) = d // (dim // groups)`` and ``h_0 = initial_state`` (zeros by default).

Layout: u, delta, z ``[batch, seq, dim]``; A ``[dim, state]``; B, C ``[batch, seq, groups, state]``;
D, delta_bias ``[dim]``; states ``[batch, dim, state]`` (float32).

The kernels compute only the recurrence ``(u, delta, A, B, C, h_0) -> (y, h_L)``; the bias,
softplus, D term and gate are elementwise and left to XLA (which fuses and differentiates them).
* forward, grid ``(dim tiles, batch)``: the state ``[block_d, state]`` stays in registers while a
  loop walks the sequence one step at a time (each step is a few row loads); the state at the start
  of every ``chunk_size`` steps is saved, nothing else;
* backward, same grid: walks the chunks in reverse; each chunk's states are recomputed from its
  saved start state into registers (the chunk loop is unrolled), then the reverse recurrence
  ``dh_{t-1} = exp(delta_t A) dh_t + C_{t-1} dy_{t-1}`` runs over them, emitting du, ddelta and the
  per-tile partial sums of dB and dC (summed over tiles by XLA, so no atomics); dA and dh_0
  accumulate in registers.
Memory for the backward: one state per ``chunk_size`` steps instead of one per step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas import selective_scan_tpu
from kernels_pallas._common import (
    check_shapes,
    chunked_scan_core,
    finish_output,
    largest_power_of_2_dividing,
    next_power_of_2,
    pad_trailing,
    platform,
    prepare_delta,
    resolve_interpret,
    round_up,
)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """``chunk_size``: steps between saved states (unrolled in the backward: register pressure
    grows with ``chunk_size * block_d_bwd * state``); ``block_d``/``block_d_bwd``: channels per
    program in the forward/backward (powers of two; reduced to divide ``dim // groups``)."""

    chunk_size: int = 16
    block_d: int = 64
    block_d_bwd: int = 16
    num_warps: int = 2

    def __post_init__(self):
        for name in ("chunk_size", "block_d", "block_d_bwd"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"BlockSizes.{name} must be a power of two, got {value}")

    @classmethod
    def get_default(cls) -> BlockSizes:
        """The defaults (``block_d``/``block_d_bwd`` are reduced per shape at call time)."""
        return cls()


# ------------------------------------------------------------------------------------ reference


def selective_scan_reference(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    initial_state=None,
    return_final_state=False,
):
    """The recurrence step by step (``lax.scan``), in float32 or wider; same arguments."""
    dtype, delta = prepare_delta(u, delta, delta_bias, delta_softplus)
    batch, _, dim = u.shape
    groups, state = B.shape[2], B.shape[3]

    def per_channel(x):
        return jnp.repeat(x.astype(dtype), dim // groups, axis=2)

    Bd, Cd = per_channel(B), per_channel(C)  # [batch, seq, dim, state]
    h0 = jnp.zeros((batch, dim, state), dtype) if initial_state is None else initial_state
    A = A.astype(dtype)

    def step(h, inputs):
        u_t, d_t, b_t, c_t = inputs
        h = jnp.exp(d_t[..., None] * A) * h + (d_t * u_t)[..., None] * b_t
        return h, jnp.sum(h * c_t, axis=-1)

    xs = (u.astype(dtype), delta, Bd, Cd)
    h, y = lax.scan(step, h0.astype(dtype), jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), xs))
    out = finish_output(jnp.moveaxis(y, 0, 1), u, D, z, dtype)
    return (out, h) if return_final_state else out


def selective_state_update(
    state, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False
):
    """One decoding step: state ``[batch, dim, state]``, u/delta/z ``[batch, dim]``, B/C
    ``[batch, groups, state]`` -> (out ``[batch, dim]``, new state). Same math as the scan."""
    out, new_state = selective_scan_reference(
        u[:, None],
        delta[:, None],
        A,
        B[:, None],
        C[:, None],
        D=D,
        z=None if z is None else z[:, None],
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        initial_state=state,
        return_final_state=True,
    )
    return out[:, 0], new_state.astype(state.dtype)


# -------------------------------------------------------------------------------------- kernels


def _forward_kernel(
    u_ref, delta_ref, A_ref, B_ref, C_ref, h0_ref, y_ref, starts_ref, hL_ref, *, chunk, num_chunks
):
    A = A_ref[...]

    def run_chunk(c, h):
        starts_ref[c, :, :] = h

        def step(i, h):
            t = c * chunk + i
            d = delta_ref[t, :]
            h = jnp.exp(d[:, None] * A) * h + (d * u_ref[t, :])[:, None] * B_ref[t, :][None, :]
            y_ref[t, :] = jnp.sum(h * C_ref[t, :][None, :], axis=1)
            return h

        return lax.fori_loop(0, chunk, step, h)

    hL_ref[...] = lax.fori_loop(0, num_chunks, run_chunk, h0_ref[...])


def _backward_kernel(
    u_ref,
    delta_ref,
    A_ref,
    B_ref,
    C_ref,
    starts_ref,
    dy_ref,
    dhL_ref,
    du_ref,
    ddelta_ref,
    dA_ref,
    dB_ref,
    dC_ref,
    dh0_ref,
    *,
    chunk,
    num_chunks,
):
    A = A_ref[...]

    def run_chunk(r, carry):
        dh, dA = carry
        c = num_chunks - 1 - r
        h = starts_ref[c, :, :]
        states, inputs = [h], []
        for i in range(chunk):  # recompute this chunk's states, kept in registers
            t = c * chunk + i
            d, u, b = delta_ref[t, :], u_ref[t, :], B_ref[t, :]
            h = jnp.exp(d[:, None] * A) * h + (d * u)[:, None] * b[None, :]
            states.append(h)
            inputs.append((d, u, b))
        for i in reversed(range(chunk)):
            t = c * chunk + i
            d, u, b = inputs[i]
            a = jnp.exp(d[:, None] * A)  # recomputed: fewer live registers than keeping it
            dy = dy_ref[t, :]
            dC_ref[t, :] = jnp.sum(dy[:, None] * states[i + 1], axis=0)
            dh = dh + dy[:, None] * C_ref[t, :][None, :]  # dL/dh_t
            da = dh * states[i] * a  # d/d(delta A) through exp
            dA = dA + da * d[:, None]
            dh_b = jnp.sum(dh * b[None, :], axis=1)  # d/d(delta u)
            ddelta_ref[t, :] = jnp.sum(da * A, axis=1) + dh_b * u
            du_ref[t, :] = dh_b * d
            dB_ref[t, :] = jnp.sum(dh * (d * u)[:, None], axis=0)
            dh = dh * a
        return dh, dA

    dh, dA = lax.fori_loop(0, num_chunks, run_chunk, (dhL_ref[...], jnp.zeros_like(A)))
    dh0_ref[...] = dh
    dA_ref[...] = dA


# ----------------------------------------------------------------------------------------- core


@dataclasses.dataclass(frozen=True)
class _Static:
    chunk: int
    block_d: int
    block_d_bwd: int
    num_warps: int
    interpret: bool


def _specs(batch, seq, dim, groups, state, block_d):
    """BlockSpecs over grid (dim tiles, batch) for the per-channel and per-group arrays."""
    per_group = dim // groups
    rows = pl.BlockSpec((None, seq, block_d), lambda j, b: (b, 0, j))
    group = pl.BlockSpec((None, seq, None, state), lambda j, b: (b, 0, j * block_d // per_group, 0))
    matrix = pl.BlockSpec((block_d, state), lambda j, b: (j, 0))
    states = pl.BlockSpec((None, block_d, state), lambda j, b: (b, j, 0))
    return rows, group, matrix, states


def _forward(static, u, delta, A, B, C, h0):
    batch, seq, dim = u.shape
    groups, state = B.shape[2], B.shape[3]
    bd, chunk = static.block_d, static.chunk
    num_chunks = seq // chunk
    rows, group, matrix, states = _specs(batch, seq, dim, groups, state, bd)
    starts = pl.BlockSpec((None, num_chunks, bd, state), lambda j, b: (b, 0, j, 0))
    f32 = jnp.float32
    return pl.pallas_call(
        functools.partial(_forward_kernel, chunk=chunk, num_chunks=num_chunks),
        grid=(dim // bd, batch),
        in_specs=[rows, rows, matrix, group, group, states],
        out_specs=[rows, starts, states],
        out_shape=[
            jax.ShapeDtypeStruct((batch, seq, dim), f32),
            jax.ShapeDtypeStruct((batch, num_chunks, dim, state), f32),
            jax.ShapeDtypeStruct((batch, dim, state), f32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=static.num_warps, num_stages=1),
        interpret=static.interpret,
        name="selective_scan_fwd",
    )(u, delta, A, B, C, h0)


def _backward(static, u, delta, A, B, C, starts, dy, dhL):
    batch, seq, dim = u.shape
    groups, state = B.shape[2], B.shape[3]
    bd, chunk = static.block_d_bwd, static.chunk
    num_chunks = seq // chunk
    tiles = dim // bd
    rows, group, matrix, states = _specs(batch, seq, dim, groups, state, bd)
    starts_spec = pl.BlockSpec((None, num_chunks, bd, state), lambda j, b: (b, 0, j, 0))
    partial = pl.BlockSpec((None, seq, None, state), lambda j, b: (b, 0, j, 0))
    dA_spec = pl.BlockSpec((None, bd, state), lambda j, b: (b, j, 0))
    f32 = jnp.float32
    du, ddelta, dA, dB, dC, dh0 = pl.pallas_call(
        functools.partial(_backward_kernel, chunk=chunk, num_chunks=num_chunks),
        grid=(tiles, batch),
        in_specs=[rows, rows, matrix, group, group, starts_spec, rows, states],
        out_specs=[rows, rows, dA_spec, partial, partial, states],
        out_shape=[
            jax.ShapeDtypeStruct((batch, seq, dim), f32),
            jax.ShapeDtypeStruct((batch, seq, dim), f32),
            jax.ShapeDtypeStruct((batch, dim, state), f32),
            jax.ShapeDtypeStruct((batch, seq, tiles, state), f32),
            jax.ShapeDtypeStruct((batch, seq, tiles, state), f32),
            jax.ShapeDtypeStruct((batch, dim, state), f32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=static.num_warps, num_stages=1),
        interpret=static.interpret,
        name="selective_scan_bwd",
    )(u, delta, A, B, C, starts, dy, dhL)

    # Per-tile partial sums of dB, dC -> per group.
    def fold(x):
        return x.reshape(batch, seq, groups, tiles // groups, state).sum(axis=3)

    return du, ddelta, dA.sum(axis=0), fold(dB), fold(dC), dh0


_core = chunked_scan_core(_forward, _backward)


def scan_recurrence(u, delta, A, B, C, h0, *, block_sizes, interpret):
    """The kernels' part: float32 ``(u, delta, A, B, C, h0) -> (y, h_L)``, any length and state."""
    batch, seq, dim = u.shape
    groups, state = B.shape[2], B.shape[3]
    bs = block_sizes
    per_group = dim // groups
    static = _Static(
        chunk=bs.chunk_size,
        block_d=largest_power_of_2_dividing(per_group, bs.block_d),
        block_d_bwd=largest_power_of_2_dividing(per_group, bs.block_d_bwd),
        num_warps=bs.num_warps,
        interpret=bool(interpret),
    )
    # Padded steps have delta = 0 (state unchanged, no input); padded state slots have A = 0 and
    # B = C = 0 (they stay 0 and contribute nothing).
    seq_pad = round_up(seq, bs.chunk_size) - seq
    state_pad = next_power_of_2(state, minimum=2) - state
    f32 = jnp.float32
    y, hL = _core(
        static,
        pad_trailing(u.astype(f32), (0, seq_pad)),
        pad_trailing(delta.astype(f32), (0, seq_pad)),
        pad_trailing(A.astype(f32), (0, state_pad)),
        pad_trailing(B.astype(f32), (0, seq_pad, 0, state_pad)),
        pad_trailing(C.astype(f32), (0, seq_pad, 0, state_pad)),
        pad_trailing(h0.astype(f32), (0, 0, state_pad)),
    )
    return y[:, :seq], hL[:, :, :state]


# ------------------------------------------------------------------------------------ public API


def check_scan_arguments(name, u, delta, A, B, C, D, z, delta_bias, initial_state):
    """Raises ValueError naming the argument whose shape does not fit."""
    if u.ndim != 3:
        raise ValueError(f"{name}: u must be [batch, seq, dim], got shape {u.shape}")
    batch, seq, dim = u.shape
    if A.ndim != 2 or A.shape[0] != dim:
        raise ValueError(f"{name}: A must be [dim={dim}, state], got shape {A.shape}")
    state = A.shape[1]
    if B.ndim != 4 or B.shape[:2] != (batch, seq) or B.shape[3] != state:
        raise ValueError(
            f"{name}: B must be [batch={batch}, seq={seq}, groups, state={state}], "
            f"got shape {B.shape}"
        )
    groups = B.shape[2]
    if dim % groups:
        raise ValueError(f"{name}: groups={groups} (B.shape[2]) must divide dim={dim}")
    check_shapes(
        name,
        {
            "delta": (delta, u.shape),
            "C": (C, B.shape),
            "z": (z, u.shape),
            "D": (D, (dim,)),
            "delta_bias": (delta_bias, (dim,)),
            "initial_state": (initial_state, (batch, dim, state)),
        },
    )


@functools.partial(
    jax.jit, static_argnames=("delta_softplus", "return_final_state", "block_sizes", "interpret")
)
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
    block_sizes=None,
    interpret=None,
):
    """Mamba-1 selective scan (see the module docstring for the math and layouts).

    The kernels are those of the :func:`~kernels_pallas._common.platform` traced for: Triton on
    GPU (and in interpret mode on CPU), Mosaic (:mod:`kernels_pallas.selective_scan_tpu`) on
    TPU; under ``target_platform('tpu')`` with interpret mode asked for, the Mosaic kernels run
    in Pallas' TPU interpret mode on the CPU.

    Returns ``out [batch, seq, dim]`` in ``u``'s dtype, and the final state ``[batch, dim,
    state]`` (float32) when ``return_final_state``. Differentiable in every array argument.
    ``block_sizes``: :class:`BlockSizes` (default :meth:`BlockSizes.get_default`); the Mosaic
    kernels read only its ``chunk_size``, as a power of two in [8, 256], and chunks of 128 steps
    when ``block_sizes`` is None (:func:`kernels_pallas.selective_scan_tpu.chunk_tile`; their
    channel block is 128 lanes or a whole group). ``interpret=None`` runs the kernels in
    interpret mode on CPU. Jitted: ``delta_softplus``, ``return_final_state``, ``block_sizes``
    and ``interpret`` are static.
    """
    check_scan_arguments("selective_scan", u, delta, A, B, C, D, z, delta_bias, initial_state)
    interpret = resolve_interpret(interpret)
    dtype, delta = prepare_delta(u, delta, delta_bias, delta_softplus)
    batch, _, dim = u.shape
    h0 = (
        jnp.zeros((batch, dim, A.shape[1]), jnp.float32) if initial_state is None else initial_state
    )
    if platform() == "tpu":
        chunk_size = None if block_sizes is None else block_sizes.chunk_size
        y, hL = selective_scan_tpu.scan_core(
            u, delta, A, B, C, h0, chunk_size=chunk_size, interpret=interpret
        )
    else:
        block_sizes = BlockSizes.get_default() if block_sizes is None else block_sizes
        y, hL = scan_recurrence(u, delta, A, B, C, h0, block_sizes=block_sizes, interpret=interpret)
    out = finish_output(y.astype(dtype), u, D, z, dtype)
    return (out, hL) if return_final_state else out


__all__ = [
    "BlockSizes",
    "selective_scan",
    "selective_scan_reference",
    "selective_state_update",
    "scan_recurrence",
    "check_scan_arguments",
    "finish_output",
    "prepare_delta",
]
