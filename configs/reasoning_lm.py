"""A small Llama teacher on the seeded arithmetic task (jaxlab.data.reasoning), for CPU.

Trains on chains of 1-6 steps with the loss on the chain of thought and answer only; the
held-out set is 8-step problems (the test difficulty), never trained on.

Usage:
  python -m experiments.train_lm --config=configs/reasoning_lm.py --workdir=runs/reasoning
"""

import ml_collections

from configs import lm_tiny

# The task: a data source spec (jaxlab.data.reasoning.parse_spec); experiments that score the
# teacher regenerate the same test problems from it.
TASK = "reasoning:train=1-6&test=8&num_train=20000&num_test=500&modulus=100&ops=add,sub&seed=0"


def get_config() -> ml_collections.ConfigDict:
    config = lm_tiny.get_config()
    config.num_steps = 2000
    config.batch_size = 32
    # The longest 8-step example is 197 tokens (bos and eos included).
    config.seq_len = 256
    config.eval_every = 500
    config.eval_batches = 4
    config.checkpoint_every = 500
    config.log_every = 50
    config.model.update(
        hidden_size=128,
        intermediate_size=512,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=256,
    )
    config.data.update(sources=(TASK,), tokenizer="reasoning")
    config.optim.update(learning_rate=3e-3, warmup_steps=100, weight_decay=0.1)
    return config
