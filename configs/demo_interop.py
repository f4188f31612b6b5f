"""Config of the interop demo: a tiny byte-level Llama, exported and reloaded.

Usage:
  python -m experiments.demo_interop --config=configs/demo_interop.py --workdir=runs/demo
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Random seed of the parameter initialisation and of sampling.
    config.seed = 0
    # The model (jaxlab.models.build); vocab 259 = the byte tokenizer's.
    config.model = ml_collections.ConfigDict(
        dict(
            name="llama",
            vocab_size=259,
            hidden_size=256,
            intermediate_size=688,
            num_layers=4,
            num_heads=8,
            num_kv_heads=4,
            max_seq_len=512,
            rope_theta=10000.0,
            # A wide init so an untrained model still has clear argmax winners.
            initializer_range=0.1,
            bos_token_id=257,
            eos_token_id=258,
        )
    )
    # Text the generation starts from (byte tokenizer).
    config.prompt = "def fibonacci(n):"
    # Tokens to generate per sample.
    config.max_new_tokens = 64
    # Nucleus sampling settings of the sampled generations.
    config.temperature = 0.8
    config.top_p = 0.9
    # Number of sampled continuations (one batch).
    config.num_samples = 4
    return config
