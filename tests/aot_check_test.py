"""The ahead-of-time checker's own logic, on the CPU backend (the GPU compiler needs the plugin
that only `make aot-check` installs)."""

import jax
import jax.numpy as jnp

from experiments import aot_check


def test_the_target_proto_carries_the_cards_facts():
    text = aot_check.gpu_target_config(aot_check.GPUS["h100"])
    assert "core_count: 132" in text and "major: 9 minor: 0" in text
    assert f"device_memory_size: {81559 * 2**20}" in text
    assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in text
    assert "device_memory_size: 150754820096" in aot_check.gpu_target_config(aot_check.GPUS["h200"])


def test_a_row_records_memory_when_it_compiles_and_the_error_when_it_does_not():
    device = jax.devices()[0]
    ok = aot_check.Case("matmul", "4x4", lambda a, b: a @ b, (((4, 8), jnp.float32),) * 2)
    row = aot_check.compile_case(ok, device)  # (4, 8) @ (4, 8) does not type-check
    assert row["compiled"] is False and "dot_general" in row["error"] and not row["as_expected"]
    good = aot_check.Case("matmul", "4x8", lambda a, b: a @ b.T, (((4, 8), jnp.float32),) * 2)
    row = aot_check.compile_case(good, device)
    assert row["compiled"] and row["as_expected"] and row["argument_bytes"] == 2 * 4 * 8 * 4
    refused = aot_check.Case("bad", "", lambda a: a @ a, (((4, 8), jnp.float32),), True)
    assert aot_check.compile_case(refused, device)["as_expected"]


def test_the_kernel_list_covers_every_kernel_forward_and_backward():
    cases = aot_check.kernel_cases(quick=True)
    kinds = {c.kernel for c in cases}
    for kernel in ("qk_sparse", "hash_sparse", "selective_scan", "ssd"):
        assert {f"{kernel} fwd", f"{kernel} fwd+bwd"} <= kinds
    assert [c.expect_failure for c in cases].count(True) == 1
