"""The batches experiments/bench/input_pipeline.py times: lm_tiny's data, 64 rows of 1024 tokens.

Usage:
  python -m experiments.bench.input_pipeline [--config.data.sources="('embedded:*',)"]
"""

import ml_collections

from configs import lm_tiny


def get_config() -> ml_collections.ConfigDict:
    config = lm_tiny.get_config()
    # Global rows and tokens per row: a per-host load a larger model would see.
    config.batch_size = 64
    config.seq_len = 1024
    return config
