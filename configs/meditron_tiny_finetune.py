"""MEDITRON's answer-only finetuning at toy scale, on CPU in seconds: the path of
configs/meditron_7b_{medqa,medmcqa,pubmedqa}.py with configs/meditron_tiny.py's 2-layer model and
the byte tokenizer.

Usage (BENCHMARK: medqa, medqa4, medmcqa or pubmedqa; MODEL: run:WORKDIR of a jaxlab run, or a
Hugging Face directory of meditron_tiny's architecture, e.g. a meditron_tiny run's WORKDIR/hf;
TRAIN_FILE: the benchmark's train file in its released format):
  python -m experiments.train_lm \\
      --config=configs/meditron_tiny_finetune.py:BENCHMARK,MODEL,TRAIN_FILE \\
      --workdir=runs/meditron_tiny_finetune

The data format, special tokens (the embedding grows by the ones the model lacks), answer-only
loss, optimizer and schedule shape are configs/meditron_finetune.py's; the sizes are small: 8
sequences of 1,024 bytes (MEDITRON's instructions alone are 200-530 bytes), 8 updates, a
learning rate of 1e-3 (2e-5 moves a tiny model too little to see).
"""

from configs import lm_tiny, meditron_finetune, meditron_tiny
from configs.arguments import split_argument
from jaxlab.eval.medical.finetuning import FINETUNE_BENCHMARKS


def arguments(arg: str) -> tuple[str, str, str]:
    """``"BENCHMARK,MODEL,TRAIN_FILE"`` from the config argument."""
    benchmark, model, train_file = split_argument(
        arg,
        ("BENCHMARK", "MODEL", "TRAIN_FILE"),
        "configs/meditron_tiny_finetune.py",
        f"BENCHMARK one of {FINETUNE_BENCHMARKS}, the model and the train file",
    )
    if benchmark not in FINETUNE_BENCHMARKS:
        raise ValueError(
            f"configs/meditron_tiny_finetune.py: BENCHMARK must be one of {FINETUNE_BENCHMARKS}, "
            f"got {benchmark!r}"
        )
    return benchmark, model, train_file


def get_config(arg: str = ""):
    benchmark, model, train_file = arguments(arg)
    config = meditron_tiny.tiny_llama(lm_tiny.get_config())
    config.model.max_seq_len = 1024
    config.seq_len = 1024
    config.eval_every = 4
    config.eval_batches = 1
    config.checkpoint_every = 8
    config.log_every = 1
    config.data.tokenizer = "byte"
    config = meditron_finetune.finetuning(config, benchmark, model, train_file, num_steps=8)
    config.batch_size = 8
    config.optim.learning_rate = 1e-3
    return config
