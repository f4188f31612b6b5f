"""MEDITRON's answer-only finetuning: benchmark train files in their released formats through the
engine in MEDITRON's ChatML, the special tokens as single ids with the embedding grown, and the
engine's loss equal to an answer-only cross-entropy computed independently (NumPy float64)."""

import math
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from configs import (
    meditron_7b_medmcqa,
    meditron_7b_medqa,
    meditron_7b_pubmedqa,
    meditron_finetune,
    meditron_tiny,
    meditron_tiny_finetune,
)
from jaxlab.data import pipeline, prompts
from jaxlab.data.guidelines import SPECIAL_TOKENS
from jaxlab.eval.medical import prompts as medical_prompts
from jaxlab.eval.medical import read_file
from jaxlab.optim import learning_rate_schedule
from jaxlab.train import loop
from tests.eval.medical_fixtures import write_all

START, END = "<|im_start|>", "<|im_end|>"
TRAIN_FILES = {
    "medqa": "train.jsonl",
    "medmcqa": "train.json",
    "pubmedqa": os.path.join("pqal_fold0", "train_set.json"),
}
# The first words of each benchmark's MEDITRON instruction (evaluation/instructions.json).
INSTRUCTION_START = {
    "medqa": "You are a medical doctor taking the US Medical Licensing Examination.",
    "medmcqa": "You are a medical doctor answering realworld medical entrance exam questions.",
    "pubmedqa": "As an expert doctor in clinical science and medical knowledge,",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{benchmark: train file} (40 questions each) and a tiny MEDITRON checkpoint (Hugging Face,
    meditron_tiny's architecture with the 12 pretraining tokens: 271 ids)."""
    root = tmp_path_factory.mktemp("finetune")
    dirs = write_all(str(root / "benchmarks"), n=40)
    torch.manual_seed(0)
    hf_config = dict(meditron_tiny.HF_LLAMA_CONFIG, vocab_size=259 + len(SPECIAL_TOKENS))
    model_dir = str(root / "meditron_tiny_hf")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config)).save_pretrained(model_dir)
    return {b: os.path.join(dirs[b], name) for b, name in TRAIN_FILES.items()}, model_dir


def tiny_config(benchmark, files):
    train_files, model_dir = files
    config = meditron_tiny_finetune.get_config(f"{benchmark},{model_dir},{train_files[benchmark]}")
    config.data.validation_fraction = 0.25  # held-out questions in a 40-question file
    return config


def answer_positions(tokens, start_id, end_id, answer_header):
    """Indices of a row's answer-message tokens, found by scanning its ids: from the last
    ``<|im_start|>answer\\n`` through the newline after ``<|im_end|>``."""
    n = len(answer_header)
    starts = [i for i in range(len(tokens) - n) if tokens[i : i + n] == answer_header]
    first = starts[-1]
    last = tokens.index(end_id, first) + 1
    assert tokens[last] == ord("\n") and last == len(tokens) - 1
    return range(first, last + 1)


def example_rows(config, benchmark, exp):
    """The first training batch and each row's example tokens (inputs, then the last target),
    checked to be MEDITRON's ChatML of one question per row, right-padded."""
    tokenizer = exp.tokenizer
    batch = next(pipeline.train_iterator(config.data, tokenizer, config.seq_len, config.batch_size))
    rows = []
    for r in range(config.batch_size):
        segment = batch["segment_ids"][r]
        length = int((segment == 1).sum())
        assert set(segment[length:].tolist()) <= {0} and (segment[:length] == 1).all()
        assert (batch["inputs"][r][length:] == tokenizer.pad_id).all()
        # The example: its input positions, and the last target if it fills the window.
        window = [*batch["inputs"][r].tolist(), int(batch["targets"][r][-1])]
        full = length == config.seq_len and window[-1] != tokenizer.pad_id
        tokens = window[: length + full]
        text = tokenizer.decode(tokens)
        # The zero-shot MEDITRON prompt as the question message, the label as the answer.
        assert text.startswith(f"{START}question\n{INSTRUCTION_START[benchmark]}")
        _, answer = text.split(f"\nThe answer is:\n{END}\n{START}answer\n")
        labels = ("yes", "no", "maybe") if benchmark == "pubmedqa" else tuple("ABCDE")
        assert answer[-len(END) - 1 :] == f"{END}\n" and answer[: -len(END) - 1] in labels
        rows.append(tokens)
    return batch, rows


