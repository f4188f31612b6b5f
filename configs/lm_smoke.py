"""A seconds-long version of lm_tiny for tests and smoke runs (2 layers, 32 wide, 8 steps).

Usage:
  python -m experiments.train_lm --config=configs/lm_smoke.py --workdir=/tmp/smoke
"""

from configs import lm_tiny


def get_config():
    config = lm_tiny.get_config()
    config.num_steps = 8
    config.batch_size = 8
    config.seq_len = 32
    config.eval_every = 4
    config.eval_batches = 2
    config.checkpoint_every = 4
    config.log_every = 2
    config.model.update(
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=64,
    )
    config.data.sources = ("embedded:json", "embedded:email")
    config.optim.update(warmup_steps=2, learning_rate=3e-3)
    return config
