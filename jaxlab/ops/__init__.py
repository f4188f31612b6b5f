"""Dispatch between Pallas kernels and pure-XLA paths."""

from jaxlab.ops.attention import attention, available_impls, register_attention_impl

__all__ = ["attention", "available_impls", "register_attention_impl"]
