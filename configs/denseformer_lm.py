"""DenseFormer on the tiny LM (embedded corpus): a 1x1 DenseFormer of depth 4.

Usage:
  python -m experiments.train_lm --config=configs/denseformer_lm.py --workdir=runs/denseformer
  python -m experiments.denseformer_lm --workdir=runs/denseformer_depth   # the depth comparison
"""

import ml_collections

from configs import lm_tiny


def get_config():
    config = lm_tiny.with_num_steps(lm_tiny.get_config(), 500)
    config.seq_len = 64
    config.optim.learning_rate = 1e-3
    config.model.num_layers = 4
    config.model.dwa = ml_collections.ConfigDict(dict(dilation=1, period=1))
    return config
