"""MEDITRON-7B: continued pretraining of Llama-2-7B on GAP-Replay (Chen et al. 2023, §4.1).

Usage (one process per host; LLAMA_DIR is a Hugging Face Llama-2-7B directory, whose weights
start the run and whose tokenizer reads the data; DATA is the GAP-Replay folder of
configs/meditron_gap_replay.py):
  python -m experiments.train_lm --config=configs/meditron_7b.py:LLAMA_DIR,DATA \
      --workdir=runs/meditron_7b --coordinator_address=auto

Hyperparameters (the paper and epfLLM/meditron's README): bf16 compute over float32 master
weights; AdamW b1 0.9, b2 0.95, eps 1e-5, weight decay 0.1, clipping at 1.0; peak learning rate
3e-4 after 2,000 warm-up steps, cosine to 10% of the peak; sequences of 2,048 tokens, 1,600 per
update (3.28M tokens). One epoch of GAP-Replay's 46.7B tokens is 14,254 updates. The cosine
horizon is two epochs but the run stops after one (paper App. D.1: the higher final learning
rate did better), so the schedule is still at about 0.6 x peak at the last step: with warm-up W
and one epoch N, lr(N) / peak = 0.1 + 0.45 (1 + cos(pi (N - W) / (2N - W))), 0.603 here (0.55
if there were no warm-up).

The vocabulary is Llama-2's 32,000 ids plus MEDITRON's 12 special tokens; the embedding and
head grow from the checkpoint's (new rows: the mean of the old ones). At the end the model is
written as a Hugging Face checkpoint in bfloat16 to WORKDIR/hf.

Checked ahead of time for 8 H100 80GB (topology 1x1x8; make aot-check): the train step compiles
and needs 35 GB per device of the 64 GB JAX takes by default. That was with scan_layers, which the
end-of-run Hugging Face export refuses; the unrolled 7B step needs about 2 GB more
(configs/llama2_7b.py).
"""

from configs import llama2_7b, meditron_gap_replay
from configs.arguments import split_argument

WARMUP_STEPS = 2000
HORIZON_EPOCHS = 2  # the cosine spans two epochs; the run stops after one


def paths(arg: str, config_file: str) -> tuple[str, str]:
    """``"LLAMA_DIR,DATA"`` from the config argument (``--config=FILE:LLAMA_DIR,DATA``)."""
    llama_dir, data = split_argument(
        arg,
        ("LLAMA_DIR", "DATA"),
        config_file,
        "the Hugging Face Llama-2 directory and the GAP-Replay folder",
    )
    return llama_dir, data


def continued_pretraining(config, llama_dir: str, data: str, *, epoch_steps: int):
    """What every MEDITRON config shares: weights and tokenizer from ``llama_dir``, GAP-Replay
    under ``data``, the optimizer and schedule of the paper (peak learning rate left to the
    caller), ``epoch_steps`` updates on a cosine horizon of two epochs, an HF export at the
    end. Returns ``config``."""
    meditron_gap_replay.apply(config, data)
    config.data.tokenizer = llama_dir
    config.init_from = f"hf:{llama_dir}"
    config.init_from_mode = "exact"
    config.num_steps = epoch_steps
    config.optim.update(
        name="adamw",
        schedule="cosine",
        warmup_steps=min(WARMUP_STEPS, epoch_steps),
        decay_steps=HORIZON_EPOCHS * epoch_steps,
        final_lr_fraction=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-5,
        weight_decay=0.1,
        clip_norm=1.0,
    )
    config.export_hf = "hf"
    config.export_hf_dtype = "bfloat16"
    return config


def get_config(arg: str = ""):
    llama_dir, data = paths(arg, "configs/meditron_7b.py")
    config = llama2_7b.get_config()
    config.seq_len = 2048
    config.batch_size = 1600
    # 64 sequences per micro-step: divisible by every data x fsdp of 1 to 64 devices.
    config.accum_steps = 25
    config.model.vocab_size = 32000 + len(meditron_gap_replay.SPECIAL_TOKENS)
    config.optim.learning_rate = 3e-4
    epoch = meditron_gap_replay.one_epoch_steps(config.batch_size, config.seq_len)
    return continued_pretraining(config, llama_dir, data, epoch_steps=epoch)