@pytest.mark.parametrize("benchmark", sorted(TRAIN_FILES))
def test_finetuning_batches_mask_every_prompt_token(benchmark, files):
    config = tiny_config(benchmark, files)
    exp = loop.build_experiment(config)
    tokenizer = exp.tokenizer
    # The 12 pretraining tokens and ChatML's two, one id each after the 259 byte ids.
    for i, token in enumerate((*SPECIAL_TOKENS, START, END)):
        assert tokenizer.encode(token) == [259 + i], token
    assert exp.model_config.vocab_size == tokenizer.vocab_size == 273
    batch, rows = example_rows(config, benchmark, exp)
    header = tokenizer.encode(f"{START}answer\n")
    expected = np.zeros_like(batch["loss_mask"])
    for r, tokens in enumerate(rows):
        for t in answer_positions(tokens, header[0], tokenizer.encode(END)[0], header):
            expected[r, t - 1] = 1  # token t is the target of position t - 1
    np.testing.assert_array_equal(batch["loss_mask"], expected)


def test_finetuning_loss_is_the_answer_only_cross_entropy(files):
    config = tiny_config("pubmedqa", files)
    config.seq_len = 256  # the rows are 243-249 tokens (at 1024 the gradients took 14 s at -O0)
    exp = loop.build_experiment(config)
    params, report = loop.initial_params(exp)
    # The checkpoint had the 12 tokens (271 ids): embedding and head grow by ChatML's two rows.
    assert report["grown"] == {"embed": [271, 273], "lm_head": [271, 273]}
    source = transformers.LlamaForCausalLM.from_pretrained(files[1])
    old = source.model.embed_tokens.weight.detach().numpy()
    embed = np.asarray(params["embed"])
    np.testing.assert_array_equal(embed[:271], old)
    # New rows: the mean of the old ones (float32 summation: agreement to rounding).
    mean = np.broadcast_to(old.astype(np.float64).mean(0), (2, old.shape[1]))
    np.testing.assert_allclose(embed[271:], mean, rtol=1e-5, atol=1e-8)

    batch, rows = example_rows(config, "pubmedqa", exp)
    inputs = {k: batch[k] for k in (*loop.MODEL_INPUTS, "loss_mask")}
    forward = jax.jit(
        lambda p, x: nnx.merge(exp.graphdef, p)(
            x["inputs"], positions=x["positions"], segment_ids=x["segment_ids"]
        )
    )
    logits = np.asarray(forward(params, inputs), np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    header = exp.tokenizer.encode(f"{START}answer\n")
    end_id = exp.tokenizer.encode(END)[0]
    losses = [
        -log_probs[r, t - 1, tokens[t]]
        for r, tokens in enumerate(rows)
        for t in answer_positions(tokens, header[0], end_id, header)
    ]
    _, _, metrics = jax.jit(exp.objective.gradients)(
        params, inputs, loop.load_frozen(exp), (), jax.random.PRNGKey(0)
    )
    assert float(metrics["loss"]) == pytest.approx(np.mean(losses), rel=1e-5)


def test_tiny_finetuning_run_trains_on_answers_only(files, tmp_path):
    config = tiny_config("medqa", files)
    config.seq_len = 768  # the rows are 651-656 tokens
    config.num_steps = 2
    config.eval_every = 2
    result = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert result.step == 2 and np.isfinite(result.eval["eval_loss"])
    # An answer message is 10 bytes + the label + 2 tokens: far fewer than the rows' positions.
    assert result.train["tokens"] <= 2 * config.batch_size * 12


@pytest.mark.parametrize(
    "module, benchmark, steps",
    [
        (meditron_7b_medqa, "medqa", 480),
        (meditron_7b_medmcqa, "medmcqa", 7490),
        (meditron_7b_pubmedqa, "pubmedqa", 9380),
    ],
)
def test_7b_configs_have_the_papers_finetuning_hyperparameters(module, benchmark, steps):
    config = module.get_config("/m/meditron-7b,/d/train-file")
    assert config.data.sources == (
        f"qa:/d/train-file?format={benchmark}&template=meditron&layout=padded",
    )
    assert config.init_from == "hf:/m/meditron-7b" and config.data.tokenizer == "/m/meditron-7b"
    assert config.data.special_tokens == (*SPECIAL_TOKENS, START, END)
    assert config.model.vocab_size == 32014 and config.export_hf == "hf"
    assert (config.batch_size, config.seq_len) == (64, 2048)
    # 3 epochs of the paper's document count, rounded up to a multiple of 10 (sft.py).
    n = meditron_finetune.N_DOCS[benchmark]
    assert config.num_steps == steps == 10 * math.ceil(3 * n / 64 / 10)
    assert (config.optim.b1, config.optim.b2, config.optim.eps) == (0.9, 0.95, 1e-5)
    assert (config.optim.weight_decay, config.optim.clip_norm) == (0.1, 1.0)
    schedule = learning_rate_schedule(config.optim, config.num_steps)
    warmup = config.optim.warmup_steps
    assert warmup == round(0.1 * steps)
    assert float(schedule(0)) == 0.0
    assert float(schedule(warmup)) == pytest.approx(2e-5, rel=1e-6)
    assert float(schedule(steps)) == pytest.approx(2e-6, rel=1e-5)
    middle = (warmup + steps) // 2
    cosine = 2e-6 + 0.5 * (2e-5 - 2e-6) * (
        1 + math.cos(math.pi * (middle - warmup) / (steps - warmup))
    )
    assert float(schedule(middle)) == pytest.approx(cosine, rel=1e-5)


def test_configs_name_their_arguments():
    with pytest.raises(ValueError, match=r"meditron_7b_medqa.py:MODEL,TRAIN_FILE; got ''"):
        meditron_7b_medqa.get_config()
    with pytest.raises(ValueError, match="must be a Hugging Face directory"):
        meditron_7b_medqa.get_config("run:/w,/d/train.jsonl")
    with pytest.raises(ValueError, match="BENCHMARK must be one of .* got 'mmlu_medical'"):
        meditron_tiny_finetune.get_config("mmlu_medical,/m,/d")
    with pytest.raises(ValueError, match="BENCHMARK,MODEL,TRAIN_FILE; got 'medqa,/m'"):
        meditron_tiny_finetune.get_config("medqa,/m")


def test_a_qa_source_reads_a_released_file_through_its_format(files):
    path = files[0]["medmcqa"]
    options = prompts.parse_qa_spec(meditron_finetune.qa_source("medmcqa", path))
    assert options == dict(
        path_or_records=path, record_format="medmcqa", template="meditron", layout="padded"
    )
    records = prompts.load_records(path, record_format="medmcqa")
    questions = read_file("medmcqa", path)
    assert [(r.prompt, r.answer) for r in records] == [
        (medical_prompts.prompt("medmcqa", q), q.answer) for q in questions
    ]
    assert records[0].answer == "A" and records[1].answer == "B"  # cop 1 and 2, 1-based
    with pytest.raises(ValueError, match=r"record_format \(a qa: source's format=\) must be one"):
        prompts.load_records(path, record_format="mmlu_medical")
    with pytest.raises(TypeError, match="record_format='medqa' reads a file"):
        prompts.load_records([{"prompt": "p", "answer": "a"}], record_format="medqa")
