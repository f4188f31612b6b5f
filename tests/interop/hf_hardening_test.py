"""Hugging Face import/export against hostile or stale directories: stale weight files after a
re-export, a re-export interrupted at every step (old, none or new checkpoint, never a mix),
exported file modes, non-float and non-finite tensors, malformed config.json / index files,
index entries outside the checkpoint, and dtype arguments given as JAX/NumPy types."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import jaxlab.interop.hf as hf_module
from jaxlab.interop.hf import (
    CheckpointError,
    config_from_hf,
    load_hf_llama,
    read_hf_llama,
    save_hf_llama,
)
from tests.hf_utils import hf_logits, make_hf_model

ATOL = 1e-4
TOKENS = np.random.default_rng(0).integers(0, 97, (2, 12))
SHARD_BYTES = 40_000  # the tiny gqa_untied model in several files


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two tiny Llamas of one architecture and different weights, each loaded into jaxlab."""
    out = []
    for seed in (3, 4):
        hf_model = make_hf_model("gqa_untied", seed=seed)
        path = str(tmp_path_factory.mktemp(f"seed{seed}"))
        hf_model.save_pretrained(path)
        out.append((hf_model, load_hf_llama(path)))
    return out


def _ours(path):
    return np.asarray(load_hf_llama(str(path))(jnp.asarray(TOKENS)))


def _transformers(path):
    return hf_logits(transformers.LlamaForCausalLM.from_pretrained(str(path)).eval(), TOKENS)


def _weight_files(path):
    return sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".index.json")))


# --------------------------------------------------------------------------------------------
# 2. A re-export leaves exactly the new checkpoint.


def test_single_file_save_over_sharded_export_loads_the_new_weights(two_models, tmp_path):
    (_, old), (new_hf, new) = two_models
    save_hf_llama(old, str(tmp_path), max_shard_bytes=SHARD_BYTES)
    assert len(_weight_files(tmp_path)) > 2
    (tmp_path / "tokenizer.json").write_text("{}")  # not ours: kept
    (tmp_path / "notes.safetensors").write_bytes(b"x")  # not listed by the index: kept
    save_hf_llama(new, str(tmp_path))
    assert _weight_files(tmp_path) == ["model.safetensors", "notes.safetensors"]
    assert (tmp_path / "tokenizer.json").exists()
    ref = hf_logits(new_hf, TOKENS)
    np.testing.assert_allclose(_ours(tmp_path), ref, atol=ATOL)
    np.testing.assert_allclose(_transformers(tmp_path), ref, atol=1e-6)


def test_sharded_save_over_single_file_loads_the_new_weights(two_models, tmp_path):
    (_, old), (new_hf, new) = two_models
    save_hf_llama(old, str(tmp_path))
    save_hf_llama(new, str(tmp_path), max_shard_bytes=SHARD_BYTES)
    assert "model.safetensors" not in _weight_files(tmp_path)  # transformers would prefer it
    ref = hf_logits(new_hf, TOKENS)
    np.testing.assert_allclose(_ours(tmp_path), ref, atol=ATOL)
    np.testing.assert_allclose(_transformers(tmp_path), ref, atol=1e-6)


