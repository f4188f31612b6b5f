"""MEDITRON continued pretraining: GAP-Replay's token shares through the pipeline, and a tiny
Hugging Face Llama trained on the 7B/70B configs' path and exported back to Hugging Face (the
pod configs themselves: meditron_pods_test.py)."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from configs import lm_tiny, meditron_gap_replay, meditron_tiny
from jaxlab.data import pipeline
from jaxlab.train.loop import build_experiment, train_and_evaluate

# Characters per document by source: papers are long, abstracts short (Table 1: about 8,300
# and 350 tokens), so record shares and token shares differ widely.
DOC_CHARS = {"guidelines": 300, "abstracts": 60, "papers": 1500, "replay": 150}
WORDS = "patient dose trial cohort risk therapy outcome review guideline fever".split()


def write_gap_replay(root, docs_per_source: int = 24) -> str:
    """A GAP-Replay folder: one JSONL file per source, documents of the source's length."""
    rng = np.random.default_rng(0)
    for name, chars in DOC_CHARS.items():
        os.makedirs(root / name, exist_ok=True)
        with open(root / name / "part-0.jsonl", "w") as f:
            for i in range(docs_per_source):
                words = rng.choice(WORDS, size=chars // 6)
                text = f"{name} {i}: " + " ".join(words)
                f.write(json.dumps({"text": text[:chars]}) + "\n")
    return str(root)


def test_table_1_token_shares():
    shares = meditron_gap_replay.TOKEN_SHARES
    assert meditron_gap_replay.TRAIN_TOKENS == pytest.approx(46.7e9, rel=1e-3)
    expected = {"guidelines": 0.0023, "abstracts": 0.117, "papers": 0.872, "replay": 0.009}
    for name, share in expected.items():
        assert shares[name] == pytest.approx(share, abs=0.001), name


def test_mixture_realises_table_1_token_shares(tmp_path):
    config = lm_tiny.get_config()
    meditron_gap_replay.apply(config, write_gap_replay(tmp_path))
    config.data.tokenizer = "byte"
    assert config.eval_per_source
    tokenizer = pipeline.make_tokenizer(config.data)
    components = pipeline.build_components(config.data)
    assert [c.name for c in components] == list(meditron_gap_replay.TABLE_1)
    seq_len, batch_size, num_batches = 8, 64, 128
    data = pipeline.train_iterator(config.data, tokenizer, seq_len, batch_size, components)
    tokens = np.zeros(4)
    documents = np.zeros(4)
    for _ in range(num_batches):
        batch = next(data)
        for i in range(4):
            tokens[i] += (batch["domain"] == i).sum()
            documents[i] += ((batch["domain"] == i) & (batch["inputs"] == tokenizer.bos_id)).sum()
    total = num_batches * batch_size * seq_len
    assert tokens.sum() == total
    realised = tokens / total
    target = np.array(list(meditron_gap_replay.TOKEN_SHARES.values()))
    np.testing.assert_allclose(realised, target, atol=0.01)  # within 1% of Table 1
    assert abs(realised[0] - target[0]) <= 0.1 * target[0]  # guidelines, 0.23%: 10% relative
    np.testing.assert_allclose(realised[1:3], target[1:3], rtol=0.01)
    # Every source is within two examples of its share, at any horizon.
    assert np.all(np.abs(tokens / seq_len - target * total / seq_len) <= 2)
    # The weights act on tokens: papers hold 87% of the tokens but far fewer of the documents.
    assert documents[2] / documents.sum() < 0.5 * realised[2]


@pytest.fixture(scope="module")
def gap_replay_dir(tmp_path_factory):
    return write_gap_replay(tmp_path_factory.mktemp("gap_replay"))


def test_export_is_checked_before_training(gap_replay_dir, tmp_path):
    llama_dir = tmp_path / "llama"
    os.makedirs(llama_dir)
    config = meditron_tiny.get_config(f"{llama_dir},{gap_replay_dir}")
    config.model.scan_layers = True
    with pytest.raises(ValueError, match=r"config.export_hf='hf': .*scan_layers=True"):
        build_experiment(config)
    config.model.scan_layers = False
    config.export_hf_dtype = "int8"
    with pytest.raises(ValueError, match=r"config.export_hf='hf': config.export_hf_dtype must"):
        build_experiment(config)


def test_tiny_hf_llama_continued_pretraining_and_export(gap_replay_dir, tmp_path):
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**meditron_tiny.HF_LLAMA_CONFIG)
    )
    llama_dir = str(tmp_path / "llama")
    hf_model.save_pretrained(llama_dir)
    config = meditron_tiny.get_config(f"{llama_dir},{gap_replay_dir}")
    config.data.validation_fraction = 0.25  # held-out documents in every small source
    config.eval_every = 8  # before and after training
    workdir = str(tmp_path / "run")
    result = train_and_evaluate(config, workdir)

    assert result.step == config.num_steps == 8
    assert result.init_from["grown"] == {"embed": [259, 271], "lm_head": [259, 271]}
    for name in meditron_gap_replay.TABLE_1:  # held-out perplexity per source
        assert result.eval[f"eval_perplexity/{name}"] > 1.0
        assert result.initial_eval[f"eval_perplexity/{name}"] > 1.0
    assert result.eval["eval_loss"] < result.initial_eval["eval_loss"]
    assert result.exported_hf == os.path.join(workdir, "hf")

    exported = transformers.LlamaForCausalLM.from_pretrained(result.exported_hf).eval()
    assert exported.config.vocab_size == 271
    tokens = np.random.default_rng(0).integers(0, 271, (2, 24))
    with torch.no_grad():
        theirs = exported(torch.tensor(tokens)).logits.numpy()
    model = nnx.merge(result.experiment.graphdef, result.state.params)
    ours = np.asarray(model(jax.numpy.asarray(tokens)))
    assert np.abs(ours - theirs).max() <= 1e-4
    # Continued pretraining moved the weights away from the checkpoint's.
    start = hf_model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    end = exported.model.layers[0].mlp.up_proj.weight.detach().numpy()
    assert np.abs(end - start).max() > 1e-4
