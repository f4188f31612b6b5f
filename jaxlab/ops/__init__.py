"""Dispatch between Pallas kernels and pure-XLA paths."""

from jaxlab.ops.attention import attention, available_impls, register_attention_impl
from jaxlab.ops.sparse_attention import (
    hash_sparse_attention,
    hash_window,
    masked_attention,
    qk_sparse_attention,
)

__all__ = [
    "attention",
    "available_impls",
    "hash_sparse_attention",
    "hash_window",
    "masked_attention",
    "qk_sparse_attention",
    "register_attention_impl",
]
