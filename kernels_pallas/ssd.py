"""Mamba-2 state-space duality (SSD, Dao & Gu 2024): references, chunked algorithm, kernel path.

Math per batch row and head ``h`` (the function of mamba_ssm's ``mamba_chunk_scan_combined``)::

    dt_t = softplus(dt_t + dt_bias)                    (bias and softplus optional)
    S_t  = exp(dt_t[h] A[h]) S_{t-1} + dt_t[h] x_t[h] (outer) B_t[g(h)]     S: [head_dim, state]
    y_t[h] = S_t C_t[g(h)] + D[h] x_t[h]
    out_t  = y_t * silu(z_t)                           (z optional)

with ``g(h) = h // (heads // groups)`` and ``S_0 = initial_state`` (zeros by default).
Layout: x, z ``[batch, seq, heads, head_dim]``; dt ``[batch, seq, heads]``; A, D, dt_bias
``[heads]``; B, C ``[batch, seq, groups, state]``; states ``[batch, heads, head_dim, state]``.

Three implementations of the same function:
* :func:`ssd_reference`: the recurrence one step at a time (``lax.scan``);
* :func:`ssd_chunked`: the chunked SSD algorithm in jnp (quadratic attention-like form inside each
  chunk of ``chunk_size`` steps, state passing between chunks); the matmul-heavy XLA path;
* :func:`ssd`: the Pallas path. SSD is the Mamba-1 recurrence with one decay per head and one
  channel per (head, head_dim) pair, so it runs on :mod:`kernels_pallas.selective_scan`'s kernels
  (state in registers, chunked recompute in the backward). A dedicated chunked-matmul SSD kernel
  (tensor cores) is not written yet.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas import selective_scan as mamba1


def prepare_delta(x, dt, dt_bias, dt_softplus):
    """Bias and softplus of dt, in float32 or wider; returns (compute dtype, dt)."""
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    dt = dt.astype(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(dtype)
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    return dtype, dt


def finish_output(y, x, D, z, dtype):
    """The D term and the gate, in the dtype of x."""
    if D is not None:
        y = y + x.astype(dtype) * D.astype(dtype)[:, None]
    if z is not None:
        y = y * jax.nn.silu(z.astype(dtype))
    return y.astype(x.dtype)


def _heads(v, heads):
    """[batch, seq, groups, state] -> [batch, seq, heads, state]."""
    return jnp.repeat(v, heads // v.shape[2], axis=2)


def check_ssd_arguments(name, x, dt, A, B, C, D, z, dt_bias, initial_state, chunk_size=None):
    """Raises ValueError naming the argument whose shape does not fit."""
    if x.ndim != 4:
        raise ValueError(f"{name}: x must be [batch, seq, heads, head_dim], got shape {x.shape}")
    batch, seq, heads, head_dim = x.shape
    if B.ndim != 4 or B.shape[:2] != (batch, seq):
        raise ValueError(f"{name}: B must be [batch={batch}, seq={seq}, groups, state], got shape "
                         f"{B.shape}")  # fmt: skip
    groups, state = B.shape[2], B.shape[3]
    if heads % groups:
        raise ValueError(f"{name}: groups={groups} (B.shape[2]) must divide heads={heads}")
    expected = {"dt": (dt, (batch, seq, heads)), "A": (A, (heads,)), "C": (C, B.shape),
                "D": (D, (heads,)), "z": (z, x.shape), "dt_bias": (dt_bias, (heads,)),
                "initial_state": (initial_state, (batch, heads, head_dim, state))}  # fmt: skip
    for arg, (v, shape) in expected.items():
        if v is not None and v.shape != shape:
            raise ValueError(f"{name}: {arg} must have shape {shape}, got {v.shape}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{name}: chunk_size must be a positive int, got {chunk_size!r}")


def ssd_reference(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False,
                  initial_state=None, return_final_state=False):  # fmt: skip
    """The recurrence step by step, in float32 or wider."""
    dtype, dt = prepare_delta(x, dt, dt_bias, dt_softplus)
    batch, _, heads, head_dim = x.shape
    state = B.shape[3]
    Bh, Ch = _heads(B.astype(dtype), heads), _heads(C.astype(dtype), heads)
    s0 = (jnp.zeros((batch, heads, head_dim, state), dtype) if initial_state is None
          else initial_state.astype(dtype))  # fmt: skip
    A = A.astype(dtype)

    def step(s, inputs):
        x_t, dt_t, b_t, c_t = inputs
        decay = jnp.exp(dt_t * A)[:, :, None, None]
        s = decay * s + (dt_t[:, :, None] * x_t)[..., None] * b_t[:, :, None, :]
        return s, jnp.einsum("bhpn,bhn->bhp", s, c_t)

    xs = jax.tree.map(lambda v: jnp.moveaxis(v, 1, 0), (x.astype(dtype), dt, Bh, Ch))
    s, y = lax.scan(step, s0, xs)
    out = finish_output(jnp.moveaxis(y, 0, 1), x, D, z, dtype)
    return (out, s) if return_final_state else out


def ssd_state_update(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decoding step: state ``[batch, heads, head_dim, state]``, x/z ``[batch, heads,
    head_dim]``, dt ``[batch, heads]``, B/C ``[batch, groups, state]`` -> (out, new state)."""
    out, new_state = ssd_reference(
        x[:, None], dt[:, None], A, B[:, None], C[:, None], D=D,
        z=None if z is None else z[:, None], dt_bias=dt_bias, dt_softplus=dt_softplus,
        initial_state=state, return_final_state=True,
    )  # fmt: skip
    return out[:, 0], new_state.astype(state.dtype)


