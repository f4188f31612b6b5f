"""The matrix form of an SSD layer (Dao & Gu 2024, "state space duality"): what MOHAWK stage 1
aligns with a teacher's attention probabilities.

For one head, the SSD recurrence ``h_t = exp(dt_t A) h_{t-1} + s_t x_t B_t^T``,
``y_t = h_t C_t + D x_t`` (``s_t = dt_t`` for Mamba-2, ``s_t = 1`` for the discrete Mamba-2 of
Llamba, whose input is not scaled by the step) unrolls from a zero state to ``y = M x`` over the
sequence, with the lower-triangular ``[seq, seq]`` matrix

    M[t, s] = (C_t . B_s) * exp(A * (dt_{s+1} + ... + dt_t)) * s_s      for s <= t,
    M[t, s] = 0                                                          for s > t,

plus ``D`` on the diagonal: a causal "attention" matrix that :func:`ssd_matrix` materialises.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.ssd import _segsum


def ssd_matrix(dt, A, B, C, *, D=None, scale_inputs: bool = True) -> jax.Array:
    """The mixer matrix ``M`` ``[batch, heads, seq, seq]`` of an SSD layer (module docstring).

    Args:
      dt: [batch, seq, heads] step sizes (after any bias and softplus).
      A: [heads] decay rates (negative).
      B, C: [batch, seq, groups, state], ``groups`` dividing ``heads`` (head ``i`` reads group
        ``i // (heads // groups)``, as :func:`jaxlab.ops.scan.ssd` does).
      D: [heads] skip weights on the diagonal, or None.
      scale_inputs: the input is scaled by its step (Mamba-2); False for discrete Mamba-2.

    Returns:
      ``M`` in float32 or wider (the inputs' dtype if wider), such that the SSD's output from a
      zero state is ``y[b, t, h] = sum_s M[b, h, t, s] x[b, s, h]``.
    """
    if dt.ndim != 3 or B.ndim != 4 or B.shape[:2] != dt.shape[:2] or C.shape != B.shape:
        raise ValueError(
            "ssd_matrix: dt must be [batch, seq, heads] and B, C [batch, seq, groups, state] "
            f"with the same batch and seq, got dt {dt.shape}, B {B.shape}, C {C.shape}"
        )
    heads, groups = dt.shape[2], B.shape[2]
    if A.shape != (heads,) or heads % groups or (D is not None and D.shape != (heads,)):
        raise ValueError(
            f"ssd_matrix: A and D must be [heads={heads}] and groups={groups} must divide the "
            f"heads, got A {A.shape}, D {None if D is None else D.shape}"
        )
    dtype = jnp.promote_types(dt.dtype, jnp.float32)
    dt = dt.astype(dtype)
    per_head = heads // groups
    Bh = jnp.repeat(B.astype(dtype), per_head, axis=2)
    Ch = jnp.repeat(C.astype(dtype), per_head, axis=2)
    scores = jnp.einsum("bthn,bshn->bhts", Ch, Bh)
    # exp(-inf) = 0 above the diagonal: the matrix is causal.
    decay = jnp.exp(_segsum(jnp.moveaxis(dt * A.astype(dtype), 1, 2)))  # [b, h, t, s]
    M = scores * decay
    if scale_inputs:
        M = M * jnp.moveaxis(dt, 1, 2)[:, :, None, :]
    if D is not None:
        M = M + D.astype(dtype)[:, None, None] * jnp.eye(dt.shape[1], dtype=dtype)
    return M