def test_fewer_shards_remove_the_old_shards(two_models, tmp_path):
    (_, old), (new_hf, new) = two_models
    save_hf_llama(old, str(tmp_path), max_shard_bytes=SHARD_BYTES // 2)
    before = _weight_files(tmp_path)
    save_hf_llama(new, str(tmp_path), max_shard_bytes=SHARD_BYTES)
    after = _weight_files(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted({*index["weight_map"].values(), "model.safetensors.index.json"}) == after
    assert len(after) < len(before)
    np.testing.assert_allclose(_ours(tmp_path), hf_logits(new_hf, TOKENS), atol=ATOL)


def test_stale_index_entries_outside_the_directory_are_never_removed(two_models, tmp_path):
    (_, old), (_, new) = two_models
    ckpt = tmp_path / "ckpt"
    save_hf_llama(old, str(ckpt), max_shard_bytes=SHARD_BYTES)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"keep me")
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "../outside.safetensors"
    index["weight_map"]["lm_head.weight"] = str(outside)
    index_path.write_text(json.dumps(index))
    save_hf_llama(new, str(ckpt))
    assert outside.read_bytes() == b"keep me"
    assert _weight_files(ckpt) == ["model.safetensors"]


def test_single_file_wins_over_an_index_as_in_transformers(two_models, tmp_path):
    """A directory another tool left with both: we load what transformers loads."""
    (old_hf, old), (new_hf, new) = two_models
    save_hf_llama(old, str(tmp_path), max_shard_bytes=SHARD_BYTES)
    single = tmp_path / "single"
    save_hf_llama(new, str(single))
    os.replace(single / "model.safetensors", tmp_path / "model.safetensors")
    np.testing.assert_allclose(_ours(tmp_path), _transformers(tmp_path), atol=ATOL)
    np.testing.assert_allclose(_ours(tmp_path), hf_logits(new_hf, TOKENS), atol=ATOL)


# --------------------------------------------------------------------------------------------
# 7. Bad weights and configs are refused.


@pytest.fixture
def checkpoint(tmp_path):
    make_hf_model("gqa_untied").save_pretrained(str(tmp_path))
    return tmp_path


def _edit_tensor(path, key, change):
    tensors = load_file(str(path / "model.safetensors"))
    tensors[key] = change(tensors[key])
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "change, code",
    [
        (lambda t: (t * 100).to(torch.int64), "I64"),
        (lambda t: (t * 100).to(torch.int32), "I32"),
        (lambda t: t > 0, "BOOL"),
        (lambda t: (t * 100).to(torch.int8), "I8"),
    ],
)
def test_integer_and_bool_tensors_are_refused(checkpoint, change, code):
    key = "model.layers.1.mlp.up_proj.weight"
    _edit_tensor(checkpoint, key, change)
    message = rf"model\.safetensors: tensor {key} has dtype {code}"
    with pytest.raises(CheckpointError, match=message):
        load_hf_llama(str(checkpoint))
    with pytest.raises(CheckpointError, match=code):
        read_hf_llama(str(checkpoint))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_tensors_are_refused(checkpoint, bad):
    key = "model.layers.0.self_attn.k_proj.weight"

    def poison(t):
        t = t.clone()
        t[3, 5] = bad
        return t

    _edit_tensor(checkpoint, key, poison)
    with pytest.raises(CheckpointError, match=rf"tensor {key} has 1 non-finite values"):
        load_hf_llama(str(checkpoint))


def test_overflow_into_a_narrow_dtype_is_refused(checkpoint):
    key = "model.norm.weight"
    _edit_tensor(checkpoint, key, lambda t: t * 1e6)  # finite in float32, inf in float16
    with pytest.raises(CheckpointError, match=rf"tensor {key} \(F32\) overflows float16"):
        load_hf_llama(str(checkpoint), dtype="float16")
    assert load_hf_llama(str(checkpoint)).final_norm.scale[...].dtype == jnp.float32


@pytest.mark.parametrize("theta", [0, 0.0, -10000.0, float("inf")])
def test_rope_theta_must_be_positive(checkpoint, theta):
    _edit_config(checkpoint, rope_parameters={"rope_type": "default", "rope_theta": theta})
    with pytest.raises(
        CheckpointError,
        match=r"config\.json: rope_parameters\.rope_theta must "
        r"be a finite number > 0",
    ):
        load_hf_llama(str(checkpoint))


def test_legacy_rope_theta_must_be_positive(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    del config["rope_parameters"]
    config["rope_theta"] = -1.0
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"config\.json: rope_theta must be .* found "
        r"float -1\.0",
    ):
        load_hf_llama(str(checkpoint))
    with pytest.raises(CheckpointError, match="rope_theta"):
        config_from_hf(config)


