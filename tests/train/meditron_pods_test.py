"""The MEDITRON 7B/70B configs: Llama-2's architecture (checked against its Hugging Face
config.json), parameter and optimizer shardings on the 8 fake devices without allocating
(jax.eval_shape), the paper's hyperparameters, and the learning rate at the stop step against
its closed form."""

import json
import math
import os

import jax
import pytest
from jax.sharding import PartitionSpec as P

from configs import meditron_7b, meditron_70b
from jaxlab.train import pretrained
from jaxlab.train.loop import build_experiment
from tests.train.meditron_test import write_gap_replay

LLAMA2_HF_CONFIGS = {
    "meditron_7b": dict(hidden_size=4096, intermediate_size=11008, layers=32, heads=32, kv=32),
    "meditron_70b": dict(hidden_size=8192, intermediate_size=28672, layers=80, heads=64, kv=8),
}


def write_llama2_config(path, hidden_size, intermediate_size, layers, heads, kv):
    """A Llama-2 ``config.json`` as Meta's Hugging Face release has it (no weights)."""
    os.makedirs(path, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "use_cache": True,
        "vocab_size": 32000,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


# name: (module, billions of parameters, q_proj spec, embed spec, one epoch, peak, lr(N)/peak)
POD = {
    "meditron_7b": (meditron_7b, 6.7385, P("fsdp", None, None), P(None, "fsdp"), 14254, 3e-4),
    "meditron_70b": (
        meditron_70b,
        68.977,
        P(None, "tensor", None),
        P("tensor", None),
        23000,
        1.5e-4,
    ),
}


@pytest.fixture(scope="module")
def gap_replay_dir(tmp_path_factory):
    return write_gap_replay(tmp_path_factory.mktemp("gap_replay"))


@pytest.mark.parametrize("name", sorted(POD))
def test_pod_config_builds_shardings_and_schedule(name, gap_replay_dir, tmp_path):
    module, billions, q_spec, embed_spec, epoch, peak = POD[name]
    llama_dir = str(tmp_path / "llama2")
    write_llama2_config(llama_dir, **LLAMA2_HF_CONFIGS[name])
    config = module.get_config(f"{llama_dir},{gap_replay_dir}")
    assert config.init_from == f"hf:{llama_dir}" and config.data.tokenizer == llama_dir
    assert config.export_hf == "hf" and config.model.dtype == "bfloat16"
    assert config.optim.eps == 1e-5 and config.optim.b2 == 0.95
    assert config.optim.weight_decay == 0.1 and config.optim.clip_norm == 1.0
    config.data.tokenizer = "byte"  # the real tokenizer is the user's file
    exp = build_experiment(config)
    # The model is the checkpoint's architecture (the vocabulary grows by the special tokens).
    source = pretrained.source_model_config(pretrained.parse_source(config.init_from))
    assert pretrained.architecture_differences(exp.model_config, source) == []
    assert exp.model_config.vocab_size >= 32012 and source.vocab_size == 32000

    assert exp.mesh.size == jax.device_count() == 8
    params = exp.abstract_state.params
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
    count = sum(x.size for x in jax.tree.leaves(params))
    assert count / 1e9 == pytest.approx(billions, abs=0.001)
    assert exp.state_shardings.params["layers"][0]["attn"]["q_proj"].spec == q_spec
    assert exp.state_shardings.params["embed"].spec == embed_spec
    adam = exp.state_shardings.opt_state[1][0]
    assert adam.mu["layers"][0]["attn"]["q_proj"].spec == q_spec
    assert adam.nu["embed"].spec == embed_spec
    per_device = sum(
        math.prod(s.shard_shape(x.shape))
        for x, s in zip(
            jax.tree.leaves(params), jax.tree.leaves(exp.state_shardings.params), strict=True
        )
    )
    assert per_device < 1.01 * count / 8
    assert (config.batch_size // config.accum_steps) % 64 == 0

    # Learning rate: warm-up to the peak, cosine to 10% over two epochs, stopped after one.
    n, w = config.num_steps, config.optim.warmup_steps
    assert (n, w, config.optim.decay_steps) == (epoch, 2000, 2 * epoch)
    closed_form = peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (n - w) / (2 * n - w))))
    assert float(exp.schedule(n)) == pytest.approx(closed_form, rel=1e-5)
    assert abs(closed_form / peak - 0.55) < 0.06  # near 0.55 x peak (0.603 for 7B, 0.582 70B)
    assert float(exp.schedule(0)) == 0.0
    assert float(exp.schedule(w)) == pytest.approx(peak, rel=1e-6)
    assert float(exp.schedule(2 * n)) == pytest.approx(0.1 * peak, rel=1e-5)


def test_config_needs_both_paths():
    with pytest.raises(ValueError, match=r"meditron_7b.py:LLAMA_DIR,DATA; got ''"):
        meditron_7b.get_config()
    with pytest.raises(ValueError, match="got '/only/one'"):
        meditron_70b.get_config("/only/one")
