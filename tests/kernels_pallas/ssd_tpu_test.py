"""The Mosaic (TPU) SSD kernels in Pallas' TPU interpret mode against the float64 references, and
their lowering for TPU.

``kernels_pallas.ssd.ssd`` runs the Mosaic kernels when traced for TPU; under
``target_platform('tpu')`` with ``interpret=True`` they are emulated on the CPU. Tolerances
(issue 24): float32 outputs 2e-5 and gradients 5e-5, relative to the largest magnitude (at least
1); bf16 inputs 3e-2. Shapes are tiny: the TPU interpreter is slow.
"""

import jax
import jax.numpy as jnp
import pytest

from jaxlab.ops import scan as scan_ops
from kernels_pallas import ssd as ssd_lib
from kernels_pallas import ssd_tpu
from kernels_pallas._common import target_platform
from tests.kernels_pallas.selective_scan_test import numpy_ssd, ssd_inputs
from tests.kernels_pallas.tpu_testing import (
    assert_close,
    assert_grads_match_float64,
    grads,
    lowered_for_tpu,
)

GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def tpu_ssd(**kw):
    """The public kernel entry traced for TPU, in TPU interpret mode."""
    with target_platform("tpu"):
        return ssd_lib.ssd(**kw, return_final_state=True, interpret=True)


def numpy_of(args, options):
    return numpy_ssd(
        args["x"],
        args["dt"],
        args["A"],
        args["B"],
        args["C"],
        options.get("D"),
        options.get("z"),
        options.get("dt_bias"),
        options.get("dt_softplus", False),
        options.get("initial_state"),
    )


# (chunk_size, seq, heads, head_dim, groups, state, options kept): odd lengths that are no
# multiple of the chunk, head_dim/state that are no multiple of 8 (padded), GQA and not.
CASES = [
    (8, 21, 4, 4, 2, 6, ("D", "z", "dt_bias", "dt_softplus", "initial_state")),
    (16, 37, 2, 8, 1, 8, ()),
    (8, 13, 4, 5, 4, 3, ("D", "initial_state")),
    (16, 21, 4, 4, 1, 6, ("z", "dt_bias", "dt_softplus")),
]


def case_inputs(seed, seq, heads, head_dim, groups, state, kept, dtype=jnp.float32):
    rng, args, options = ssd_inputs(seed, 2, seq, heads, head_dim, groups, state)
    args = {k: v if k == "A" else v.astype(dtype) for k, v in args.items()}
    options = {k: v for k, v in options.items() if k in kept}
    if "z" in options:
        options["z"] = options["z"].astype(dtype)
    return rng, args, options


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"chunk{c[0]}-seq{c[1]}-g{c[4]}")
def test_outputs_and_final_state_match_the_float64_recurrence(case):
    chunk_size, seq, heads, head_dim, groups, state, kept = case
    _, args, options = case_inputs(seq, seq, heads, head_dim, groups, state, kept)
    out, final = tpu_ssd(**args, **options, chunk_size=chunk_size)
    want_out, want_final = numpy_of(args, options)
    assert out.shape == want_out.shape and final.shape == want_final.shape
    assert_close(out, want_out, 2e-5, "out")
    assert_close(final, want_final, 2e-5, "final state")


def test_bf16_inputs_match_the_float64_recurrence():
    _, args, options = case_inputs(
        1, 29, 4, 8, 2, 8, ("D", "z", "dt_bias", "dt_softplus"), dtype=jnp.bfloat16
    )
    out, final = tpu_ssd(**args, **options, chunk_size=16)
    assert out.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    want_out, want_final = numpy_of(args, options)  # of the bf16-rounded inputs
    assert_close(out, want_out, 3e-2, "out")
    assert_close(final, want_final, 3e-2, "final state")


@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=["all-options-gqa", "bare"])
def test_gradients_of_every_input_match_the_float64_reference(case):
    chunk_size, seq, heads, head_dim, groups, state, kept = case
    rng, args, options = case_inputs(seq + 1, seq, heads, head_dim, groups, state, kept)
    every = {**args, **options}
    names = [n for n in GRAD_NAMES if n in every]
    fixed = {k: v for k, v in every.items() if k not in names}
    values = [every[n] for n in names]
    ct = jnp.asarray(rng.standard_normal(args["x"].shape), jnp.float32)
    ct_final = jnp.asarray(rng.standard_normal((2, heads, head_dim, state)), jnp.float32)
    got = grads(tpu_ssd, values, names, dict(fixed, chunk_size=chunk_size), ct, ct_final)

    def reference(**kw):
        return ssd_lib.ssd_reference(**kw, return_final_state=True)

    assert_grads_match_float64(got, reference, values, names, fixed, ct, ct_final)


def test_chunk_tile_is_a_power_of_two_in_8_to_256():
    assert [ssd_tpu.chunk_tile(c) for c in (None, 1, 8, 9, 64, 100, 256, 1000)] == [
        128,
        8,
        8,
        16,
        64,
        128,
        256,
        256,
    ]


def _specs(dtype, batch=1, seq=300, heads=4, head_dim=64, groups=2, state=128):
    spec = jax.ShapeDtypeStruct
    return (
        spec((batch, seq, heads, head_dim), dtype),
        spec((batch, seq, heads), dtype),
        spec((heads,), jnp.float32),
        spec((batch, seq, groups, state), dtype),
        spec((batch, seq, groups, state), dtype),
        spec((batch, heads, head_dim, state), jnp.float32),
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_and_backward_lower_to_mosaic_for_tpu(dtype):
    def forward_backward(x, dt, A, B, C, s0):
        def run(*a):
            return ssd_lib.ssd(
                *a[:5],
                initial_state=a[5],
                dt_softplus=True,
                return_final_state=True,
            )

        out, vjp = jax.vjp(run, x, dt, A, B, C, s0)
        return out, vjp(out)

    text = lowered_for_tpu(forward_backward, _specs(dtype))
    assert "ssd_chunked_fwd_tpu" in text and "ssd_chunked_bwd_tpu" in text
    assert text.count("@tpu_custom_call(") == 2


def test_ops_auto_picks_the_mosaic_kernel_on_tpu_and_xla_on_cpu():
    def run(x, dt, A, B, C, s0):
        return scan_ops.ssd(x, dt, A, B, C, initial_state=s0, impl="auto")

    assert lowered_for_tpu(run, _specs(jnp.float32)).count("@tpu_custom_call(") == 1
    with target_platform("cpu"):
        text = jax.jit(run).trace(*_specs(jnp.float32)).lower().as_text()
    assert "tpu_custom_call" not in text