def _shard(path, max_shard_bytes=SHARD_BYTES):
    save_hf_llama(load_hf_llama(str(path)), str(path), max_shard_bytes=max_shard_bytes)
    return path / "model.safetensors.index.json"


@pytest.mark.parametrize("where", ["absolute", "parent", "nested parent", "backslash parent"])
def test_index_entries_outside_the_directory_are_refused(checkpoint, tmp_path_factory, where):
    index_path = _shard(checkpoint)
    index = json.loads(index_path.read_text())
    key = "model.norm.weight"
    outside = tmp_path_factory.mktemp("elsewhere")
    name = index["weight_map"][key]
    os.replace(checkpoint / name, outside / name)  # a real, loadable file outside
    target = {
        "absolute": str(outside / name),
        "parent": f"../{outside.name}/{name}",
        "nested parent": f"sub/../../{outside.name}/{name}",
        "backslash parent": f"..\\{outside.name}\\{name}",
    }[where]
    for k, v in index["weight_map"].items():
        if v == name:
            index["weight_map"][k] = target
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError,
        match=r"index\.json: weight_map\['.*'\] = .* points "
        "outside the checkpoint directory",
    ):
        load_hf_llama(str(checkpoint))


def test_sharded_checkpoint_through_a_symlinked_directory_loads(checkpoint, tmp_path_factory):
    """Entries stay relative; the files themselves may be symlinks (the Hugging Face cache)."""
    index = json.loads(_shard(checkpoint).read_text())
    blobs = tmp_path_factory.mktemp("blobs")
    for name in set(index["weight_map"].values()):
        os.replace(checkpoint / name, blobs / name)
        os.symlink(blobs / name, checkpoint / name)
    load_hf_llama(str(checkpoint))


# --------------------------------------------------------------------------------------------
# 8. Malformed files are named with the file and field.


def test_config_that_is_not_json(checkpoint):
    (checkpoint / "config.json").write_text('{"model_type": "llama",\n "vocab_size": 97,,}')
    path = str(checkpoint / "config.json")
    with pytest.raises(
        CheckpointError,
        match=rf"{path}: expected a JSON object.*invalid JSON at "
        r"line 2 column",
    ):
        load_hf_llama(str(checkpoint))


def test_config_that_is_not_utf8(checkpoint):
    (checkpoint / "config.json").write_bytes(b'{"model_type": "\xff"}')
    with pytest.raises(CheckpointError, match=r"config\.json: .*invalid UTF-8 at byte 16"):
        load_hf_llama(str(checkpoint))


@pytest.mark.parametrize("value, found", [([], "list"), ("llama", "str"), (3, "int")])
def test_config_that_is_not_an_object(checkpoint, value, found):
    (checkpoint / "config.json").write_text(json.dumps(value))
    path = str(checkpoint / "config.json")
    with pytest.raises(CheckpointError, match=rf"{path}: expected a JSON object, found {found}"):
        load_hf_llama(str(checkpoint))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(rope_scaling="linear"), "rope_scaling must be an object or null, found str 'linear'"),
        (dict(rope_scaling=["linear", 2.0]), r"rope_scaling must be an object or null, found list"),
        (dict(rope_parameters="default"), "rope_parameters must be an object or null, found str"),
        (
            dict(rope_parameters={"rope_type": "default", "rope_theta": "abc"}),
            "rope_parameters.rope_theta must be a finite number > 0, found str 'abc'",
        ),
        (
            dict(rope_parameters=None, rope_theta="abc"),
            "rope_theta must be a finite number > 0, found str 'abc'",
        ),
        (
            dict(rope_parameters={"rope_type": "default", "rope_theta": True}),
            "rope_theta must be a finite number > 0, found bool True",
        ),
        (dict(vocab_size="97"), "vocab_size must be an int >= 1, found str '97'"),
        (dict(hidden_size=64.0), "hidden_size must be an int >= 1, found float 64.0"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be an int >= 1, found int 0"),
        (dict(rms_norm_eps=-1e-5), "rms_norm_eps must be a finite number > 0"),
        (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false"),
        (dict(eos_token_id=[1, "2"]), "eos_token_id must be a non-negative int"),
        (dict(num_key_value_heads=3), "num_heads=4 must be a multiple of num_kv_heads=3"),
    ],
)
def test_bad_config_fields_are_named_with_the_file(checkpoint, changes, message):
    _edit_config(checkpoint, **changes)
    path = str(checkpoint / "config.json")
    with pytest.raises(CheckpointError, match=rf"^{path}: .*") as info:
        load_hf_llama(str(checkpoint))
    assert message in str(info.value)


