"""The kernel contract: one keyword per idea across the kernels and ``jaxlab.ops``, a
``BlockSizes.get_default`` in every kernel module, jitted entry points, and a TPU message that
names an ``ops`` call that exists."""

import dataclasses
import functools
import inspect
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import ops
from jaxlab.ops import scan as scan_ops
from jaxlab.ops import sparse_attention as sparse_ops
from jaxlab.registry import Registry
from kernels_pallas import _common as common
from kernels_pallas import selective_scan as mamba1_kernels
from kernels_pallas import sparse_attention as sparse_kernels
from kernels_pallas import ssd as ssd_kernels
from tests.kernels_pallas.tpu_testing import V5E

KERNEL_MODULES = [mamba1_kernels, ssd_kernels, sparse_kernels]
# (kernel entry point, the ops function that dispatches to it)
PAIRS = [
    (mamba1_kernels.selective_scan, scan_ops.selective_scan),
    (ssd_kernels.ssd, scan_ops.ssd),
    (sparse_kernels.qk_sparse_attention, sparse_ops.qk_sparse_attention),
    (sparse_kernels.hash_sparse_attention, sparse_ops.hash_sparse_attention),
]
SCANS = [mamba1_kernels.selective_scan, ssd_kernels.ssd, scan_ops.selective_scan, scan_ops.ssd]
ATTENTIONS = [
    sparse_kernels.qk_sparse_attention,
    sparse_kernels.hash_sparse_attention,
    sparse_kernels.masked_attention_reference,
    sparse_ops.qk_sparse_attention,
    sparse_ops.hash_sparse_attention,
    sparse_ops.masked_attention,
    ops.attention,
]
# Old spellings of a shared idea, and where the idea lives now.
RETIRED = {
    "chunk": "chunk_size",
    "sm_scale": "scale",
    "num_warps": "block_sizes",
}


def params(fn):
    return inspect.signature(fn).parameters


