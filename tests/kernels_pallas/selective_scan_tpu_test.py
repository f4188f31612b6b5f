"""The Mosaic (TPU) selective-scan kernels in Pallas' TPU interpret mode against the float64
references, and their lowering for TPU.

``kernels_pallas.selective_scan.selective_scan`` runs the Mosaic kernels when traced for TPU;
under ``target_platform('tpu')`` with ``interpret=True`` they are emulated on the CPU.
Tolerances (issue 24): float32 outputs 2e-5 and gradients 5e-5, relative to the largest
magnitude (at least 1); bf16 inputs 3e-2. Shapes are tiny: the TPU interpreter is slow.
"""

import jax
import jax.numpy as jnp
import pytest

from jaxlab.ops import scan as scan_ops
from kernels_pallas import selective_scan as ss
from kernels_pallas import selective_scan_tpu
from kernels_pallas._common import target_platform
from tests.kernels_pallas.selective_scan_test import numpy_of, scan_inputs
from tests.kernels_pallas.tpu_testing import (
    assert_close,
    assert_grads_match_float64,
    grads,
    lowered_for_tpu,
)

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def tpu_scan(**kw):
    """The public kernel entry traced for TPU, in TPU interpret mode."""
    with target_platform("tpu"):
        return ss.selective_scan(**kw, return_final_state=True, interpret=True)


# (chunk_size, seq, dim, groups, state, options kept): lengths that are no multiple of the
# chunk, a state that is no multiple of 8 (padded), one group and several (a channel block per
# group of at most 128; groups of 200 channels: padded to two blocks of 128 lanes each), with
# and without each option.
CASES = [
    (8, 21, 8, 2, 5, ("D", "z", "delta_bias", "delta_softplus", "initial_state")),
    (16, 37, 6, 1, 8, ()),
    (8, 13, 12, 3, 3, ("D", "initial_state")),
    (16, 19, 4, 1, 16, ("z", "delta_bias", "delta_softplus")),
    (8, 11, 400, 2, 3, ("D", "delta_softplus", "initial_state")),
]


def case_inputs(seed, seq, dim, groups, state, kept, dtype=jnp.float32):
    rng, args, options = scan_inputs(seed, 2, seq, dim, groups, state, dtype=dtype)
    if "delta_softplus" not in kept:  # a step size >= 0, as softplus makes it: states decay
        args["delta"] = jnp.abs(args["delta"])
    return rng, args, {k: v for k, v in options.items() if k in kept}


def blocks(chunk_size):
    return ss.BlockSizes(chunk_size=chunk_size)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"chunk{c[0]}-seq{c[1]}-g{c[3]}")
def test_outputs_and_final_state_match_the_float64_recurrence(case):
    chunk_size, seq, dim, groups, state, kept = case
    _, args, options = case_inputs(seq, seq, dim, groups, state, kept)
    out, final = tpu_scan(**args, **options, block_sizes=blocks(chunk_size))
    want_out, want_final = numpy_of(args, options)
    assert out.shape == want_out.shape and final.shape == want_final.shape
    assert_close(out, want_out, 2e-5, "out")
    assert_close(final, want_final, 2e-5, "final state")


def test_bf16_inputs_match_the_float64_recurrence():
    kept = ("D", "z", "delta_bias", "delta_softplus")
    _, args, options = case_inputs(1, 29, 8, 2, 8, kept, dtype=jnp.bfloat16)
    out, final = tpu_scan(**args, **options, block_sizes=blocks(16))
    assert out.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    want_out, want_final = numpy_of(args, options)  # of the bf16-rounded inputs
    assert_close(out, want_out, 3e-2, "out")
    assert_close(final, want_final, 3e-2, "final state")


@pytest.mark.parametrize(
    "case", [CASES[0], CASES[1], CASES[4]], ids=["all-options-groups", "bare", "lane-blocks"]
)
def test_gradients_of_every_input_match_the_float64_reference(case):
    chunk_size, seq, dim, groups, state, kept = case
    rng, args, options = case_inputs(seq + 1, seq, dim, groups, state, kept)
    every = {**args, **options}
    names = [n for n in GRAD_NAMES if n in every]
    fixed = {k: v for k, v in every.items() if k not in names}
    values = [every[n] for n in names]
    ct = jnp.asarray(rng.standard_normal(args["u"].shape), jnp.float32)
    ct_final = jnp.asarray(rng.standard_normal((2, dim, state)), jnp.float32)
    got = grads(tpu_scan, values, names, dict(fixed, block_sizes=blocks(chunk_size)), ct, ct_final)

    def reference(**kw):
        return ss.selective_scan_reference(**kw, return_final_state=True)

    assert_grads_match_float64(got, reference, values, names, fixed, ct, ct_final)


def test_chunk_tile_and_channel_block():
    assert [selective_scan_tpu.chunk_tile(c) for c in (None, 1, 8, 9, 16, 100, 256, 1000)] == [
        128,
        8,
        8,
        16,
        16,
        128,
        256,
        256,
    ]
    # A group's channels padded to whole 128-lane blocks above 128; narrower groups are a block.
    widths = [selective_scan_tpu.group_width(w) for w in (2048, 200, 129, 128, 100, 16)]
    assert widths == [2048, 256, 256, 128, 100, 16]
    assert [selective_scan_tpu.channel_block(w) for w in widths] == [128, 128, 128, 128, 100, 16]


def _specs(dtype, batch=1, seq=300, dim=256, groups=1, state=16):
    spec = jax.ShapeDtypeStruct
    return (
        spec((batch, seq, dim), dtype),
        spec((batch, seq, dim), dtype),
        spec((dim, state), jnp.float32),
        spec((batch, seq, groups, state), dtype),
        spec((batch, seq, groups, state), dtype),
        spec((batch, dim, state), jnp.float32),
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("groups", [1, 4])
def test_forward_and_backward_lower_to_mosaic_for_tpu(dtype, groups):
    def forward_backward(u, delta, A, B, C, h0):
        def run(*a):
            return ss.selective_scan(
                *a[:5], initial_state=a[5], delta_softplus=True, return_final_state=True
            )

        out, vjp = jax.vjp(run, u, delta, A, B, C, h0)
        return out, vjp(out)

    text = lowered_for_tpu(forward_backward, _specs(dtype, groups=groups))
    assert "selective_scan_fwd_tpu" in text and "selective_scan_bwd_tpu" in text
    assert text.count("@tpu_custom_call(") == 2


def test_ops_auto_picks_the_mosaic_kernel_on_tpu_and_xla_on_cpu():
    def run(u, delta, A, B, C, h0):
        return scan_ops.selective_scan(u, delta, A, B, C, initial_state=h0, impl="auto")

    assert lowered_for_tpu(run, _specs(jnp.float32)).count("@tpu_custom_call(") == 1
    with target_platform("cpu"):
        text = jax.jit(run).trace(*_specs(jnp.float32)).lower().as_text()
    assert "tpu_custom_call" not in text
