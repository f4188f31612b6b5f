"""Greedy decode timing shared by the Layer Parallelism experiment and its bench: a model placed
on a (tensor) mesh, a timed generation call, and round-robin medians. Defines no flags."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from experiments.bench.common import time_calls
from jaxlab.infer import generate
from jaxlab.train import sharding


def on_mesh(model: nnx.Module, mesh: jax.sharding.Mesh, rules) -> nnx.Module:
    """A copy of ``model`` whose parameters are sharded on ``mesh`` by their logical axes
    (``rules``, as training shards them: heads and MLP columns on ``tensor``)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pure = nnx.to_pure_dict(params)
    placed = jax.device_put(pure, sharding.state_shardings(params, mesh, rules))
    nnx.replace_by_pure_dict(params, placed)
    return nnx.merge(graphdef, params, rest)


def greedy_decoder(
    model: nnx.Module, rows: int, prompt_len: int, new_tokens: int, token_id: int
) -> Callable[[], jax.Array]:
    """A call generating ``new_tokens`` greedy tokens (no early stop, KV cache) after a prompt of
    ``prompt_len`` copies of ``token_id`` for ``rows`` rows; returns the tokens."""
    prompts = np.full((rows, prompt_len), token_id, np.int32)

    def decode():
        return generate(model, prompts, max_new_tokens=new_tokens, stop_tokens=()).tokens

    return decode


def round_robin_medians(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each call over ``repeats`` rounds, after one untimed call each
    (compilation). Each round times every call once, starting one name later than the round
    before, so a slow spell of a shared machine falls on all of them alike."""
    for fn in calls.values():
        jax.block_until_ready(fn())
    names = list(calls)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seconds[name] += time_calls(calls[name], repeats=1, warmup=0).seconds
    return {n: statistics.median(s) for n, s in seconds.items()}
