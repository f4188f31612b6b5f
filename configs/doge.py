"""DoGE against uniform and DoReMi weights (experiments/doge.py).

Usage:
  python -m experiments.doge --workdir=runs/doge [--config.corpus.steps=1000]
"""

import ml_collections

from configs import lm_tiny


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Generated classification domains with seeded roles around an OOD target (brief 1.9): an
    # MLP proxy, Adam with cosine decay lr -> final_lr_ratio * lr, batch_size per domain.
    config.synthetic = ml_collections.ConfigDict(
        dict(
            seeds=(0, 1, 2),
            hidden=(64,),
            learning_rate=1e-2,
            final_lr_ratio=0.1,
            proxy_steps=1000,
            base_steps=1000,
            batch_size=64,
            mu_ood=0.05,
            mu_universal=0.01,
            score_clip=(0.0, 5.0),
            doremi_step_size=1.0,
            doremi_smoothing=1e-4,
            fd_step=1e-3,
        )
    )
    # Embedded corpus: standard-library packages as domains, one held out as the OOD target.
    # The proxy and base models are the same small byte-level Llama (lm_tiny, narrowed).
    lm = lm_tiny.get_config()
    lm.model.update(
        hidden_size=128, intermediate_size=344, num_layers=2, num_heads=4, num_kv_heads=2
    )
    lm.optim.warmup_steps = 30
    lm.mesh.update(data=1, num_devices=1)
    lm.log_every = 20
    lm = lm_tiny.with_num_steps(lm, 600)
    config.corpus = ml_collections.ConfigDict(
        dict(
            domains=("email", "asyncio", "multiprocessing", "importlib", "distutils"),
            target="urllib",
            steps=600,
            seeds=(0, 1, 2),
            mu=0.05,
            doremi_step_size=1.0,
            doremi_smoothing=1e-3,
            eval_batches=8,
            lm=lm,
        )
    )
    return config
