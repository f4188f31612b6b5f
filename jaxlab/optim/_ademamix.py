r"""AdEMAMix: Adam with a second, slow EMA of gradients mixed into the update.

Pagliardini, Ablin, Grangier, *The AdEMAMix Optimizer: Better, Faster, Older* (ICLR 2025),
https://arxiv.org/abs/2409.03137, Algorithm 1. With gradient :math:`g_t` at step
:math:`t = 1, 2, \dots`:

.. math::

    m_1 &\leftarrow \beta_1 m_1 + (1 - \beta_1) g_t, \qquad
    m_2 \leftarrow \beta_3(t) m_2 + (1 - \beta_3(t)) g_t, \qquad
    \nu \leftarrow \beta_2 \nu + (1 - \beta_2) g_t^2 \\
    u_t &= \frac{m_1 / (1 - \beta_1^t) + \alpha(t)\, m_2}
               {\sqrt{\nu / (1 - \beta_2^t) + \epsilon_{root}} + \epsilon}

and :func:`ademamix` applies ``-lr(t) * (u_t + weight_decay * params)``. The slow EMA :math:`m_2`
has no bias correction, on purpose: it should fill slowly. ``alpha = 0`` is AdamW.

Differences from ``optax.contrib.ademamix`` (whose update equation this matches):

* the paper's warm-up schedulers ship here (:func:`alpha_schedule`, :func:`beta3_schedule`);
  without them a large ``b3`` diverges early. Both are finite at ``warmup_steps = 0``;
* ``mu_dtype`` keeps *both* EMAs in that dtype across steps, while the second moment keeps the
  parameters' dtype unless ``nu_dtype`` is given. Arithmetic runs in the promoted dtype of the
  gradient, the stored moments and float32 (so float64 under ``jax_enable_x64`` with float64
  parameters, float32 for float32/bfloat16 ones); low-precision moments are read into that
  dtype and cast back when stored;
* ``b1 = 0`` drops the fast EMA entirely (``m1`` is ``None``: no leaf), so the state is as large
  as AdamW's;
* one step counter. Step convention: schedules are evaluated at the 0-based count of updates
  applied so far (before incrementing), as optax.contrib does; bias corrections use the 1-based
  count. ``optax.MultiSteps`` therefore advances the schedules once per real update.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

ScalarOrSchedule = float | jax.Array | optax.Schedule


class ScaleByAdemamixState(NamedTuple):
    """State of :func:`scale_by_ademamix`.

    Attributes:
      count: number of updates applied so far, shape=(), dtype=int32.
      m1: fast EMA of the gradients (``mu_dtype``), or None when ``b1 == 0``.
      m2: slow EMA of the gradients (``mu_dtype``).
      nu: EMA of the squared gradients (``nu_dtype``, default the parameters' dtype).
    """

    count: jax.Array
    m1: Any
    m2: Any
    nu: Any


def _value(x: ScalarOrSchedule, count: jax.Array) -> jax.Array:
    return x(count) if callable(x) else x


def _float_dtype() -> jnp.dtype:
    """The default float dtype: float64 under ``jax_enable_x64``, float32 otherwise."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _in(x: Any, dtype: jnp.dtype) -> Any:
    """An array hyperparameter (a schedule's value, an injected one) in the compute dtype.

    Python scalars stay weakly typed, so they take the dtype of the arrays they meet.
    """
    return x if type(x) in (int, float) else jnp.asarray(x).astype(dtype)


def _storage_dtype(name: str, dtype: Any) -> jnp.dtype | None:
    """``dtype`` as ``jnp.dtype`` takes it (``jnp.bfloat16``, ``np.float32``, ``"bfloat16"``)."""
    if dtype is None:
        return None
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(
            f"scale_by_ademamix: {name} must be a floating dtype (jnp.bfloat16, np.float32, "
            f"'float32', ...) or None, got {dtype!r}"
        ) from e
    if not jnp.issubdtype(resolved, jnp.floating):
        raise TypeError(
            f"scale_by_ademamix: {name} must be a floating dtype (jnp.bfloat16, np.float32, "
            f"'float32', ...) or None, got {dtype!r} ({resolved})"
        )
    return jax.dtypes.canonicalize_dtype(resolved)


def alpha_schedule(alpha: float, warmup_steps: int) -> optax.Schedule:
    """Linear warm-up of the mixing coefficient: ``min(step * alpha / warmup_steps, alpha)``.

    ``warmup_steps = 0`` gives the constant ``alpha``. Evaluated in the default float dtype
    (float64 under ``jax_enable_x64``, float32 otherwise).
    """
    if warmup_steps < 0:
        raise ValueError(f"alpha_schedule: warmup_steps must be >= 0, got {warmup_steps}")

    def schedule(step):
        dtype = _float_dtype()
        if warmup_steps == 0:
            return jnp.asarray(alpha, dtype)
        return jnp.minimum(jnp.asarray(step, dtype) * alpha / warmup_steps, alpha)

    return schedule


def _half_life(beta: float) -> float:
    """Steps after which an EMA with decay ``beta`` holds half its mass: ln(0.5)/ln(beta) - 1.

    Computed in float64 once (ln(beta) near 1 loses digits in float32); ``beta = 0`` gives -1.
    """
    return -1.0 if beta == 0 else math.log(0.5) / math.log(beta) - 1.0


def beta3_schedule(beta_start: float, beta_end: float, warmup_steps: int) -> optax.Schedule:
    """The paper's half-life-linear warm-up of ``b3`` from ``beta_start`` to ``beta_end``.

    The half-life ``f(beta) = ln(0.5)/ln(beta) - 1`` grows linearly: with
    ``mu = min(step / warmup_steps, 1)``,
    ``beta3(step) = f^-1((1 - mu) f(beta_start) + mu f(beta_end))`` with
    ``f^-1(tau) = 0.5^(1/(tau+1))``, which in closed form is
    ``exp(ln(beta_start) ln(beta_end) / ((1 - mu) ln(beta_end) + mu ln(beta_start)))``.
    Written through half-lives it stays finite for ``beta_start = 0``; ``warmup_steps = 0`` gives
    the constant ``beta_end``. The paper uses ``beta_start = b1``. Evaluated in the default
    float dtype (float64 under ``jax_enable_x64``, float32 otherwise).
    """
    if not 0 <= beta_start <= beta_end < 1:
        raise ValueError(
            "beta3_schedule: need 0 <= beta_start <= beta_end < 1, got "
            f"beta_start={beta_start}, beta_end={beta_end}"
        )
    if warmup_steps < 0:
        raise ValueError(f"beta3_schedule: warmup_steps must be >= 0, got {warmup_steps}")
    start, end = _half_life(beta_start), _half_life(beta_end)

    def schedule(step):
        dtype = _float_dtype()
        if warmup_steps == 0:
            return jnp.asarray(beta_end, dtype)
        mu = jnp.minimum(jnp.asarray(step, dtype) / warmup_steps, 1.0)
        tau = (1.0 - mu) * start + mu * end
        return jnp.minimum(jnp.power(0.5, 1.0 / (tau + 1.0)), beta_end)

    return schedule


def scale_by_ademamix(
    b1: float = 0.9,
    b2: float = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 5.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    """Scales updates by the AdEMAMix rule (see the module docstring).

    Args:
      b1: decay of the fast EMA; 0 drops the fast EMA buffer (``m1 = g``).
      b2: decay of the second-moment EMA.
      b3: decay of the slow EMA, a float or a schedule (see :func:`beta3_schedule`).
      alpha: weight of the slow EMA, a float or a schedule (see :func:`alpha_schedule`).
      eps: added to the denominator outside the square root.
      eps_root: added inside the square root.
      mu_dtype: storage dtype of both EMAs, anything ``jnp.dtype`` takes (``jnp.bfloat16``,
        ``np.float32``, ``"bfloat16"``); default the parameters'.
      nu_dtype: storage dtype of the second moment, as ``mu_dtype``; default the parameters'.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleByAdemamixState`.
    """
    for name, value in (("b1", b1), ("b2", b2)):
        if isinstance(value, int | float) and not 0 <= value < 1:
            raise ValueError(f"scale_by_ademamix: {name} must be in [0, 1), got {value}")
    mu_dtype = _storage_dtype("mu_dtype", mu_dtype)
    nu_dtype = _storage_dtype("nu_dtype", nu_dtype)

    def zeros(params, dtype):
        return jax.tree.map(lambda p: jnp.zeros_like(p, dtype=dtype), params)

    def init_fn(params):
        # Under optax.inject_hyperparams, b1 arrives as a concrete array here.
        drop_m1 = not isinstance(b1, jax.core.Tracer) and b1 == 0
        return ScaleByAdemamixState(
            count=jnp.zeros([], jnp.int32),
            m1=None if drop_m1 else zeros(params, mu_dtype),
            m2=zeros(params, mu_dtype),
            nu=zeros(params, nu_dtype),
        )

    def update_fn(updates, state, params=None):
        del params
        c_b3 = _value(b3, state.count)
        c_alpha = _value(alpha, state.count)
        count = numerics.safe_int32_increment(state.count)
        corrections = {}

        def bias_corrections(dtype):
            """``1 - b1^t`` and ``1 - b2^t`` in ``dtype``, computed once per dtype."""
            if dtype not in corrections:
                t = count.astype(dtype)
                corrections[dtype] = (1.0 - _in(b1, dtype) ** t, 1.0 - _in(b2, dtype) ** t)
            return corrections[dtype]

        def leaf(g, m1, m2, nu):
            # The promoted dtype, at least float32: float32 for float32/bfloat16 gradients and
            # low-precision moments, float64 when the gradient (or a moment) is float64.
            dtype = jnp.result_type(
                g.dtype, m2.dtype, nu.dtype, jnp.float32, *(() if m1 is None else (m1.dtype,))
            )
            gc = g.astype(dtype)
            lb1, lb2, lb3, lalpha = (_in(x, dtype) for x in (b1, b2, c_b3, c_alpha))
            m1_correction, nu_correction = bias_corrections(dtype)
            m2_new = lb3 * m2.astype(dtype) + (1.0 - lb3) * gc
            nu_new = lb2 * nu.astype(dtype) + (1.0 - lb2) * gc * gc
            if m1 is None:
                m1_new, fast = None, gc
            else:
                m1_new = lb1 * m1.astype(dtype) + (1.0 - lb1) * gc
                fast = m1_new / m1_correction
            u = (fast + lalpha * m2_new) / (jnp.sqrt(nu_new / nu_correction + eps_root) + eps)
            return (
                u.astype(g.dtype),
                None if m1 is None else m1_new.astype(m1.dtype),
                m2_new.astype(m2.dtype),
                nu_new.astype(nu.dtype),
            )

        # One function per leaf. XLA:CPU still compiles one loop per stored output (it builds no
        # multi-output loops, and jaxlib 0.10.2 has no option for them: XLA_FLAGS refuses
        # --xla_cpu_use_multi_output_fusion as unknown, compiler_options as 'No such compile
        # option'): 14 array passes per parameter against AdamW's 10, as optax.contrib's;
        # experiments/bench/optim.py reports them. Updating the moments in a
        # loop over cache-sized blocks was tried: 1.11x AdamW on one core (1.48x without), but
        # 1.7-2.1x on two, as XLA:CPU runs the fusions inside the loop on one thread.
        m1_tree = state.m1 if state.m1 is not None else jax.tree.map(lambda _: None, updates)
        out = jax.tree.map(leaf, updates, m1_tree, state.m2, state.nu, is_leaf=lambda x: x is None)

        def pick(i):
            """Component i of every leaf's (update, m1, m2, nu), as a tree like updates."""
            return jax.tree.map(lambda _, o: o[i], updates, out)

        new_updates, m1, m2, nu = pick(0), pick(1), pick(2), pick(3)
        return new_updates, ScaleByAdemamixState(count, None if state.m1 is None else m1, m2, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def ademamix(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 5.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    mask: Any = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    """AdEMAMix as an optax chain: the core, decoupled weight decay, then the learning rate.

    Args:
      learning_rate: a float or a schedule.
      b1, b2, b3, alpha, eps, eps_root, mu_dtype, nu_dtype: see :func:`scale_by_ademamix`.
      weight_decay: decoupled weight decay, multiplied by the learning rate (as AdamW).
      mask: pytree (or function of the params) selecting the parameters that get weight decay.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax
      >>> from jaxlab.optim import ademamix, alpha_schedule, beta3_schedule
      >>> tx = ademamix(1e-1, b3=beta3_schedule(0.9, 0.999, 100), alpha=alpha_schedule(5.0, 100))
      >>> x = jnp.array([1.0, -2.0]); state = tx.init(x)
      >>> for _ in range(3):
      ...     g = 2 * x
      ...     updates, state = tx.update(g, state, x)
      ...     x = optax.apply_updates(x, updates)
      >>> print(np.round(np.asarray(x), 3))
      [ 0.699 -1.698]
    """
    return optax.chain(
        scale_by_ademamix(
            b1=b1,
            b2=b2,
            b3=b3,
            alpha=alpha,
            eps=eps,
            eps_root=eps_root,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
