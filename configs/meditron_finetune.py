"""MEDITRON's answer-only finetuning (Chen et al. 2023, §4.2), as a block the per-benchmark
configs share: configs/meditron_7b_medqa.py, meditron_7b_medmcqa.py, meditron_7b_pubmedqa.py
(7B, the paper's hyperparameters) and configs/meditron_tiny_finetune.py (the same path on CPU).

Data. The benchmark's released train file, read as it is (``qa:FILE?format=BENCHMARK``:
:mod:`jaxlab.eval.medical.finetuning` turns each question into the zero-shot MEDITRON prompt
and its gold label), in MEDITRON's ChatML (template ``"meditron"``:
``<|im_start|>question\\n{prompt}<|im_end|>\\n<|im_start|>answer\\n{label}<|im_end|>\\n``), one
example per row, right-padded (``layout=padded``; Megatron-LLM's ``--variable_seq_lengths``),
the loss on the answer message only (their ``--scalar_loss_mask 0.0``). The tokenizer gets the
12 pretraining tokens and ``<|im_start|>``, ``<|im_end|>`` (Megatron's ``--vocab_extra_ids_list``,
in that order), each one id; the checkpoint's embedding and head grow to fit (new rows: the mean
of the old ones). ``VALIDATION_FRACTION`` of the file (a hash of its position) is held out for
the run's evaluation; MEDITRON trained on the whole file and validated on a separate one.

Hyperparameters, from epfLLM/meditron ``finetuning/finetune_sft.sh`` and ``sft.py``
(``--instruct`` mode): AdamW b1 0.9, b2 0.95, eps 1e-5, weight decay 0.1; learning rate 2e-5,
10% of the steps warm-up, cosine to 2e-6 at the last step; 64 sequences per update, 3 epochs,
``10 * ceil(3 N / 640)`` updates (their ``n_iters`` rounded up to a multiple of 10) with the
paper's document counts ``N_DOCS``; sequences of 2,048 tokens for 7B (``sft.py``'s default; the
shell script's own default for Llama-2 is 4,096). Unverified: gradient clipping at 1.0 (Megatron-
LLM's default ``--clip_grad``; the scripts do not set it); bf16 compute over float32 master
weights (the scripts pass ``--bf16``; whether master weights were float32 is Megatron's default,
not checked). For 70B the shell script overrides the rate to 1.5e-4 -> 1.5e-5, which disagrees
with the paper's 2e-5: no 70B finetuning config is given here.
"""

import math

from configs import llama2_7b
from configs.arguments import split_argument
from jaxlab.data.guidelines import SPECIAL_TOKENS
from jaxlab.data.prompts import CHATML_TOKENS
from jaxlab.eval.medical.finetuning import FINETUNE_BENCHMARKS

# Training documents per benchmark (epfLLM/meditron finetuning/sft.py N_DOCS): MedQA's US train
# set, MedMCQA's train set, PubMedQA's artificial PQA-A (200,000 of its 211,269).
N_DOCS = {"medqa": 10_178, "medmcqa": 159_669, "pubmedqa": 200_000}
EPOCHS = 3
BATCH_SIZE = 64
LEARNING_RATE = 2e-5
FINAL_LR_FRACTION = 0.1  # 2e-6
WARMUP_FRACTION = 0.1
VALIDATION_FRACTION = 0.02
FINETUNE_TOKENS = (*SPECIAL_TOKENS, *CHATML_TOKENS)


def sft_steps(num_docs: int, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE) -> int:
    """MEDITRON's update count: ``epochs * num_docs / batch_size``, rounded up to a multiple
    of 10."""
    if num_docs < 1:
        raise ValueError(f"num_docs must be >= 1, got {num_docs}")
    return 10 * math.ceil(epochs * num_docs / batch_size / 10)


def paths(arg: str, config_file: str) -> tuple[str, str]:
    """``"MODEL,TRAIN_FILE"`` from the config argument (``--config=FILE:MODEL,TRAIN_FILE``)."""
    model, train_file = split_argument(
        arg,
        ("MODEL", "TRAIN_FILE"),
        config_file,
        "the model to finetune (a Hugging Face directory or run:WORKDIR) and the benchmark's "
        "released train file",
    )
    return model, train_file


def init_source(model: str) -> str:
    """``config.init_from`` for ``model``: ``run:WORKDIR[@STEP]`` as it is, else ``hf:model``."""
    return model if model.startswith(("run:", "hf:")) else f"hf:{model}"


def qa_source(benchmark: str, train_file: str) -> str:
    """The ``qa:`` data source of a benchmark's released train file."""
    if benchmark not in FINETUNE_BENCHMARKS:
        raise ValueError(f"benchmark must be one of {FINETUNE_BENCHMARKS}, got {benchmark!r}")
    if "?" in train_file:
        raise ValueError(f"train_file must not contain '?' (it ends the path): {train_file!r}")
    return f"qa:{train_file}?format={benchmark}&template=meditron&layout=padded"


def finetuning(config, benchmark: str, model: str, train_file: str, *, num_steps: int):
    """What every MEDITRON finetuning config shares: ``model``'s weights, the benchmark's train
    file in MEDITRON's ChatML with the special tokens added, answer-only loss, the paper's
    optimizer and schedule over ``num_steps`` updates. Returns ``config``."""
    config.data.update(
        sources=(qa_source(benchmark, train_file),),
        weights=(),
        validation_fraction=VALIDATION_FRACTION,
        special_tokens=FINETUNE_TOKENS,
    )
    config.init_from = init_source(model)
    config.init_from_mode = "exact"
    config.num_steps = num_steps
    config.batch_size = BATCH_SIZE
    config.optim.update(
        name="adamw",
        learning_rate=LEARNING_RATE,
        schedule="cosine",
        warmup_steps=round(WARMUP_FRACTION * num_steps),
        decay_steps=0,  # the run's own length
        final_lr_fraction=FINAL_LR_FRACTION,
        b1=0.9,
        b2=0.95,
        eps=1e-5,
        weight_decay=0.1,
        clip_norm=1.0,
    )
    return config


def meditron_7b(benchmark: str, arg: str, config_file: str):
    """The 7B finetuning config of ``benchmark`` (``arg``: ``MEDITRON_DIR,TRAIN_FILE``; the
    directory is a Hugging Face checkpoint with its tokenizer, e.g. configs/meditron_7b.py's
    export)."""
    model, train_file = paths(arg, config_file)
    if model.startswith("run:"):
        raise ValueError(
            f"{config_file} reads its tokenizer from the model: MODEL must be a Hugging Face "
            f"directory, got {model!r}"
        )
    model = model.removeprefix("hf:")
    config = llama2_7b.get_config()
    config.seq_len = 2048
    config.accum_steps = 1
    config.eval_every = 100
    config.eval_batches = 4
    config.checkpoint_every = 200
    config.model.vocab_size = 32000 + len(FINETUNE_TOKENS)
    config.data.tokenizer = model
    config.export_hf = "hf"
    config.export_hf_dtype = "bfloat16"
    return finetuning(config, benchmark, model, train_file, num_steps=sft_steps(N_DOCS[benchmark]))
