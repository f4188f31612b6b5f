"""MEDITRON-70B: continued pretraining of Llama-2-70B (grouped-query attention) on GAP-Replay.

Usage: as configs/meditron_7b.py, with --config=configs/meditron_70b.py:LLAMA_DIR,DATA.

As the 7B config except (paper §4.1, Table 6): peak learning rate 1.5e-4; sequences of 4,096
tokens, 512 per update (2.1M tokens); 23,000 updates, the paper's one epoch (about 48B tokens),
on a cosine horizon of 46,000 (two epochs), so the last step's rate is 0.582 x peak. The mesh is
llama2_70b's: 8-way tensor parallel inside a host, FSDP across hosts; the vocabulary (32,000 +
12 special tokens) is padded to 32,016 so that the tensor axis divides it (the tokenizer never
produces the 4 extra ids).

Checked ahead of time for the paper's 128 GPUs as 128 H100 80GB (16 hosts of 8, topology 1x16x8;
make aot-check, with scan_layers, which the end-of-run Hugging Face export refuses; the unrolled
layout was not compiled): the train step compiles and needs 42 GB per device of the 64 GB JAX
takes by default. On 64 GPUs the 64 sequences per micro-step need about 81 GB per device: there, set
--config.accum_steps=16.
"""

from configs import llama2_70b, meditron_7b, meditron_gap_replay

EPOCH_STEPS = 23_000  # paper Table 6


def get_config(arg: str = ""):
    llama_dir, data = meditron_7b.paths(arg, "configs/meditron_70b.py")
    config = llama2_70b.get_config()
    config.seq_len = 4096
    config.batch_size = 512
    config.accum_steps = 8  # 64 sequences per micro-step
    vocab = 32000 + len(meditron_gap_replay.SPECIAL_TOKENS)
    config.model.vocab_size = -(-vocab // config.mesh.tensor) * config.mesh.tensor
    config.optim.learning_rate = 1.5e-4
    return meditron_7b.continued_pretraining(config, llama_dir, data, epoch_steps=EPOCH_STEPS)
