"""Llama-2 70B (grouped-query attention) on a pod: 8-way tensor parallel inside a host, FSDP
across hosts.

Usage: as configs/llama2_7b.py, with --config=configs/llama2_70b.py.

Checked ahead of time for 64 H100 80GB (8 hosts of 8, topology 1x8x8; make aot-check, with
--config.model.scan_layers; the unrolled layout was not compiled): the train step compiles and
needs 53 GB per device of the 64 GB JAX takes by default, with remat and 32
sequences per micro-step (64 per micro-step need 81 GB).
"""

from configs import llama2_7b


def get_config():
    config = llama2_7b.get_config()
    config.num_steps = 23_000
    config.batch_size = 512
    config.accum_steps = 16  # 32 sequences per micro-step
    config.model.update(
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
    )
    config.optim.update(learning_rate=1.5e-4)
    config.mesh.update(data=1, fsdp=-1, tensor=8)
    return config
