"""Decoding with KV caches and sampling."""

from jaxlab.infer.decode import GenerateOutput, decode_step, generate, prefill
from jaxlab.infer.sampling import SamplingConfig, filter_logits, greedy, sample

__all__ = [
    "GenerateOutput",
    "SamplingConfig",
    "decode_step",
    "filter_logits",
    "generate",
    "greedy",
    "prefill",
    "sample",
]
