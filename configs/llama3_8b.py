"""Llama-3 8B (128k vocabulary, grouped-query attention, rope theta 5e5) on a pod:
FSDP across devices with 2-way tensor parallelism.

Usage: as configs/llama2_7b.py, with --config=configs/llama3_8b.py and a Llama-3
tokenizer.json as --config.data.tokenizer.

Checked ahead of time for 8 H100 80GB (topology 1x1x8; make aot-check, with
--config.model.scan_layers; the unrolled layout was not compiled): the train step compiles and
needs 49 GB per device of the 64 GB JAX takes by default, with 8 sequences of 8k tokens per
micro-step (at 16 it needs 84 GB). The 8 sequences must divide over data x fsdp: up to 16 devices
as shipped (tensor 2); on 32 devices set --config.accum_steps=32.
"""

from configs import llama2_7b


def get_config():
    config = llama2_7b.get_config()
    config.seq_len = 8192
    config.batch_size = 512
    # 8 sequences of 8k per micro-step: at 16 the attention scores of a step need more than
    # an H100's 80 GB.
    config.accum_steps = 64
    config.model.update(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        max_seq_len=8192,
        rope_theta=500000.0,
    )
    config.mesh.update(data=1, fsdp=-1, tensor=2)
    return config
