"""The ahead-of-time checker's own logic, on the CPU backend (the GPU compiler needs the plugin
that only `make aot-check` installs)."""

import dataclasses
import importlib
import types

import jax
import jax.numpy as jnp
import pytest

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
    assert row["vmem_bytes"] is None  # no Mosaic kernel
    # An expected failure counts only with the expected error: a type error is not one.
    bad = ((4, 8), jnp.float32)
    refused = aot_check.Case("bad", "", lambda a: a @ a, (bad,), r"dot_general requires")
    assert aot_check.compile_case(refused, device)["as_expected"]
    wrong = aot_check.Case("bad", "", lambda a: a @ a, (bad,), aot_check.SHARED_MEMORY_ERROR)
    row = aot_check.compile_case(wrong, device)
    assert not row["compiled"] and not row["as_expected"]


def test_the_kernel_list_covers_every_kernel_forward_and_backward():
    cases = aot_check.kernel_cases(quick=True)
    kinds = {c.kernel for c in cases}
    for kernel in ("qk_sparse", "hash_sparse", "selective_scan", "ssd"):
        assert {f"{kernel} fwd", f"{kernel} fwd+bwd"} <= kinds
    assert [c.expect_error for c in cases].count(aot_check.SHARED_MEMORY_ERROR) == 1
    assert sum(bool(c.expect_error) for c in cases) == 1
    # On a TPU: every kernel's Mosaic version, and an oversized one that must run out of VMEM.
    tpu = aot_check.kernel_cases(quick=True, platform="tpu")
    assert {c.kernel.split()[0] for c in tpu} == set(aot_check.KERNEL_FAMILIES)
    for kernel in aot_check.KERNEL_FAMILIES:
        assert {f"{kernel} fwd", f"{kernel} fwd+bwd"} <= {c.kernel for c in tpu}
    assert [c.expect_error for c in tpu if c.expect_error] == [aot_check.VMEM_ERROR]


def test_the_vmem_of_a_mosaic_call_is_read_from_its_backend_config():
    call = (
        '%k = f32[8]{0} custom-call(%a), custom_call_target="tpu_custom_call", '
        'backend_config={"custom_call_config":{},"used_scoped_memory_configs":'
        '[{"memory_space":"1","offset":"0","size":"SIZE"}]}'
    )
    other = '%f = f32[8]{0} fusion(%a), backend_config={"used_scoped_memory_configs":' + (
        '[{"memory_space":"1","offset":"0","size":"99999999"}]}'
    )
    hlo = "\n".join([call.replace("SIZE", "4096"), other, call.replace("SIZE", "733184")])
    assert aot_check.mosaic_vmem_bytes(hlo) == 733184  # the larger kernel, not the fusion
    assert aot_check.mosaic_vmem_bytes(other) is None


def _memory(argument, output, alias, temp):
    return types.SimpleNamespace(
        argument_size_in_bytes=argument,
        output_size_in_bytes=output,
        alias_size_in_bytes=alias,
        temp_size_in_bytes=temp,
    )


def test_a_step_needs_its_arguments_outputs_less_the_donated_ones_and_its_temp():
    # 10 + 8 - 6 + 5 = 17 bytes against 75% of 20 = 15: two bytes short.
    row = aot_check.fit(_memory(10, 8, 6, 5), 20, 0.75)
    assert (row["need_bytes"], row["budget_bytes"]) == (17, 15)
    assert row["fits"] is False and row["headroom_bytes"] == -2
    row = aot_check.fit(_memory(10, 8, 6, 5), 20, 1.0)
    assert row["fits"] is True and row["headroom_bytes"] == 3


