"""What every kernel in this package shares: platform resolution, padding, argument checks, and
the elementwise prologue/epilogue of the scans. Imports jax only, like the kernels."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

PLATFORMS = ("cpu", "gpu", "tpu")
_targets: list[str] = []  # the open target_platform() contexts, innermost last


def platform() -> str:
    """The platform the kernels are traced for: ``jax.default_backend()``, or the innermost
    :func:`target_platform`'s."""
    return _targets[-1] if _targets else jax.default_backend()


@contextlib.contextmanager
def target_platform(name: str):
    """Traces the kernels (and ``jaxlab.ops``' ``'auto'`` choices) for ``name`` instead of
    ``jax.default_backend()``: compiling ahead of time for a GPU or TPU topology happens on a
    CPU-backed process (``experiments/aot_check.py``).

    jit's trace cache does not key on the platform (it is decided inside the jitted kernels), so
    the caches are cleared on entry and exit: no trace made for one platform is reused for
    another."""
    if name not in PLATFORMS:
        raise ValueError(f"target_platform: name must be one of {PLATFORMS}, got {name!r}")
    jax.clear_caches()
    _targets.append(name)
    try:
        yield
    finally:
        _targets.pop()
        jax.clear_caches()


def resolve_interpret(interpret: bool | None) -> bool:
    """``interpret`` as a bool: None means interpret mode on CPU and the compiled kernels on GPU
    (Triton) and TPU (Mosaic), by the :func:`platform` traced for."""
    return platform() == "cpu" if interpret is None else bool(interpret)


# --------------------------------------------------------------------------------------- padding


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= n."""
    return -(-n // multiple) * multiple


def next_power_of_2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= n, and at least ``minimum``."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def largest_power_of_2_dividing(n: int, cap: int) -> int:
    """The largest power of two that divides n and is at most ``cap``."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def pad_trailing(x: jax.Array, widths, value=0) -> jax.Array:
    """Pads ``x`` at the end of its leading axes: ``widths[i]`` entries after axis ``i``; the
    axes past ``len(widths)`` are not padded."""
    pads = [(0, w) for w in widths] + [(0, 0)] * (x.ndim - len(widths))
    return jnp.pad(x, pads, constant_values=value)


# ------------------------------------------------------------------------------ custom VJP cores


def chunked_scan_core(forward, backward):
    """The differentiable core of a scan whose forward kernel saves the state at chunk starts.

    ``forward(static, *inputs, h0) -> (y, starts, h_L)``; ``backward(static, *inputs, starts, dy,
    dh_L)`` -> the gradients of ``(*inputs, h0)``. Returns ``core(static, *inputs, h0) -> (y,
    h_L)``, differentiable in every array, whose backward keeps only the inputs and the starts.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def core(static, *args):
        y, _, final = forward(static, *args)
        return y, final

    def core_fwd(static, *args):
        y, starts, final = forward(static, *args)
        return (y, final), (*args[:-1], starts)  # h0 is not needed: the starts begin with it

    def core_bwd(static, residuals, cotangents):
        return backward(static, *residuals, *cotangents)

    core.defvjp(core_fwd, core_bwd)
    return core


# ------------------------------------------------------------------------------- argument checks


def check_shapes(name: str, expected: dict) -> None:
    """``expected``: argument name -> (array or None, required shape); raises ValueError naming
    the first argument given with another shape."""
    for arg, (x, shape) in expected.items():
        if x is not None and x.shape != shape:
            raise ValueError(f"{name}: {arg} must have shape {shape}, got {x.shape}")


def check_positive_int(name: str, arg: str, value) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")


# ------------------------------------------------------- the scans' elementwise prologue/epilogue


def prepare_delta(x, delta, delta_bias, delta_softplus):
    """Bias and softplus of the step size, in float32 or wider; returns (compute dtype, delta).

    ``delta``: the step per channel (Mamba-1) or per head (SSD); ``delta_bias`` broadcasts over
    its trailing axis.
    """
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    delta = delta.astype(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.astype(dtype)
    if delta_softplus:
        delta = jax.nn.softplus(delta)
    return dtype, delta


def finish_output(y, x, D, z, dtype):
    """The skip term ``D x`` and the gate ``silu(z)`` in ``dtype``, then ``x``'s dtype.

    ``x, y, z``: ``[batch, seq, ...]``; ``D`` covers the axes after seq from the left (``[dim]``
    for Mamba-1, ``[heads]`` for SSD's ``[..., heads, head_dim]``).
    """
    if D is not None:
        D = D.astype(dtype)
        y = y + x.astype(dtype) * D.reshape(D.shape + (1,) * (x.ndim - 2 - D.ndim))
    if z is not None:
        y = y * jax.nn.silu(z.astype(dtype))
    return y.astype(x.dtype)