def test_missing_required_field_is_named(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    del config["hidden_size"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: required field 'hidden_size'"):
        load_hf_llama(str(checkpoint))


@pytest.mark.parametrize(
    "contents, message",
    [
        ('{"weight_map": {', r"expected a JSON object with a \"weight_map\".*invalid JSON"),
        ('{"metadata": {}}', r"expected a JSON object with a \"weight_map\".*found no weight_map"),
        ("[1, 2]", r"expected a JSON object with a \"weight_map\".*found list"),
        ('{"weight_map": ["a"]}', "weight_map must be an object .* found list"),
        (
            '{"weight_map": {"model.norm.weight": 3}}',
            r"weight_map\['model.norm.weight'\] must be a file name, found int 3",
        ),
        (
            '{"weight_map": {"model.norm.weight": "weights.bin"}}',
            r"weight_map\['model.norm.weight'\] = 'weights.bin' is not a .safetensors file",
        ),
    ],
)
def test_malformed_index_is_named(checkpoint, contents, message):
    index_path = _shard(checkpoint)
    index_path.write_text(contents)
    with pytest.raises(CheckpointError, match=rf"{index_path}: {message}"):
        load_hf_llama(str(checkpoint))


# --------------------------------------------------------------------------------------------
# 11. dtype arguments take what jnp.dtype takes.


def _params(path, **kwargs):
    config, pure = read_hf_llama(str(path), **kwargs)
    return config, jax.tree.leaves(pure)


def test_load_and_read_take_jnp_and_numpy_dtypes(checkpoint):
    ref_config, ref = _params(checkpoint, dtype="float32")
    for dtype in (jnp.float32, np.float32, np.dtype("float32")):
        config, leaves = _params(checkpoint, dtype=dtype)
        assert config == ref_config
        for a, b in zip(leaves, ref, strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    ref_model = load_hf_llama(str(checkpoint), dtype="bfloat16", compute_dtype="float32")
    ref_logits = np.asarray(ref_model(jnp.asarray(TOKENS)))
    for dtype, compute in ((jnp.bfloat16, jnp.float32), (np.dtype(jnp.bfloat16), np.float32)):
        model = load_hf_llama(str(checkpoint), dtype=dtype, compute_dtype=compute)
        assert model.config == ref_model.config
        assert model.config.param_dtype == "bfloat16" and model.config.dtype == "float32"
        np.testing.assert_array_equal(np.asarray(model(jnp.asarray(TOKENS))), ref_logits)


@pytest.mark.parametrize("argument", ["dtype", "compute_dtype"])
@pytest.mark.parametrize("bad", [jnp.int32, np.float64, "float64", "abc"])
def test_unsupported_load_dtypes_are_named(checkpoint, argument, bad):
    with pytest.raises(
        ValueError,
        match=rf"load_hf_llama/read_hf_llama: {argument} must be one "
        r"of \('float32', 'bfloat16', 'float16'\)",
    ):
        load_hf_llama(str(checkpoint), **{argument: bad})


def test_save_takes_jnp_and_numpy_dtypes(two_models, tmp_path):
    (_, model), _ = two_models
    outputs = {}
    for i, dtype in enumerate(("bfloat16", jnp.bfloat16, np.dtype(jnp.bfloat16))):
        save_hf_llama(model, str(tmp_path / str(i)), dtype=dtype)
        outputs[i] = (tmp_path / str(i) / "model.safetensors").read_bytes()
        config = json.loads((tmp_path / str(i) / "config.json").read_text())
        assert config["dtype"] == "bfloat16"
    assert outputs[0] == outputs[1] == outputs[2]
    for i, dtype in enumerate(("float32", jnp.float32, np.float32)):
        save_hf_llama(model, str(tmp_path / f"f{i}"), dtype=dtype)
        outputs[f"f{i}"] = (tmp_path / f"f{i}" / "model.safetensors").read_bytes()
    assert outputs["f0"] == outputs["f1"] == outputs["f2"]
    with pytest.raises(
        ValueError,
        match=r"save_hf_llama: dtype must be one of .* got <class "
        r"'jax.numpy.int32'> \(int32\)",
    ):
        save_hf_llama(model, str(tmp_path / "bad"), dtype=jnp.int32)
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------------------------
# An interrupted re-export leaves the old checkpoint, none, or the new one: never a mix.


class _Interrupted(BaseException):
    """Stands for Ctrl-C / a killed process part way through a save."""


@pytest.fixture(scope="module")
def old_and_new(two_models, tmp_path_factory):
    """The two models, the new one with another config (rope_theta) as well as other weights,
    and the reference (config, params, transformers logits) of each checkpoint."""
    (_, old), (_, new) = two_models
    refs = []
    for name, model, theta in (("old", old, None), ("new", new, 12345.0)):
        path = tmp_path_factory.mktemp(f"reference_{name}")
        save_hf_llama(model, str(path))
        if theta is not None:
            config = json.loads((path / "config.json").read_text())
            config["rope_theta"] = config["rope_parameters"]["rope_theta"] = theta
            (path / "config.json").write_text(json.dumps(config))
            model = load_hf_llama(str(path))
        config, pure = read_hf_llama(str(path))
        refs.append((model, (config, jax.tree.leaves(pure), _transformers(path))))
    assert refs[0][1][0] != refs[1][1][0]  # the configs differ, not only the weights
    return refs


def _what_loads(path, old_ref, new_ref):
    """'old', 'new' or 'none' for both loaders; fails on anything else (a mix)."""
    try:
        config, pure = read_hf_llama(str(path))
    except CheckpointError:
        ours = "none"
    else:
        leaves = jax.tree.leaves(pure)
        matches = [
            name
            for name, (ref_config, ref_leaves, _) in (("old", old_ref), ("new", new_ref))
            if config == ref_config
            and all(np.array_equal(a, b) for a, b in zip(leaves, ref_leaves, strict=True))
        ]
        assert len(matches) == 1, "load_hf_llama returned neither the old nor the new checkpoint"
        ours = matches[0]
    try:
        logits = _transformers(path)
    except (OSError, ValueError):
        theirs = "none"
    else:
        matches = [
            name
            for name, (_, _, ref_logits) in (("old", old_ref), ("new", new_ref))
            if np.allclose(logits, ref_logits, atol=1e-6)
        ]
        assert len(matches) == 1, "transformers loaded neither the old nor the new checkpoint"
        theirs = matches[0]
    assert ours == theirs, (ours, theirs)
    return ours


def _interrupt_at(monkeypatch, step):
    """Makes the next save stop before its ``step``-th file operation (a write or a removal),
    leaving a half-written temporary file when it stops in a write as a killed process would.
    Returns the list of operations done, so a save without a crash counts them."""
    done = []
    real_write, real_remove = hf_module._atomic_write, hf_module._remove

    def write(directory, name, contents):
        if len(done) == step:
            with open(os.path.join(directory, f".{name}.killed.tmp"), "wb") as f:
                f.write(b"partial")
            raise _Interrupted
        done.append(("write", name))
        real_write(directory, name, contents)

    def remove(directory, name):
        if len(done) == step:
            raise _Interrupted
        done.append(("remove", name))
        real_remove(directory, name)

    monkeypatch.setattr(hf_module, "_atomic_write", write)
    monkeypatch.setattr(hf_module, "_remove", remove)
    return done


@pytest.mark.parametrize(
    "old_shard, new_shard",
    [
        (SHARD_BYTES, SHARD_BYTES),  # same sharding: shards replaced one by one
        (None, SHARD_BYTES),  # single file -> sharded
        (SHARD_BYTES, None),  # sharded -> single file
        (SHARD_BYTES // 2, SHARD_BYTES),  # more shards -> fewer
        (None, None),  # single file -> single file
    ],
    ids=["same-sharding", "single-to-sharded", "sharded-to-single", "fewer-shards", "single"],
)
def test_interrupted_save_never_leaves_a_mix(
    old_and_new, tmp_path, monkeypatch, old_shard, new_shard
):
    (old, old_ref), (new, new_ref) = old_and_new
    old_kwargs = {} if old_shard is None else {"max_shard_bytes": old_shard}
    new_kwargs = {} if new_shard is None else {"max_shard_bytes": new_shard}

    def fresh(name):
        path = tmp_path / name
        save_hf_llama(old, str(path), **old_kwargs)
        (path / "tokenizer.json").write_text("{}")
        assert _what_loads(path, old_ref, new_ref) == "old"
        return path

    full = fresh("full")
    with monkeypatch.context() as m:  # count the steps of an uninterrupted save
        steps = _interrupt_at(m, -1)
        save_hf_llama(new, str(full), **new_kwargs)
    if old_shard is not None and new_shard is not None:
        assert sum(kind == "write" for kind, _ in steps) > 3  # several shards
    seen = []
    for k in range(len(steps) + 1):
        path = fresh(f"crash{k}")
        with monkeypatch.context() as m:
            _interrupt_at(m, k)
            if k < len(steps):
                with pytest.raises(_Interrupted):
                    save_hf_llama(new, str(path), **new_kwargs)
            else:
                save_hf_llama(new, str(path), **new_kwargs)
        seen.append(_what_loads(path, old_ref, new_ref))
        assert (path / "tokenizer.json").read_text() == "{}"
        save_hf_llama(new, str(path), **new_kwargs)  # saving again recovers
        assert _what_loads(path, old_ref, new_ref) == "new"
        assert _weight_files(path) == _weight_files(full)
    # old until the first removal, none in between, new from the commit point on
    assert seen[0] == "old" and seen[-1] == "new", seen
    first_new = seen.index("new")
    assert set(seen[1:first_new]) <= {"none"} and set(seen[first_new:]) == {"new"}, seen


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
@pytest.mark.parametrize("max_shard_bytes", [None, SHARD_BYTES])
def test_exported_files_get_the_umask_mode(two_models, tmp_path, umask, max_shard_bytes):
    (_, model), _ = two_models
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    previous = os.umask(umask)
    try:
        save_hf_llama(model, str(tmp_path), **kwargs)
        save_hf_llama(model, str(tmp_path), **kwargs)  # over an existing checkpoint as well
    finally:
        os.umask(previous)
    names = os.listdir(tmp_path)
    assert "config.json" in names and len(names) >= 2
    for name in names:
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name


def test_a_sparse_attention_model_is_not_exported_as_a_dense_llama():
    from jaxlab.interop.hf import check_hf_exportable
    from jaxlab.models import TransformerConfig

    config = TransformerConfig(
        vocab_size=16,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        sparse_attention=dict(kind="hash", num_buckets=2),
    )
    with pytest.raises(CheckpointError, match="sparse attention"):
        check_hf_exportable(config)