def test_roofline_of_a_hand_computed_step():
    # Per token: 6 x 1000 parameters + 12 x 1 layer x 100 positions x width 10 = 18,000 FLOPs;
    # 50 tokens: 900,000. Two devices at 1e5 FLOP/s: 4.5 s of compute (6 s with remat's extra
    # forward, 8/6 of it); 1e6 bytes at 1e5 B/s: 10 s, so the step is memory bound and the
    # devices could do 2e6 FLOPs in it: MFU at most 45%.
    # Causal: 6 x 1 layer x 101 x width 10 = 6,060 per token for the allowed pairs, so
    # (6,000 + 6,060) x 50 = 603,000.
    step = dict(matmul_params=1000, attention_layers=1, attention_width=10, seq_len=100, tokens=50)
    causal, _ = aot_check.step_flops(**step, remat=False, causal=True)
    assert causal == 603_000
    for remat, hardware, compute_s in ((False, 9e5, 4.5), (True, 1.2e6, 6.0)):
        model, hw = aot_check.step_flops(**step, remat=remat)
        assert model == 9e5 and hw == pytest.approx(hardware)
        bound = aot_check.roofline(
            model_flops=model,
            hardware_flops=hw,
            hbm_bytes_per_device=1e6,
            devices=2,
            peak_flops=1e5,
            memory_bandwidth=1e5,
        )
        assert bound["compute_seconds"] == pytest.approx(compute_s)
        assert bound["memory_seconds"] == 10.0 and bound["step_seconds"] == 10.0
        assert bound["bound"] == "memory" and bound["mfu_bound"] == pytest.approx(0.45)
    fast_memory = aot_check.roofline(
        model_flops=9e5,
        hardware_flops=1.2e6,
        hbm_bytes_per_device=1.0,
        devices=2,
        peak_flops=1e5,
        memory_bandwidth=1e5,
    )
    assert fast_memory["bound"] == "compute" and fast_memory["mfu_bound"] == pytest.approx(0.75)


def _tiny_config(**changes):
    config = importlib.import_module("configs.lm_tiny").get_config()
    config.batch_size, config.seq_len = 8, 16
    config.model.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
    config.model.num_kv_heads = 2
    return aot_check.apply_changes(config, changes)


