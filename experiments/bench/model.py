r"""CPU throughput of a tiny Llama: jaxlab vs Hugging Face transformers (PyTorch), same weights.

One random Llama (4 layers, hidden 256, SwiGLU 688, 4 heads, vocab 32000, float32) is built in
``transformers``, written with ``save_pretrained`` and read back with
:func:`jaxlab.interop.hf.load_hf_llama`, so both frameworks run identical weights. Measured:

* prefill: one forward over ``[batch, 512]`` random tokens returning full logits
  (``transformers``: ``model(input_ids, use_cache=False)`` under ``torch.no_grad``; jaxlab: a
  ``jax.jit`` of ``nnx.merge(graphdef, state)(tokens)``), reported as prompt tokens per second;
  beside it, each side's vocabulary projection alone at that shape (most of the prefill's FLOPs
  at vocabulary 32000) and the prefill ratio it bounds (:func:`time_vocab_projection`);
* decode: greedy generation of 128 tokens after a 16-token prompt with no early stop
  (``transformers``: ``model.generate``; jaxlab: :func:`jaxlab.infer.generate`), reported as
  generated tokens per second over the whole batch. The whole ``generate`` call is timed for both,
  so the (small) 16-token prefill is included.

Each measurement is warmed up first (for jaxlab that includes compilation) and the median of
``--repeats`` timed calls is reported. The run also checks that both frameworks agree: the largest
absolute logit difference over the prefill batches, and that greedy tokens at batch 1 are equal.

Usage::

  python -m experiments.bench.model --out=bench_results/bench_model.json [--repeats=5] [--quick]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from absl import app, flags
from flax import nnx

from experiments.bench.common import environment, time_calls, write_json
from jaxlab.infer import generate
from jaxlab.interop.hf import load_hf_llama

_OUT = flags.DEFINE_string("out", "bench_results/bench_model.json", "Where to write the JSON.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (median reported).")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny smoke run: smaller model and shapes, 1 repeat.")

# Goals of the CPU-speed issue (25): jaxlab throughput / transformers throughput (the first
# issue's were 1.0x, 3.0x and 1.5x).
GOALS = {"prefill": 1.5, "decode_b1": 4.0, "decode_bN": 2.5}

FULL = dict(
    model=dict(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
    prefill_len=512,
    prefill_batches=(1, 8),
    prompt_len=16,
    new_tokens=128,
    decode_batches=(1, 16),
)
QUICK = dict(
    model=dict(
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
    prefill_len=64,
    prefill_batches=(1, 2),
    prompt_len=8,
    new_tokens=16,
    decode_batches=(1, 4),
)
# Weight scale of the random model: large enough that greedy decoding has clear winners, so the
# token-equality check is not decided by float rounding between near-tied logits.
WEIGHT_STD = 0.1


def make_hf_model(model_kwargs: dict[str, Any], seed: int = 0) -> transformers.LlamaForCausalLM:
    """A random float32 ``LlamaForCausalLM`` (norm scales around 1, matrices N(0, WEIGHT_STD))."""
    config = transformers.LlamaConfig(
        **model_kwargs,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(WEIGHT_STD * noise if p.ndim > 1 else 1.0 + 0.1 * noise)
    return model.eval()


def time_vocab_projection(
    hf_model, head_weight, tokens: int, repeats: int, hf_prefill_s: float
) -> dict[str, Any]:
    """Median seconds of the prefill's vocabulary projection alone on each side: ``tokens`` rows
    of random final hidden states times the output matrix, float32 logits, as the models compute
    it (``lm_head`` for transformers, ``hidden @ head`` jitted for jaxlab). At this benchmark's
    vocabulary it is most of the prefill's FLOPs, so it bounds the prefill ratio:
    ``prefill_ratio_bound``, transformers' prefill time ``hf_prefill_s`` over jaxlab's projection
    time, is the ratio jaxlab would reach if the rest of its forward took no time."""
    hidden = int(head_weight.shape[0])
    states = np.random.default_rng(1).standard_normal((tokens, hidden)).astype(np.float32)
    pt_states, jx_states = torch.from_numpy(states), jax.device_put(states)
    project = jax.jit(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32))

    def hf_projection():
        with torch.no_grad():
            return hf_model.lm_head(pt_states)

    hf = time_calls(hf_projection, repeats=repeats)
    jx = time_calls(lambda: project(jx_states, head_weight), repeats=repeats)
    return dict(
        hidden=hidden,
        tokens=tokens,
        transformers_s=hf.seconds,
        jaxlab_s=jx.seconds,
        transformers_median_s=statistics.median(hf.seconds),
        jaxlab_median_s=statistics.median(jx.seconds),
        prefill_ratio_bound=hf_prefill_s / statistics.median(jx.seconds),
    )


def main(argv):
    del argv
    wall_start = time.perf_counter()
    setup = QUICK if _QUICK.value else FULL
    repeats = 1 if _QUICK.value else _REPEATS.value
    torch.set_num_threads(os.cpu_count())
    env = environment()
    busy = env["cpu_busy_before_run"]
    if busy is not None and busy > 0.2:
        print(
            f"WARNING: the CPUs were {busy:.0%} busy in the second before the run: another "
            "process is using them and the timings (transformers' OpenMP threads especially) "
            "will be distorted."
        )
    print(
        f"torch.set_num_threads({os.cpu_count()}) -> torch threads {env['torch_threads']}; "
        f"jax {env['jax']} backend {env['jax_backend']} ({len(env['jax_devices'])} device(s)); "
        f"cpu_count {env['cpu_count']}; repeats {repeats}{' (quick)' if _QUICK.value else ''}"
    )

    hf_model = make_hf_model(setup["model"])
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        model = load_hf_llama(tmp, dtype="float32")
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    head_weight = state["lm_head"][...]  # [hidden, vocab] (the benchmark's model is untied)
    vocab = setup["model"]["vocab_size"]
    rng = np.random.default_rng(0)

    rows: list[dict[str, Any]] = []
    max_logit_diff = max_abs_logit = 0.0

    def record(name, kind, batch, tokens_per_call, hf_times, jax_times, goal, **extra):
        hf_med, jax_med = statistics.median(hf_times), statistics.median(jax_times)
        hf_tps, jax_tps = tokens_per_call / hf_med, tokens_per_call / jax_med
        ratio = jax_tps / hf_tps
        row = dict(
            name=name,
            kind=kind,
            batch=batch,
            tokens_per_call=tokens_per_call,
            transformers_s=hf_times,
            jaxlab_s=jax_times,
            transformers_median_s=hf_med,
            jaxlab_median_s=jax_med,
            transformers_tok_s=hf_tps,
            jaxlab_tok_s=jax_tps,
            ratio=ratio,
            goal=goal,
            met=bool(ratio >= goal),
            **extra,
        )
        rows.append(row)
        print(
            f"  {name}: transformers {hf_tps:,.0f} tok/s ({hf_med * 1e3:.1f} ms), "
            f"jaxlab {jax_tps:,.0f} tok/s ({jax_med * 1e3:.1f} ms), ratio {ratio:.2f}",
            flush=True,
        )
        return row

    # ---- Prefill: one forward over [batch, prefill_len], full logits.
    seq = setup["prefill_len"]
    for batch in setup["prefill_batches"]:
        tokens = rng.integers(0, vocab, (batch, seq), dtype=np.int64)
        pt_tokens = torch.as_tensor(tokens)
        jx_tokens = jnp.asarray(tokens, jnp.int32).block_until_ready()

        def hf_prefill(pt_tokens=pt_tokens):
            with torch.no_grad():
                return hf_model(pt_tokens, use_cache=False).logits

        def jax_prefill(jx_tokens=jx_tokens):
            return forward(state, jx_tokens).block_until_ready()

        hf = time_calls(hf_prefill, repeats=repeats)
        compile_s = time_calls(jax_prefill, repeats=1, warmup=0).median
        jx = time_calls(jax_prefill, repeats=repeats, warmup=0)
        hf_times, hf_logits, jax_times, jax_logits = hf.seconds, hf.output, jx.seconds, jx.output
        diff = float(np.abs(np.asarray(jax_logits) - hf_logits.numpy()).max())
        max_logit_diff = max(max_logit_diff, diff)
        max_abs_logit = max(max_abs_logit, float(hf_logits.abs().max()))
        del hf_logits, jax_logits
        head = time_vocab_projection(
            hf_model, head_weight, batch * seq, repeats, statistics.median(hf_times)
        )
        record(
            f"prefill b={batch}",
            "prefill",
            batch,
            batch * seq,
            hf_times,
            jax_times,
            GOALS["prefill"],
            seq_len=seq,
            jaxlab_first_call_s=compile_s,
            max_abs_logit_diff=diff,
            vocab_projection=head,
        )
        print(
            f"    the vocabulary projection alone ([{batch * seq}, {head['hidden']}] x "
            f"[{head['hidden']}, {vocab}]): transformers {head['transformers_median_s'] * 1e3:.1f} "
            f"ms, jaxlab {head['jaxlab_median_s'] * 1e3:.1f} ms; with the rest of jaxlab's "
            f"forward free the ratio would be {head['prefill_ratio_bound']:.2f}x",
            flush=True,
        )

    # ---- Decode: greedy, prompt_len prompt, exactly new_tokens generated tokens per row.
    prompt_len, new_tokens = setup["prompt_len"], setup["new_tokens"]
    greedy: dict[str, Any] = {}
    for batch in setup["decode_batches"]:
        prompts = rng.integers(1, vocab, (batch, prompt_len), dtype=np.int64)
        pt_prompts = torch.as_tensor(prompts)
        pt_mask = torch.ones_like(pt_prompts)
        jx_prompts = jnp.asarray(prompts, jnp.int32).block_until_ready()

        def hf_generate(pt_prompts=pt_prompts, pt_mask=pt_mask):
            with torch.no_grad():
                out = hf_model.generate(
                    pt_prompts,
                    attention_mask=pt_mask,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )
            return out[:, prompt_len:]

        def jax_generate(jx_prompts=jx_prompts):
            out = generate(model, jx_prompts, max_new_tokens=new_tokens, stop_tokens=())
            return jax.block_until_ready(out)

        hf = time_calls(hf_generate, repeats=repeats)
        compile_s = time_calls(jax_generate, repeats=1, warmup=0).median
        jx = time_calls(jax_generate, repeats=repeats, warmup=0)
        hf_times, hf_out, jax_times, jax_out = hf.seconds, hf.output, jx.seconds, jx.output
        hf_tokens, jax_tokens = hf_out.numpy(), np.asarray(jax_out.tokens)
        if hf_tokens.shape != jax_tokens.shape:
            raise RuntimeError(
                f"decode b={batch}: transformers generated {hf_tokens.shape}, "
                f"jaxlab {jax_tokens.shape}"
            )
        mismatch = np.argwhere(hf_tokens != jax_tokens)
        match = dict(
            identical=bool(mismatch.size == 0),
            first_mismatch=None if mismatch.size == 0 else mismatch[0].tolist(),
            rows_identical=int(np.all(hf_tokens == jax_tokens, axis=1).sum()),
        )
        greedy[f"b={batch}"] = match
        goal = GOALS["decode_b1"] if batch == 1 else GOALS["decode_bN"]
        record(
            f"decode b={batch}",
            "decode",
            batch,
            batch * new_tokens,
            hf_times,
            jax_times,
            goal,
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            jaxlab_first_call_s=compile_s,
            greedy_tokens=match,
            transformers_ms_per_token=statistics.median(hf_times) / new_tokens * 1e3,
            jaxlab_ms_per_token=statistics.median(jax_times) / new_tokens * 1e3,
        )

    # ---- Report.
    print()
    print(
        f"Prefill: one forward over [b, {seq}] with full logits. Decode: whole greedy generate() "
        f"call timed ({prompt_len}-token prompt prefill included), {new_tokens} new tokens per "
        f"row, tok/s = b*{new_tokens}/time. Median of {repeats}."
    )
    print()
    print("| row | transformers tok/s | jaxlab tok/s | ratio (jaxlab/transformers) | goal | met |")
    print("|---|---:|---:|---:|---:|---|")
    for row in rows:
        print(
            f"| {row['name']} | {row['transformers_tok_s']:,.0f} | {row['jaxlab_tok_s']:,.0f} | "
            f"{row['ratio']:.2f}x | >= {row['goal']:.1f}x | {'yes' if row['met'] else 'no'} |"
        )
    b1 = next(r for r in rows if r["kind"] == "decode" and r["batch"] == 1)
    print()
    print(
        f"decode b=1 ms/token: transformers {b1['transformers_ms_per_token']:.2f}, "
        f"jaxlab {b1['jaxlab_ms_per_token']:.2f}"
    )
    print(
        f"max |logit difference| over prefill batches: {max_logit_diff:.3g} "
        f"(max |logit| {max_abs_logit:.3g})"
    )
    if greedy["b=1"]["identical"]:
        print("greedy tokens at b=1: identical")
    else:
        print(
            "WARNING: greedy tokens at b=1 differ between jaxlab and transformers "
            f"(first mismatch at [row, step] {greedy['b=1']['first_mismatch']})"
        )
    for key, match in greedy.items():
        if key != "b=1" and not match["identical"]:
            print(f"note: greedy tokens at {key}: {match['rows_identical']} rows identical")

    wall = time.perf_counter() - wall_start
    env["load_average_at_end"] = os.getloadavg()
    result = dict(
        quick=_QUICK.value,
        repeats=repeats,
        model=dict(setup["model"], dtype="float32", weight_std=WEIGHT_STD),
        setup={k: v for k, v in setup.items() if k != "model"},
        goals=GOALS,
        rows=rows,
        max_abs_logit_diff=max_logit_diff,
        max_abs_logit=max_abs_logit,
        greedy_tokens=greedy,
        decode_b1_ms_per_token=dict(
            transformers=b1["transformers_ms_per_token"], jaxlab=b1["jaxlab_ms_per_token"]
        ),
        environment=env,
        wall_s=wall,
    )
    write_json(_OUT.value, result)
    print(f"wrote {_OUT.value} (total {wall:.1f} s)")


if __name__ == "__main__":
    app.run(main)
