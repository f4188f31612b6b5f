"""The medical evaluation entrypoint on a tiny Hugging Face checkpoint and benchmark files in the
published formats."""

import dataclasses
import json

import pytest
from flax import nnx

from experiments.medical_eval import tokenizer_for
from jaxlab import models
from jaxlab.data.tokenizers import ByteTokenizer
from jaxlab.interop.hf import save_hf_llama
from tests.entrypoints import run_module
from tests.eval import medical_fixtures
from tests.infer import tiny_models


def test_medical_eval_entrypoint_on_an_hf_checkpoint(tmp_path):
    config = dataclasses.replace(tiny_models.llama(ByteTokenizer().vocab_size), max_seq_len=256)
    save_hf_llama(models.build(config, nnx.Rngs(1)), str(tmp_path / "hf"))
    dirs = medical_fixtures.write_all(str(tmp_path / "data"))
    out = tmp_path / "result.json"
    proc = run_module(
        "experiments.medical_eval",
        f"--model=hf:{tmp_path / 'hf'}",
        "--tokenizer=byte",
        "--benchmark=pubmedqa",
        f"--data_dir={dirs['pubmedqa']}",
        "--mode=likelihood",
        "--format=lm_eval",
        "--shots=1",
        "--seeds=1234,432",
        "--max_questions=3",
        f"--out={out}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["seeds"] == [1234, 432] and result["num_questions"] == 3
    assert result["model"] == f"hf:{tmp_path / 'hf'}"
    assert len(result["accuracy"]["per_seed"]) == 2 and result["parse_failures"]["total"] == 0
    assert {r["gold"] for r in result["predictions"]["1234"]} <= {"yes", "no", "maybe"}
    assert "pubmedqa likelihood (lm_eval, parity, 1-shot)" in proc.stdout

    bad = run_module(
        "experiments.medical_eval",
        f"--model=hf:{tmp_path / 'missing'}",
        "--benchmark=pubmedqa",
        f"--data_dir={dirs['pubmedqa']}",
        f"--out={out}",
    )
    assert bad.returncode != 0 and "--model: " in bad.stderr


def test_chat_adds_the_chatml_tokens_the_model_must_hold():
    plain = tokenizer_for("hf:/", "byte", False, 259)
    assert plain.vocab_size == 259
    chat = tokenizer_for("hf:/", "byte", True, 261)
    assert [len(chat.encode(t)) for t in ("<|im_start|>", "<|im_end|>")] == [1, 1]
    with pytest.raises(ValueError, match="has 261 ids but the model's vocab_size is 259"):
        tokenizer_for("hf:/", "byte", True, 259)
