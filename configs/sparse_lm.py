"""The tiny LM with dynamic sparse attention (hash buckets or query/key dropping).

Usage:
  python -m experiments.train_lm --config=configs/sparse_lm.py:hash --workdir=runs/hash
  python -m experiments.train_lm --config=configs/sparse_lm.py:qk --workdir=runs/qk \
      --config.model.sparse_attention.keep_rate=0.7
"""

import ml_collections

from configs import lm_tiny

VARIANTS = {
    "hash": dict(kind="hash", num_buckets=8, keep_rate=0.5),
    "qk": dict(kind="qk", num_buckets=8, keep_rate=0.5),
}


def get_config(variant: str = "hash") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(
            f"configs/sparse_lm.py: variant must be one of {sorted(VARIANTS)}, got {variant!r}"
        )
    config = lm_tiny.get_config()
    # Longer windows than lm_tiny (same tokens per batch) so that skipped work matters: a query
    # sees about 1/8 of its keys (hash, 8 buckets) or 1/4 (qk, half the queries and keys kept).
    config.seq_len = 512
    config.batch_size = 4
    config.model.sparse_attention = ml_collections.ConfigDict(
        dict(VARIANTS[variant], impl="auto", seed=0, slack=2.0)
    )
    return config
