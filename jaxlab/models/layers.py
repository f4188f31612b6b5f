"""Building blocks shared by the model families: parameters with logical axes (in flax's
sharding metadata), RMSNorm, RoPE,
and the :class:`HiddenStates` a model call returns when asked for its internals."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROPE_SCALING_TYPES = ("linear", "llama3")


class HiddenStates(NamedTuple):
    """What a model call returns beside the logits with ``return_hidden``/``return_attention``.

    Attributes:
      residuals: ``num_layers + 1`` arrays ``[batch, seq, embed]`` in the compute dtype: the
        embedding output, then the output of each layer (the residual stream after it); a model
        with ``parallel_groups`` has one per group, as its depth. For a
        DenseFormer these are the block outputs ``X_i``, before any depth-weighted average.
      attention: one float32 ``[batch, heads, q_len, kv_len]`` array of attention probabilities
        per layer (``None`` for a layer without attention, such as a Mamba layer; ``kv_len`` is
        the cache length when decoding with a cache), or ``None`` when ``return_attention`` is
        False.
      averaged: DenseFormer only (else ``None``): ``num_layers + 1`` arrays ``[batch, seq,
        embed]``, ``Y_0 = X_0`` and then ``Y_i``, the input of block ``i + 1`` (the depth-weighted
        average after block ``i``, or ``X_i`` where no average follows it); ``Y_L`` is what the
        final norm reads.
    """

    residuals: tuple[jax.Array, ...]
    attention: tuple[jax.Array | None, ...] | None
    averaged: tuple[jax.Array, ...] | None = None


def logical_param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    """``value`` as a parameter annotated with its logical axis names in flax's own sharding
    metadata (``out_sharding``, as ``nnx.with_partitioning`` sets it).

    Eager sharding is off: models are built before (and without) a mesh, and
    ``jaxlab.train.sharding.state_shardings`` places every annotated variable, ours or a user's.
    """
    if len(axes) != value.ndim:
        raise ValueError(
            f"logical_param: axes {axes} must name each dimension of shape {value.shape}"
        )
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def param(
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    *,
    dtype: jnp.dtype,
    std: float | None = None,
    value: float | None = None,
) -> nnx.Param:
    """A new parameter carrying its logical axis names (see :func:`logical_param`).

    ``std`` draws a truncated-free normal, ``value`` fills a constant; exactly one is given.
    """
    if value is not None:
        init = jnp.full(shape, value, dtype)
    else:
        init = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return logical_param(init, axes)


def logical_axes(state: nnx.State) -> nnx.State:
    """The logical axis names (flax's ``out_sharding`` metadata, a tuple; None where a variable
    has none) of every variable in ``state``, in the same tree structure."""

    def axes_of(variable):
        axes = variable.get_metadata().get("out_sharding")
        return None if axes is None else tuple(axes)

    return jax.tree.map(axes_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def matmul(x: jax.Array, w: jax.Array, in_dims: int = 1, **dot_kwargs) -> jax.Array:
    """``x`` contracted over its last ``in_dims`` axes with the first ``in_dims`` axes of ``w``:
    ``[..., *in] x [*in, *out] -> [..., *out]``, the einsum of a projection, computed as one 2-D
    matmul over the flattened leading axes (``dot_kwargs`` go to ``jnp.matmul``, e.g.
    ``preferred_element_type``).

    Why 2-D: for a 3-D ``[batch, seq, in]`` input XLA:CPU copies the cotangent into a transposed
    layout before the weight-gradient matmul that contracts ``(batch, seq)`` (4 copies of
    ``[batch, seq, mlp]`` per SwiGLU block); with one row axis it contracts in place (lm_tiny's
    SwiGLU forward + backward 0.58x the time, XLA scratch 43 -> 27 MiB).
    """
    lead, inner = x.shape[: x.ndim - in_dims], x.shape[x.ndim - in_dims :]
    if w.shape[:in_dims] != inner:
        raise ValueError(
            f"matmul: the first {in_dims} axes of w must be x's last {in_dims} {inner}, got "
            f"x.shape={x.shape}, w.shape={w.shape}"
        )
    out = w.shape[in_dims:]
    rows = x.reshape(math.prod(lead), math.prod(inner))
    y = jnp.matmul(rows, w.reshape(math.prod(inner), math.prod(out)), **dot_kwargs)
    return y.reshape(*lead, *out)


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale``, normalised in float32 as Llama does."""

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, (dim,), ("embed",), dtype=param_dtype, value=1.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling, as Hugging Face's ``rope_parameters``.

    Attributes:
      type: ``"linear"`` (positions divided by ``factor``) or ``"llama3"`` (Llama 3.1: long
        wavelengths divided by ``factor``, short ones kept, a smooth ramp between).
      factor: the scaling factor.
      low_freq_factor: llama3 only.
      high_freq_factor: llama3 only.
      original_max_position_embeddings: llama3 only; the pretraining context length.
    """

    type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.type not in ROPE_SCALING_TYPES:
            raise ValueError(
                f"rope_scaling.type must be one of {ROPE_SCALING_TYPES}, got {self.type!r}"
            )
        if not self.factor > 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                "rope_scaling: high_freq_factor must exceed low_freq_factor, got "
                f"{self.high_freq_factor} <= {self.low_freq_factor}"
            )


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` (float64 NumPy, computed once at trace time)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv_freq
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    # llama3
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    return np.where(
        wavelen < high_freq_wavelen,
        inv_freq,
        np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, smoothed),
    )


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates ``x: [batch, seq, heads, head_dim]`` by ``positions: [batch, seq]``.

    Uses the half-split layout (dimension ``i`` pairs with ``i + head_dim/2``) of Hugging Face
    checkpoints, so their q/k projections load without permutation.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
