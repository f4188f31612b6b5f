"""Llama-2 7B pretraining or continued pretraining on a pod (FSDP over every device).

Usage (one process per host; the data and tokenizer are yours):
  python -m experiments.train_lm --config=configs/llama2_7b.py --workdir=runs/llama2_7b \
      --coordinator_address=auto --config.data.sources="('jsonl:/data/*.jsonl',)" \
      --config.data.tokenizer=/path/to/tokenizer.model
"""

from configs import lm_tiny


def get_config():
    config = lm_tiny.get_config()
    config.num_steps = 14_000
    config.batch_size = 1024
    config.seq_len = 4096
    config.eval_every = 1000
    config.checkpoint_every = 500
    config.model.update(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        max_seq_len=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_embeddings=False,
        param_dtype="float32",
        dtype="bfloat16",
    )
    config.optim.update(
        learning_rate=3e-4, warmup_steps=2000, b2=0.95, eps=1e-5, weight_decay=0.1, clip_norm=1.0
    )
    # Fully sharded data parallel: parameters and optimizer state split over every device.
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    # The default rules: the 32000 ids split over the tensor axis (lm_tiny replicates its 259).
    config.logical_axis_rules = ()
    return config