def _segsum(a):
    """a: [..., T] -> [..., T, T] with [i, j] = a[j+1] + ... + a[i] for i >= j, else -inf."""
    t = a.shape[-1]
    below = jnp.tril(jnp.ones((t, t), bool), -1)
    terms = jnp.where(below, a[..., :, None], 0.0)  # [..., k, j] = a[k] if k > j
    sums = jnp.cumsum(terms, axis=-2)
    return jnp.where(jnp.tril(jnp.ones((t, t), bool)), sums, -jnp.inf)


def ssd_chunked(x, dt, A, B, C, *, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
                initial_state=None, return_final_state=False):  # fmt: skip
    """The chunked SSD algorithm (Dao & Gu 2024, listing 1) in jnp, any sequence length."""
    dtype, dt = prepare_delta(x, dt, dt_bias, dt_softplus)
    batch, seq, heads, head_dim = x.shape
    state = B.shape[3]
    q = chunk_size
    pad = -(-seq // q) * q - seq
    chunks = (seq + pad) // q
    # Padded steps have dt = 0: no decay, no input, so the final state is unchanged.
    padded = lambda v: jnp.pad(v, ((0, 0), (0, pad)) + ((0, 0),) * (v.ndim - 2))  # noqa: E731
    split = lambda v: v.reshape(batch, chunks, q, *v.shape[2:])  # noqa: E731
    xdt = split(padded(x.astype(dtype) * dt[..., None]))  # [b, c, q, h, p]
    a = split(padded(dt * A.astype(dtype))).transpose(0, 3, 1, 2)  # [b, h, c, q]
    Bh = split(padded(_heads(B.astype(dtype), heads)))  # [b, c, q, h, n]
    Ch = split(padded(_heads(C.astype(dtype), heads)))
    a_cum = jnp.cumsum(a, axis=-1)

    # 1. Within chunks: masked, decayed C B^T applied to x dt (the "attention" form).
    decay_in = jnp.exp(_segsum(a))  # [b, h, c, q, q]
    y_diag = jnp.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Ch, Bh, decay_in, xdt)
    # 2. Each chunk's own end state, from zero.
    decay_to_end = jnp.exp(a_cum[..., -1:] - a_cum)  # [b, h, c, q]
    chunk_states = jnp.einsum("bclhn,bhcl,bclhp->bchpn", Bh, decay_to_end, xdt)
    # 3. Pass states between chunks: S_c = exp(sum of chunk c's a) S_{c-1} + chunk state.
    s0 = (jnp.zeros((batch, heads, head_dim, state), dtype) if initial_state is None
          else initial_state.astype(dtype))  # fmt: skip
    chunk_states = jnp.concatenate([s0[:, None], chunk_states], axis=1)  # [b, c+1, h, p, n]
    decay_chunks = jnp.exp(_segsum(jnp.pad(a_cum[..., -1], ((0, 0), (0, 0), (1, 0)))))
    states = jnp.einsum("bhzc,bchpn->bzhpn", decay_chunks, chunk_states)
    starts, final = states[:, :-1], states[:, -1]
    # 4. Each step's output from its chunk's start state.
    y_off = jnp.einsum("bclhn,bchpn,bhcl->bclhp", Ch, starts, jnp.exp(a_cum))
    y = (y_diag + y_off).reshape(batch, chunks * q, heads, head_dim)[:, :seq]
    out = finish_output(y, x, D, z, dtype)
    return (out, final) if return_final_state else out


def ssd(x, dt, A, B, C, *, chunk_size=None, D=None, z=None, dt_bias=None, dt_softplus=False,
        initial_state=None, return_final_state=False, block_sizes=None,
        interpret=None):  # fmt: skip
    """SSD on the Pallas selective-scan kernels (see the module docstring); same arguments as
    :func:`ssd_chunked` (``chunk_size`` is the kernels' recompute chunk when given)."""
    check_ssd_arguments("ssd", x, dt, A, B, C, D, z, dt_bias, initial_state, chunk_size)
    dtype, dt = prepare_delta(x, dt, dt_bias, dt_softplus)
    batch, seq, heads, head_dim = x.shape
    state = B.shape[3]
    if block_sizes is None:
        block_sizes = mamba1.BlockSizes(chunk=min(chunk_size or 16, 16))
    interpret = jax.default_backend() == "cpu" if interpret is None else interpret
    # One channel per (head, head_dim) pair; channel h * head_dim + p uses head h's decay.
    u = x.reshape(batch, seq, heads * head_dim)
    delta = jnp.repeat(dt, head_dim, axis=2)
    A_ch = jnp.broadcast_to(jnp.repeat(A.astype(jnp.float32), head_dim)[:, None],
                            (heads * head_dim, state))  # fmt: skip
    s0 = (jnp.zeros((batch, heads, head_dim, state), jnp.float32) if initial_state is None
          else initial_state)  # fmt: skip
    y, final = mamba1.scan_recurrence(u, delta, A_ch, B, C,
                                      s0.reshape(batch, heads * head_dim, state),
                                      block_sizes=block_sizes, interpret=interpret)  # fmt: skip
    out = finish_output(y.reshape(x.shape).astype(dtype), x, D, z, dtype)
    final = final.reshape(batch, heads, head_dim, state)
    return (out, final) if return_final_state else out
