"""Llama-2 7B pretraining or continued pretraining on a pod (FSDP over every device).

Usage (one process per host; the data and tokenizer are yours):
  python -m experiments.train_lm --config=configs/llama2_7b.py --workdir=runs/llama2_7b \
      --coordinator_address=auto --config.data.sources="('jsonl:/data/*.jsonl',)" \
      --config.data.tokenizer=/path/to/tokenizer.model

Checked ahead of time for 8 H100 80GB (topology 1x1x8; make aot-check): the train step compiles
and needs 48 GB per device as shipped (layers unrolled) and 46 GB with --config.model.scan_layers
(state 10 GB, temp 36 GB) of the 64 GB JAX takes by default, with remat and 32 sequences per
micro-step. On more devices keep batch_size / accum_steps divisible
by data x fsdp (accum_steps=16 on 64 devices).
"""

from configs import lm_tiny


def get_config():
    config = lm_tiny.get_config()
    config.num_steps = 14_000
    config.batch_size = 1024
    config.seq_len = 4096
    config.eval_every = 1000
    config.checkpoint_every = 500
    # 32 sequences per micro-step: the whole batch at once does not compile (XLA refuses a
    # fusion with more blocks than a GPU grid holds) and would need terabytes per device.
    config.accum_steps = 32
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
        # Keep only each block's input for the backward pass: without it the activations of
        # 32 layers do not fit beside the optimizer state.
        remat=True,
    )
    config.optim.update(
        learning_rate=3e-4, warmup_steps=2000, b2=0.95, eps=1e-5, weight_decay=0.1, clip_norm=1.0
    )
    # Fully sharded data parallel: parameters and optimizer state split over every device.
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    # The default rules: the 32000 ids split over the tensor axis (lm_tiny replicates its 259).
    config.logical_axis_rules = ()
    return config
