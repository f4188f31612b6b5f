"""Tiny random models for the decoding and scoring tests: a Llama, pure and hybrid Mambas.

Weights use std 0.2 so that logits are peaked and greedy decoding has clear winners.
"""

from jaxlab.models import MambaConfig, TransformerConfig

COMMON = dict(hidden_size=32, num_layers=2, max_seq_len=64, initializer_range=0.2)
ATTENTION = dict(num_heads=4, num_kv_heads=2)


def llama(vocab: int) -> TransformerConfig:
    return TransformerConfig(vocab_size=vocab, intermediate_size=64, **ATTENTION, **COMMON)


def mamba(vocab: int, mixer: str = "mamba1", *, hybrid: bool = False) -> MambaConfig:
    """Mamba-1 or Mamba-2 (``head_dim`` 16, chunks of 8); ``hybrid``: layer 1 is attention."""
    extra = dict(head_dim=16, chunk_size=8) if mixer == "mamba2" else {}
    if hybrid:
        extra.update(intermediate_size=48, attention_layers=(1,), **ATTENTION)
    return MambaConfig(vocab_size=vocab, mixer=mixer, state_size=8, **extra, **COMMON)