def test_a_pod_row_on_the_cpu_backend_compiles_the_engines_train_step():
    config = _tiny_config(**{"mesh.data": 4, "mesh.fsdp": 2, "model.remat": True})
    row = aot_check.pod_row("h100", "tiny", config, "cpu", {}, devices=jax.devices())
    assert row["compiled"], row.get("error")
    assert row["devices"] == 8 and row["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1}
    assert row["kernel_calls"] == 0  # dense XLA attention: no Pallas kernel
    assert row["need_bytes"] == (
        row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"] + row["temp_bytes"]
    )
    assert row["fits"] and row["budget_bytes"] == int(0.75 * aot_check.GPUS["h100"].memory_bytes)
    # 259 byte ids x 32 for the embedding (tied: it is also the head, so it counts as a
    # matmul), 2 blocks of q/k/v/o (32x32 + 2 x 32x16 + 32x32), the MLP (3 x 32x64) and two
    # norms, and a final norm.
    block = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32
    assert row["params"] == 259 * 32 + 2 * block + 32
    per_token = 6 * row["params"] + 12 * 2 * 16 * 32
    assert row["tokens"] == 8 * 16 and row["model_flops"] == per_token * 8 * 16
    assert row["hardware_flops"] == pytest.approx(row["model_flops"] * 8 / 6)


def test_a_pod_row_carries_the_engines_refusal():
    config = _tiny_config(batch_size=6)  # 6 rows over 8 data devices
    row = aot_check.pod_row("v5p", "tiny", config, "cpu", {}, devices=jax.devices())
    assert row["compiled"] is False and "config.batch_size=6" in row["error"]


def test_the_report_says_what_did_not_fit_and_which_kernels_have_no_tpu_version():
    pod = dict(
        pod="p",
        topology="1x1x8",
        devices=8,
        mesh={"data": 1, "fsdp": 8, "tensor": 1},
        batch_size=8,
        seq_len=16,
        accum_steps=1,
        changes={},
        compiled=True,
        kernel_calls=0,
        seconds=1.0,
        params=10**9,
        tokens=128,
        model_flops=1e15,
        compute_seconds=1.0,
        memory_seconds=0.5,
        step_seconds=1.0,
        bound="compute",
        mfu_bound=0.75,
        **aot_check.fit(_memory(60e9, 0, 0, 10e9), 80e9, 0.75),
    )
    gpu = dict(chip=dataclasses.asdict(aot_check.GPUS["h100"]), kernels=[], pods=[pod])
    tpu = dict(
        chip=dataclasses.asdict(aot_check.TPUS["v5p"]),
        kernels=[
            dict(
                kernel="ssd fwd",
                detail="d",
                compiled=False,
                error="RESOURCE_EXHAUSTED: E1001: CompileTimeScopedVmemOom: x",
                seconds=1.0,
                expect_error=aot_check.VMEM_ERROR,
                as_expected=True,
            )
        ],
        pods=[],
    )
    results = dict(jax=jax.__version__, targets={"h100": gpu, "v5p": tpu})
    text = aot_check.report_of(results).markdown()
    assert (
        "| p | 1x1x8 (8 devices) | 1, 8, 1 | 8 x 16 (1) | yes | 0 | 60.0 | 10.0 | 70.0 | 60.0 |"
        in text
    )
    assert "**NO** (-10.0)" in text and "42.3% MFU on 128 A100s" in text
    assert "| ssd fwd | d | no: RESOURCE_EXHAUSTED: E1001: CompileTimeScopedVmemOom: x |" in text
    assert aot_check.unexpected(results) == [("h100", "p", "needs 70.0 GB per device")]


def test_every_pod_names_a_topology_per_target_and_its_config_loads():
    for pod in aot_check.PODS:
        assert "gpu" in pod.topologies
        if pod.name != "llama2_7b unrolled":
            assert set(pod.topologies) == {"gpu", *aot_check.TPUS}, pod.name
        config = aot_check.apply_changes(aot_check.load_config(pod.config), pod.changes)
        assert config.seq_len <= config.model.max_seq_len, pod.name
    with pytest.raises(ValueError, match="FILE.py or FILE.py:ARG of an existing file"):
        aot_check.load_config("configs/no_such.py")


def test_a_decode_row_reads_every_bf16_parameter_and_the_whole_cache_once():
    config = _tiny_config(**{"model.vocab_size": 259})  # the byte tokenizer's
    decode = aot_check.Decode("tiny decode", "configs/lm_tiny.py", batch=2, max_len=16)
    row = aot_check.decode_row("h200", decode, config, devices=jax.devices())
    assert row["compiled"], row.get("error")
    # 26,880 bfloat16 parameters (as in the train-step row above) and per layer a key and a
    # value cache of 2 rows x 16 slots x 2 kv heads x head_dim 8 in the compute dtype.
    itemsize = jnp.dtype(config.model.dtype).itemsize
    assert row["hbm_bytes"] == 26880 * 2 + 2 * 2 * (2 * 16 * 2 * 8) * itemsize
    assert row["step_seconds"] == pytest.approx(row["hbm_bytes"] / 4.8e12)
    assert row["tokens_per_second"] == pytest.approx(2 / row["step_seconds"])
    assert row["fits"] and row["argument_bytes"] >= row["hbm_bytes"]


def test_a_failed_compilation_keeps_the_errors_first_line():
    error = RuntimeError("RESOURCE_EXHAUSTED: Shared memory size limit exceeded\nstack trace")
    assert aot_check.failed(error, 20) == dict(compiled=False, error="RESOURCE_EXHAUSTED: ")
    assert aot_check.failed(ValueError(""), 400) == dict(compiled=False, error="ValueError")
    shapes = {"a": jax.ShapeDtypeStruct((3, 4), jnp.bfloat16), "b": jnp.zeros(5, jnp.float32)}
    assert aot_check.tree_bytes(shapes) == 3 * 4 * 2 + 5 * 4