def keyword_only(fn):
    return {n for n, p in params(fn).items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def name_of(fn):
    return f"{fn.__module__}.{fn.__name__}"


@pytest.mark.parametrize("kernel,op", PAIRS, ids=lambda fn: name_of(fn))
def test_ops_take_the_kernels_keywords_under_the_same_names(kernel, op):
    # Every keyword of a kernel is one of its ops function (return_final_state is the kernels'
    # own: the ops always return the state).
    missing = keyword_only(kernel) - keyword_only(op) - {"return_final_state"}
    assert not missing, f"{name_of(op)} lacks {sorted(missing)} of {name_of(kernel)}"
    for fn in (kernel, op):
        assert {"block_sizes", "interpret"} <= keyword_only(fn), name_of(fn)
    assert "impl" in keyword_only(op)
    assert "return_final_state" not in params(op), f"{name_of(op)}: the return type is fixed"


@pytest.mark.parametrize("fn", SCANS, ids=name_of)
def test_scans_share_chunk_size_and_initial_state(fn):
    assert {"initial_state"} <= keyword_only(fn)
    if fn is not mamba1_kernels.selective_scan:  # its chunk is a tile: BlockSizes.chunk_size
        assert "chunk_size" in keyword_only(fn)
    assert "chunk_size" in {f.name for f in dataclasses.fields(mamba1_kernels.BlockSizes)}


@pytest.mark.parametrize("fn", ATTENTIONS, ids=name_of)
def test_attentions_share_scale(fn):
    assert "scale" in params(fn)


@pytest.mark.parametrize("fn", [f for pair in PAIRS for f in pair] + ATTENTIONS, ids=name_of)
def test_retired_keyword_names_are_gone(fn):
    for old, new in RETIRED.items():
        assert old not in params(fn), f"{name_of(fn)} still takes {old!r}; it is {new!r} now"


@pytest.mark.parametrize("module", KERNEL_MODULES, ids=lambda m: m.__name__)
def test_every_kernel_module_has_block_sizes_with_get_default(module):
    cls = module.BlockSizes
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen  # hashable: static
    assert isinstance(inspect.getattr_static(cls, "get_default"), (classmethod, staticmethod))
    shape = {name: 64 for name in params(cls.get_default)}  # e.g. head_dim, state
    default = cls.get_default(**shape)
    assert isinstance(default, cls)
    hash(default)


def test_scan_kernels_are_jitted_entry_points():
    for fn in (mamba1_kernels.selective_scan, ssd_kernels.ssd):
        assert hasattr(fn, "lower") and hasattr(fn, "trace"), name_of(fn)
    # The sparse kernels validate concrete ids eagerly (jit would hide them), then enter jit.
    for fn in (sparse_kernels._qk_sparse, sparse_kernels._hash_sparse):
        assert hasattr(fn, "lower"), fn.__name__


def _scan_args(seq):
    rng = np.random.default_rng(seq)
    u = jnp.asarray(rng.standard_normal((1, seq, 4)), jnp.float32)
    delta = jnp.asarray(rng.random((1, seq, 4)), jnp.float32)
    A = -jnp.asarray(rng.random((4, 3)), jnp.float32)
    B = jnp.asarray(rng.standard_normal((1, seq, 1, 3)), jnp.float32)
    return u, delta, A, B, B


def _ssd_args(seq):
    rng = np.random.default_rng(seq)
    x = jnp.asarray(rng.standard_normal((1, seq, 2, 4)), jnp.float32)
    dt = jnp.asarray(rng.random((1, seq, 2)), jnp.float32)
    A = -jnp.asarray(rng.random((2,)), jnp.float32)
    B = jnp.asarray(rng.standard_normal((1, seq, 1, 3)), jnp.float32)
    return x, dt, A, B, B


def _sparse_args(seq):
    rng = np.random.default_rng(seq)
    q = jnp.asarray(rng.standard_normal((1, seq, 2, 16)), jnp.float32)
    buckets = jnp.asarray(rng.integers(0, 2, (1, seq, 2)), jnp.int32)
    return q, q, q, buckets, buckets


# Odd lengths no other test uses, so that no jit cache skips the trace for the TPU.
@pytest.mark.parametrize(
    "kernel,args",
    [
        (ssd_kernels.ssd, _ssd_args(19)),
        (mamba1_kernels.selective_scan, _scan_args(21)),
        (sparse_kernels.hash_sparse_attention, _sparse_args(17)),
    ],
    ids=["ssd", "selective_scan", "hash_sparse_attention"],
)
def test_every_kernel_lowers_to_mosaic_when_traced_for_tpu(kernel, args):
    with common.target_platform("tpu"), jax.sharding.use_abstract_mesh(V5E):
        traced = jax.jit(functools.partial(kernel, interpret=False)).trace(*args)
        text = traced.lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" in text.as_text()


def test_ssd_block_sizes_default_warps_follow_the_padded_state_tile():
    # 64 x 64 = 4096 elements: 8 warps; 64 x 16, and 8 x 8 padded to 16 x 16: 4 warps.
    assert ssd_kernels.BlockSizes.get_default(head_dim=64, state=64).num_warps == 8
    assert ssd_kernels.BlockSizes.get_default(head_dim=64, state=16).num_warps == 4
    assert ssd_kernels.BlockSizes.get_default(head_dim=8, state=8).num_warps == 4
    assert ssd_kernels.BlockSizes.get_default(head_dim=50, state=33).num_warps == 8  # 64 x 64
    with pytest.raises(ValueError, match="num_warps must be a power of two, got 3"):
        ssd_kernels.BlockSizes(num_warps=3)


def test_sparse_block_sizes_default_warps_follow_head_dim():
    assert sparse_kernels.BlockSizes.get_default(head_dim=64).num_warps == 4
    assert sparse_kernels.BlockSizes.get_default(head_dim=128).num_warps == 8
    assert (
        sparse_kernels.BlockSizes.get_default(head_dim=64).block_q
        == sparse_kernels.BlockSizes().block_q
    )


def test_shared_pieces_live_in_one_place():
    for name in ("prepare_delta", "finish_output"):
        assert getattr(mamba1_kernels, name) is getattr(ssd_kernels, name) is getattr(common, name)
    # The platform guard is common.resolve_interpret; no kernel file asks for the backend itself.
    for path in pathlib.Path(common.__file__).parent.rglob("*.py"):
        if path.name != "_common.py":
            assert "default_backend" not in path.read_text(), path


TABLES = [
    ("ATTENTION_IMPLS", ops.attention),
    ("SELECTIVE_SCAN_IMPLS", scan_ops.selective_scan),
    ("SSD_IMPLS", scan_ops.ssd),
    ("QK_SPARSE_IMPLS", sparse_ops.qk_sparse_attention),
    ("HASH_SPARSE_IMPLS", sparse_ops.hash_sparse_attention),
]


@pytest.mark.parametrize("table,fn", TABLES, ids=lambda x: x if isinstance(x, str) else "")
def test_ops_choose_implementations_from_a_registry(table, fn):
    registry = getattr(sys.modules[fn.__module__], table)
    assert isinstance(registry, Registry)
    assert params(fn)["impl"].default in registry


def test_a_registered_attention_impl_is_dispatched_to_and_not_overwritten(monkeypatch):
    registry = sys.modules[ops.attention.__module__].ATTENTION_IMPLS
    monkeypatch.setattr(registry, "_entries", dict(registry._entries))  # restored after the test
    calls = []

    def probe(q, k, v, **kw):
        calls.append(sorted(kw))
        return q

    ops.register_attention_impl("contract_probe", probe)
    assert "contract_probe" in ops.available_impls()
    q = jnp.ones((1, 3, 2, 4))
    assert ops.attention(q, q, q, impl="contract_probe") is q
    assert "scale" in calls[0] and "q_positions" in calls[0]
    with pytest.raises(ValueError, match="'contract_probe' is already registered"):
        ops.register_attention_impl("contract_probe", probe)
    ops.register_attention_impl("contract_probe", ops.attention, replace=True)


def test_target_platform_decides_what_the_kernels_are_traced_for():
    backend = jax.default_backend()
    assert common.platform() == backend  # outside a target_platform block: this process's
    with common.target_platform("cpu"):
        assert common.resolve_interpret(None)  # emulated on the CPU
        assert not common.resolve_interpret(False)
    with common.target_platform("gpu"):
        assert common.platform() == "gpu"
        assert not common.resolve_interpret(None)  # compiled for the GPU target
        with common.target_platform("tpu"):
            assert common.platform() == "tpu"
            assert not common.resolve_interpret(None)  # compiled for the TPU target
            assert common.resolve_interpret(True)  # TPU interpret mode, as the tests run it
        assert common.platform() == "gpu"
    assert common.platform() == backend
    with pytest.raises(ValueError, match="name must be one of .* got 'cuda'"):
        with common.target_platform("cuda"):
            pass


def test_a_trace_for_one_platform_is_not_reused_for_another():
    # The scan kernels decide interpret mode inside jit, which does not key its trace cache on
    # the target platform: a CPU trace (interpret) must not stand in for a GPU one.
    rng = np.random.default_rng(0)
    u, delta = (jnp.asarray(rng.uniform(size=(1, 16, 16)), jnp.float32) for _ in range(2))
    A = -jnp.ones((16, 16))
    B = jnp.asarray(rng.normal(size=(1, 16, 1, 16)), jnp.float32)
    args = (u, delta, A, B, B)

    def interpret_modes():
        return set(
            re.findall(r"interpret=(\w+)", str(mamba1_kernels.selective_scan.trace(*args).jaxpr))
        )

    with common.target_platform("cpu"):
        mamba1_kernels.selective_scan(*args)  # traced and cached for the CPU
        assert interpret_modes() == {"True"}
    with common.target_platform("gpu"):
        assert interpret_modes() == {"False"}
    with common.target_platform("cpu"):
        assert interpret_modes() == {"True"}
