"""AdEMAMix on the tiny LM (embedded corpus), comparable with AdamW at the same token budget.

A short run, so beta3 = 0.999 (the paper's advice for short runs, App. C.1.5) with alpha = 8 and
both warmed up over the whole run (T_alpha,beta3 = num_steps, as in the paper).

Usage:
  python -m experiments.train_lm --config=configs/ademamix_lm.py --workdir=runs/ademamix
  python -m experiments.ademamix_lm --workdir=runs/ademamix_vs_adamw    # sweep + forgetting
"""

from configs import lm_tiny


def get_config():
    config = lm_tiny.get_config()
    config.seq_len = 64
    config.optim.update(
        name="ademamix",
        learning_rate=2e-3,
        warmup_steps=50,
        b1=0.9,
        b2=0.999,
        weight_decay=0.1,
        clip_norm=1.0,
    )
    # AdEMAMix only: slow-EMA decay, mixing weight, their warm-up (steps; 0 = off), EMA dtype.
    config.optim.b3 = 0.999
    config.optim.alpha = 8.0
    config.optim.warmup_alpha_b3 = 0  # set to the run's length by with_num_steps
    config.optim.mu_dtype = ""
    return lm_tiny.with_num_steps(config, 500)
