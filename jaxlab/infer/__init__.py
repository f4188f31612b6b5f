"""Decoding with KV caches and recurrent states, sampling, scoring of given sequences, and
test-time scaling (``jaxlab.infer.test_time``: many samples per problem against seconds)."""

from jaxlab.infer.decode import (
    GenerateOutput,
    decode_step,
    generate,
    generate_in_batches,
    prefill,
    truncate_at_stop_strings,
)
from jaxlab.infer.sampling import (
    SamplingConfig,
    filter_logits,
    greedy,
    sample,
    sample_with_logprobs,
)
from jaxlab.infer.score import score, token_logprobs, token_logprobs_and_greedy

__all__ = [
    "GenerateOutput",
    "SamplingConfig",
    "decode_step",
    "filter_logits",
    "generate",
    "generate_in_batches",
    "greedy",
    "prefill",
    "sample",
    "sample_with_logprobs",
    "score",
    "token_logprobs",
    "token_logprobs_and_greedy",
    "truncate_at_stop_strings",
]
