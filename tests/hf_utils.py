"""Random tiny Hugging Face Llama/Mistral models (PyTorch, CPU) to compare jaxlab against."""

import numpy as np
import torch
import transformers

# Tiny configs covering GQA, both rope-scaling types, tied/untied heads, biases, sliding window.
HF_CONFIGS = {
    "gqa_untied": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2),
    "llama3_rope_tied": dict(
        model_type="llama",
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    "linear_rope_biases": dict(
        model_type="llama",
        num_attention_heads=4,
        num_key_value_heads=4,
        attention_bias=True,
        mlp_bias=True,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    ),
    "mistral_sliding_window": dict(
        model_type="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=5
    ),
}


def make_hf_model(name: str, seed: int = 0, vocab_size: int = 97):
    """A random ``*ForCausalLM`` whose every parameter (norms included) is random.

    Weights use std 0.2 so that logits are peaked and greedy decoding has clear winners.
    """
    kwargs = dict(HF_CONFIGS[name])
    model_type = kwargs.pop("model_type")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if model_type == "llama":
        config = transformers.LlamaConfig(**common, **kwargs)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.MistralConfig(**common, **kwargs)
        model = transformers.MistralForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(0.2 * noise if p.ndim > 1 else 1.0 + 0.1 * noise)
    return model.eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
