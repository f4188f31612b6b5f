r"""CPU throughput of ``generate(num_samples=n)`` (one prefill) vs repeating the prompts n times.

A random Llama (4 layers, hidden 256, SwiGLU 688, 4 heads, vocab 32000, float32) built with
:func:`jaxlab.models.build`. ``batch`` prompts of ``prompt_len`` random tokens each get ``n``
sampled completions of ``new_tokens`` tokens (temperature 1, no early stop), two ways:

* one prefill: ``generate(model, prompts, num_samples=n)`` prefills ``[batch, prompt_len]`` once
  and copies the cache ``n`` times along the batch;
* repeated prompts: ``generate(model, jnp.repeat(prompts, n, 0))`` prefills ``[batch * n,
  prompt_len]``.

Both decode ``batch * n`` rows, so the difference is the prefill. Reported: generated tokens per
second over the whole call (``batch * n * new_tokens / time``, compilation excluded by a warm-up
call, median of ``--repeats``) and the ratio one-prefill / repeated.

Usage::

  python -m experiments.bench.generate --out=bench_results/bench_generate.json [--quick]
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from experiments.bench.common import environment, time_calls, write_json
from jaxlab import models
from jaxlab.infer import SamplingConfig, generate
from jaxlab.models import TransformerConfig

_OUT = flags.DEFINE_string("out", "bench_results/bench_generate.json", "Where to write the JSON.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median reported).")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny smoke run: smaller model and shapes, 1 repeat.")

FULL = dict(
    model=dict(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=688,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
    ),
    batch=2,
    prompt_len=256,
    new_tokens=32,
    num_samples=(4, 16),
)
QUICK = dict(
    model=dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
    ),
    batch=2,
    prompt_len=32,
    new_tokens=8,
    num_samples=(2, 4),
)


def main(argv):
    del argv
    wall_start = time.perf_counter()
    setup = QUICK if _QUICK.value else FULL
    repeats = 1 if _QUICK.value else _REPEATS.value
    env = environment()
    busy = env["cpu_busy_before_run"]
    if busy is not None and busy > 0.2:
        print(
            f"WARNING: the CPUs were {busy:.0%} busy in the second before the run: another "
            "process is using them and the timings will be distorted."
        )
    quick = " (quick)" if _QUICK.value else ""
    print(
        f"jax {env['jax']} backend {env['jax_backend']} ({len(env['jax_devices'])} device(s)); "
        f"cpu_count {env['cpu_count']}; repeats {repeats}{quick}"
    )

    batch, prompt_len, new_tokens = setup["batch"], setup["prompt_len"], setup["new_tokens"]
    config = TransformerConfig(**setup["model"], max_seq_len=prompt_len + new_tokens)
    model = models.build(config, nnx.Rngs(0))
    prompts = jnp.asarray(
        np.random.default_rng(0).integers(0, config.vocab_size, (batch, prompt_len)), jnp.int32
    )
    sampling = SamplingConfig(temperature=1.0)
    kwargs = dict(max_new_tokens=new_tokens, sampling=sampling, stop_tokens=())

    rows: list[dict[str, Any]] = []
    for n in setup["num_samples"]:
        repeated = jnp.repeat(prompts, n, axis=0)

        def one_prefill(n=n):
            return jax.block_until_ready(generate(model, prompts, num_samples=n, **kwargs))

        def repeated_prompts(repeated=repeated):
            return jax.block_until_ready(generate(model, repeated, **kwargs))

        measured = {}
        for name, fn in (("one_prefill", one_prefill), ("repeated", repeated_prompts)):
            first_s = time_calls(fn, repeats=1, warmup=0).median
            timing = time_calls(fn, repeats=repeats, warmup=0)
            times, out = timing.seconds, timing.output
            if out.tokens.shape != (batch * n, new_tokens):
                raise RuntimeError(f"{name} n={n}: tokens have shape {out.tokens.shape}")
            measured[name] = dict(times_s=times, median_s=timing.median, first_call_s=first_s)
        generated = batch * n * new_tokens
        one, rep = measured["one_prefill"]["median_s"], measured["repeated"]["median_s"]
        row = dict(
            num_samples=n,
            rows=batch * n,
            generated_tokens=generated,
            one_prefill=measured["one_prefill"],
            repeated=measured["repeated"],
            one_prefill_tok_s=generated / one,
            repeated_tok_s=generated / rep,
            ratio=rep / one,
        )
        rows.append(row)
        print(
            f"  n={n}: one prefill {generated / one:,.0f} tok/s ({one * 1e3:.0f} ms), "
            f"repeated prompts {generated / rep:,.0f} tok/s ({rep * 1e3:.0f} ms), "
            f"ratio {rep / one:.2f}",
            flush=True,
        )

    print()
    m = setup["model"]
    print(
        f"Llama {m['num_layers']}x{m['hidden_size']}, vocab {m['vocab_size']}, float32; "
        f"{batch} prompts x {prompt_len} tokens, {new_tokens} new tokens per sample, "
        f"temperature 1; tok/s = generated tokens / whole generate() call, median of "
        f"{repeats}."
    )
    print()
    print("| num_samples | rows | one prefill tok/s | repeated prompts tok/s | ratio |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['num_samples']} | {row['rows']} | {row['one_prefill_tok_s']:,.0f} | "
            f"{row['repeated_tok_s']:,.0f} | {row['ratio']:.2f}x |"
        )

    wall = time.perf_counter() - wall_start
    env["load_average_at_end"] = os.getloadavg()
    result = dict(
        quick=_QUICK.value,
        repeats=repeats,
        model=dict(setup["model"], dtype="float32"),
        setup={k: v for k, v in setup.items() if k != "model"},
        rows=rows,
        environment=env,
        wall_s=wall,
    )
    write_json(_OUT.value, result)
    print(f"wrote {_OUT.value} (total {wall:.1f} s)")


if __name__ == "__main__":
    app.run(main)
