"""A small Llama teacher on the seeded arithmetic task (jaxlab.data.reasoning), sized for CPU.

Trains on chains of 1-8 steps (values modulo 10) with the loss on the chain of thought and
answer only; the held-out set is 500 unseen 8-step problems, the test difficulty (a difficulty
above the training range would use variable letters the model never saw: see the module).

Measured (2 shared CPU cores, load about 11): 1500 steps in about 16 minutes (0.65 s per step;
about 2 steps/s when the machine is less loaded); held-out answer loss 0.040; greedy pass@1 on
the 500 test problems 162/500 = 32.4% (95% interval +-4.1 points; no malformed output); at step
1000 it was 20/200 (chance is 10%). Greedy decoding: jaxlab.eval.reasoning.greedy_outputs.

Usage:
  python -m experiments.train_lm --config=configs/reasoning_lm.py --workdir=runs/reasoning
"""

import ml_collections

from configs import lm_tiny

# The task: a data source spec (jaxlab.data.reasoning.parse_spec); experiments that score the
# teacher regenerate the same test problems from it (reasoning.parse_spec(TASK).split("test")).
TASK = "reasoning:train=1-8&test=8&num_train=20000&num_test=500&modulus=10&ops=add,sub&seed=0"


def get_config() -> ml_collections.ConfigDict:
    config = lm_tiny.get_config()
    config.num_steps = 1500
    config.batch_size = 16
    # The longest 8-step example is 157 tokens (bos and eos included); examples are packed.
    config.seq_len = 160
    config.eval_every = 250
    config.eval_batches = 4
    config.checkpoint_every = 250
    config.log_every = 50
    config.model.update(
        hidden_size=64,
        intermediate_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=160,
    )
    config.data.update(sources=(TASK,), tokenizer="reasoning")
    config.optim.update(learning_rate=3e-3, warmup_steps=100, weight_decay=0.1)
    return config
