r"""CPU train-step throughput and peak memory of a tiny Llama: jaxlab vs transformers + PyTorch.

The model and batch are ``--config``'s, overridable with ``--config.x=`` (default
``configs/lm_tiny.py``: hidden 256, SwiGLU 688, 4 layers, 8 query / 4 key-value heads, the byte
tokenizer's vocabulary (259), tied embeddings, float32). A random
``transformers.LlamaForCausalLM`` (its own initialisation, seed 0) is written with
``save_pretrained`` and both sides start from those weights: PyTorch reads them with
``from_pretrained``, jaxlab with :func:`jaxlab.interop.hf.load_hf_llama` (parameters taken as
``nnx.to_pure_dict(nnx.state(model, nnx.Param))``) into the config's model (its graph
definition from :func:`jaxlab.train.loop.build_experiment`, so ``--config.model.attention_impl``,
``remat`` and the like reach the step). One training step on a batch of the config's
shape (lm_tiny: ``[16, 128]``) of random byte tokens, next-token cross-entropy averaged over all
positions, AdamW (``OPTIM``: lr 1e-3 constant, b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1 on
matrices only, replacing the config's ``optim`` except for ``--config.optim.`` overrides) after
clipping the gradient's global norm to 1.0:

* transformers: ``model(inputs).logits`` -> ``F.cross_entropy`` -> ``backward`` ->
  ``torch.nn.utils.clip_grad_norm_`` -> ``torch.optim.AdamW.step``;
* jaxlab: :func:`jaxlab.train.step.make_train_step` with the optimizer, shardings and abstract
  state of :func:`jaxlab.train.loop.build_experiment` (the config with the optimizer above),
  jitted as the training loop does (explicit in/out shardings, the state donated, and, as the
  loop, :func:`jaxlab.train.host_memory.trim_after_compiles`: the compiler's freed heap goes back
  to the operating system); the batch is the dict the step expects (``loss_mask`` and
  ``segment_ids`` all ones, ``positions`` arange).

Each side runs in its own subprocess (this program re-invoked with ``--side``) so that its peak
resident memory is its own; the parent only prepares the weights and batches and collects the JSON
each side writes (each side builds the config from the parent's ``--config`` arguments). The
peak is the process's ``VmHWM`` (``/proc/self/status``), not ``ru_maxrss``: on Linux
``ru_maxrss`` survives ``execve``, so a child starts at its parent's RSS at the fork.

Per side: ``--loss_steps`` steps on fixed batches whose losses are recorded (they are also the
warm-up; jaxlab's step is compiled ahead of them with ``lower().compile()``, timed apart), then the
median of ``--repeats`` timed steps, then (``--breakdown``) the parts of the step alone:
forward+loss, forward+backward, and clip+optimizer update. The losses of both sides over the same
batches from the same weights should agree to float rounding; their largest absolute difference is
printed, not asserted.

The compute bound: the step's unavoidable matrix-product FLOPs (:func:`step_matmul_flops`) at
this machine's measured float32 matmul rate (the better of XLA's and PyTorch's, best of 5, on a
``[2048, 2048]`` product, ``[512, 512]`` with ``--quick``; timed in the parent before the sides
run) is the shortest time a float32 step could take at that rate; transformers' step time over it
bounds the tok/s ratio an implementation can reach against transformers here. It is printed with
each side's fraction of that rate.

``--quick`` is a smoke run: 2 layers, a ``[4, 64]`` batch, 1 repeat (fields that ``--config.``
sets explicitly keep their values).

Usage::

  python -m experiments.bench.train [--out=bench_results/bench_train.json] [--repeats=5] [--quick]
      [--config.model.num_layers=8] [--config.batch_size=32]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from experiments import run_config
from experiments.aot_check import step_flops
from experiments.bench.common import (
    cpu_busy_fraction,
    environment,
    matmul_peak_flops,
    memory_snapshot,
    time_calls,
    time_steps,
    write_json,
)
from jaxlab.data.tokenizers import load_tokenizer
from jaxlab.interop.hf import load_hf_llama
from jaxlab.train import host_memory, sharding
from jaxlab.train.loop import build_experiment
from jaxlab.train.step import TrainState, loss_sums, make_train_step

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "bench_results/bench_train.json", "Where to write the JSON.")
flags.DEFINE_integer("repeats", 5, "Timed steps per measurement (median reported).")
flags.DEFINE_bool("quick", False, "Tiny smoke run: smaller model and shapes, 1 repeat.")
_LOSS_STEPS = flags.DEFINE_integer("loss_steps", 3, "Steps whose losses are compared.")
_BREAKDOWN = flags.DEFINE_bool(
    "breakdown", True, "Also time forward, forward+backward and the optimizer update alone."
)
_SIDE = flags.DEFINE_enum(
    "side", "", ["", "torch", "jaxlab"], "Internal: measure one side (in a subprocess)."
)
_SIDE_DIR = flags.DEFINE_string(
    "side_dir", "", "Internal: directory with the weights and batches, and for the side's JSON."
)
config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "..", "..", "configs", "lm_tiny.py"),
    "The model, batch and mesh of the jaxlab side (the PyTorch model mirrors its model).",
    lock_config=True,
)

# The optimizer both sides use (jaxlab: config.optim fields of build_optimizer).
OPTIM = dict(
    name="adamw",
    learning_rate=1e-3,
    warmup_steps=0,
    schedule="constant",
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    weight_decay=0.1,
    clip_norm=1.0,
)
QUICK = {"batch_size": 4, "seq_len": 64, "model.num_layers": 2}
# Optimizer settings whose other values the PyTorch side has no counterpart for.
_FIXED = dict(name="adamw", schedule="constant", warmup_steps=0, frozen=(), stage_steps=())


def experiment_config():
    """``--config`` with the benchmark's optimizer and (``--quick``) shapes, except for the fields
    ``--config.`` sets explicitly."""
    defaults = {f"optim.{k}": v for k, v in OPTIM.items()} | (QUICK if FLAGS.quick else {})
    config = run_config.from_flag(FLAGS["config"], defaults=defaults)
    for field, value in _FIXED.items():
        if config.optim.get(field, value) != value:
            raise ValueError(
                f"config.optim.{field} must be {value!r} (what the PyTorch side runs), "
                f"got {config.optim[field]!r}"
            )
    return config


def hf_config(config) -> transformers.LlamaConfig:
    """The ``LlamaConfig`` of ``config.model`` (vocabulary from the config's tokenizer)."""
    m = config.model
    vocab = m.vocab_size or load_tokenizer(config.data.tokenizer or None).vocab_size
    return transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        max_position_embeddings=m.max_seq_len,
        rope_theta=m.rope_theta,
        rms_norm_eps=1e-5,  # TransformerConfig's default; lm_tiny does not set it
        initializer_range=m.initializer_range,
        tie_word_embeddings=m.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def step_matmul_flops(hf: transformers.LlamaConfig, batch: int, seq: int) -> float:
    """The matrix-product FLOPs a training step of ``hf`` on ``[batch, seq]`` tokens cannot avoid:
    :func:`experiments.aot_check.step_flops`' model FLOPs over the weight matrices only (the
    vocabulary projection included, tied or not) with causal attention's allowed pairs only.
    Norms, RoPE, softmax, the loss and the update are left out: a lower bound."""
    d, heads, kv_heads = hf.head_dim, hf.num_attention_heads, hf.num_key_value_heads
    per_layer = hf.hidden_size * d * (2 * heads + 2 * kv_heads) + 3 * (
        hf.hidden_size * hf.intermediate_size
    )
    model_flops, _ = step_flops(
        matmul_params=hf.num_hidden_layers * per_layer + hf.hidden_size * hf.vocab_size,
        attention_layers=hf.num_hidden_layers,
        attention_width=heads * d,
        seq_len=seq,
        tokens=batch * seq,
        remat=False,
        causal=True,
    )
    return model_flops


# --------------------------------------------------------------------------------------------
# One side, in its own process.


def run_torch(side_dir: str, optim, repeats: int, breakdown: bool) -> dict[str, Any]:
    torch.set_num_threads(os.cpu_count())
    import torch.nn.functional as F

    memory = {"after_imports": memory_snapshot()}
    model = transformers.LlamaForCausalLM.from_pretrained(side_dir, dtype=torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=optim.learning_rate,
        betas=(optim.b1, optim.b2),
        eps=optim.eps,
    )
    tokens = np.load(os.path.join(side_dir, "batches.npy"))
    batches = [
        (torch.as_tensor(t[:, :-1]).long(), torch.as_tensor(t[:, 1:]).long()) for t in tokens
    ]
    vocab = model.config.vocab_size
    memory["after_load"] = memory_snapshot()

    def forward_loss(inputs, targets):
        logits = model(input_ids=inputs, use_cache=False).logits
        return F.cross_entropy(logits.reshape(-1, vocab).float(), targets.reshape(-1))

    def step(i: int) -> float:
        inputs, targets = batches[i % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        loss = forward_loss(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, optim.clip_norm)
        optimizer.step()
        return loss.item()

    losses, timing = time_steps(step, len(batches), repeats)
    memory.update(timing.pop("memory"))
    result = dict(
        losses=losses,
        **timing,
        memory_mib=memory,
        attn_implementation=model.config._attn_implementation,
        torch_threads=torch.get_num_threads(),
        adamw=dict(
            {k: str(v) for k, v in optimizer.defaults.items() if k != "weight_decay"},
            weight_decay_by_group=[g["weight_decay"] for g in optimizer.param_groups],
            params_by_group=[len(g["params"]) for g in optimizer.param_groups],
        ),
    )
    if breakdown:
        inputs, targets = batches[0]

        def fwd():
            with torch.no_grad():
                return forward_loss(inputs, targets).item()

        def fwd_bwd():
            optimizer.zero_grad(set_to_none=True)
            loss = forward_loss(inputs, targets)
            loss.backward()
            return loss.item()

        def update():
            torch.nn.utils.clip_grad_norm_(params, optim.clip_norm)
            optimizer.step()

        result["breakdown_median_s"] = dict(
            forward_loss=time_calls(fwd, repeats=repeats).median,
            forward_backward=time_calls(fwd_bwd, repeats=repeats).median,
            clip_and_update=time_calls(update, repeats=repeats).median,
        )
    return result


def run_jaxlab(side_dir: str, config, repeats: int, breakdown: bool):
    memory = {"after_imports": memory_snapshot()}
    host_memory.trim_after_compiles()  # as train_and_evaluate does
    exp = build_experiment(config)
    model = load_hf_llama(side_dir, dtype="float32")
    graphdef = exp.graphdef  # the config's model (attention_impl, remat, ...), the HF weights
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    del model
    shapes = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), params)
    expected = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), exp.abstract_state.params)
    if shapes != expected:
        raise RuntimeError(
            "the loaded Hugging Face model's parameters do not match the config's model: "
            f"{shapes} vs {expected}"
        )
    optimizer = exp.optimizer
    state = jax.jit(
        lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)),
        out_shardings=exp.state_shardings,
    )(params)
    del params
    train_step = jax.jit(
        make_train_step(graphdef, optimizer, learning_rate=exp.schedule),
        in_shardings=(exp.state_shardings, sharding.batch_sharding(exp.mesh)),
        out_shardings=(exp.state_shardings, sharding.replicated(exp.mesh)),
        donate_argnums=0,
    )
    tokens = np.load(os.path.join(side_dir, "batches.npy"))
    batches = []
    for t in tokens:
        batch, seq = t.shape[0], t.shape[1] - 1
        host = dict(
            inputs=t[:, :-1].astype(np.int32),
            targets=t[:, 1:].astype(np.int32),
            loss_mask=np.ones((batch, seq), np.int32),
            segment_ids=np.ones((batch, seq), np.int32),
            positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        )
        batches.append(jax.block_until_ready(sharding.global_batch_to_devices(host, exp.mesh)))
    memory["after_load"] = memory_snapshot()
    start = time.perf_counter()
    compiled_step = train_step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start
    memory["after_compile"] = memory_snapshot()
    try:  # XLA's buffer sizes for the step (temp: activations and scratch, one allocation)
        stats = compiled_step.memory_analysis()
        xla_memory = {
            k: getattr(stats, f"{k}_size_in_bytes") / 2**20
            for k in ("argument", "output", "alias", "temp", "generated_code")
        }
    except (AttributeError, NotImplementedError):
        xla_memory = None

    def step(i: int):
        nonlocal state
        state, metrics = compiled_step(state, batches[i % len(batches)])
        return jax.block_until_ready((state, metrics))[1]

    outputs, timing = time_steps(step, len(batches), repeats)
    memory.update(timing.pop("memory"))
    result = dict(
        losses=[float(out["loss"]) for out in outputs],
        **timing,
        memory_mib=memory,
        compile_s=compile_s,
        xla_memory_mib=xla_memory,
        mesh=dict(exp.mesh.shape),
        devices=[str(d) for d in jax.devices()],
    )
    if breakdown:
        batch = batches[0]
        fwd = jax.jit(lambda p, b: loss_sums(graphdef, p, b))
        grad = jax.jit(jax.value_and_grad(lambda p, b: loss_sums(graphdef, p, b), has_aux=True))

        @jax.jit
        def update(grads, opt_state, params):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        params, opt_state = state.params, state.opt_state
        (_, _), grads = jax.block_until_ready(grad(params, batch))
        result["breakdown_median_s"] = dict(
            forward_loss=time_calls(lambda: fwd(params, batch), repeats=repeats).median,
            forward_backward=time_calls(lambda: grad(params, batch), repeats=repeats).median,
            clip_and_update=time_calls(
                lambda: update(grads, opt_state, params), repeats=repeats
            ).median,
        )
    return result


def run_side(side: str, side_dir: str, repeats: int) -> None:
    config = experiment_config()
    load_start = os.getloadavg()
    busy = cpu_busy_fraction(0.5)
    start = time.perf_counter()
    if side == "torch":
        result = run_torch(side_dir, config.optim, repeats, _BREAKDOWN.value)
    else:
        result = run_jaxlab(side_dir, config, repeats, _BREAKDOWN.value)
    result.update(
        side=side,
        wall_s=time.perf_counter() - start,
        load_average_at_start=load_start,
        load_average_at_end=os.getloadavg(),
        cpu_busy_before=busy,
    )
    with open(os.path.join(side_dir, f"{side}.json"), "w") as f:
        json.dump(result, f, indent=2)


# --------------------------------------------------------------------------------------------
# The parent: prepare, run both sides, report.


def config_arguments(argv: list[str]) -> list[str]:
    """The ``--config`` file and ``--config.x`` overrides among ``argv`` (``--flag value`` pairs
    kept together), so a side builds the same config as the parent."""
    kept = []
    for i, arg in enumerate(argv):
        if arg == "--config" or arg.startswith(("--config=", "--config.")):
            kept.append(arg)
            if "=" not in arg and i + 1 < len(argv):
                kept.append(argv[i + 1])
    return kept


def spawn_side(side: str, side_dir: str, repeats: int) -> dict[str, Any]:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    command = [
        sys.executable,
        "-m",
        "experiments.bench.train",
        f"--side={side}",
        f"--side_dir={side_dir}",
        f"--repeats={repeats}",
        f"--loss_steps={_LOSS_STEPS.value}",
        f"--quick={str(FLAGS.quick).lower()}",
        f"--breakdown={str(_BREAKDOWN.value).lower()}",
        *config_arguments(sys.argv[1:]),
    ]
    print(f"running {side} side ...", flush=True)
    subprocess.run(command, cwd=repo, check=True)
    with open(os.path.join(side_dir, f"{side}.json")) as f:
        return json.load(f)


def main(argv):
    del argv
    transformers.utils.logging.disable_progress_bar()
    repeats = 1 if FLAGS.quick else FLAGS.repeats
    if _SIDE.value:
        run_side(_SIDE.value, _SIDE_DIR.value, repeats)
        return

    wall_start = time.perf_counter()
    env = environment()
    busy = env["cpu_busy_before_run"]
    if busy is not None and busy > 0.2:
        print(
            f"WARNING: the CPUs were {busy:.0%} busy in the second before the run: another "
            "process is using them and the timings will be distorted."
        )
    config = experiment_config()
    batch, seq = config.batch_size, config.seq_len
    tokens_per_step = batch * seq
    print(
        f"jax {env['jax']} backend {env['jax_backend']}, torch {env['torch']} "
        f"(threads = cpu_count {env['cpu_count']}), transformers {env['transformers']}; "
        f"batch [{batch}, {seq}], {config.model.num_layers} layers; repeats {repeats}"
        f"{' (quick)' if FLAGS.quick else ''}; load average {env['load_average_at_start']}",
        flush=True,
    )

    hf = hf_config(config)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(hf)
    rng = np.random.default_rng(0)
    token_batches = rng.integers(0, hf.vocab_size, (_LOSS_STEPS.value, batch, seq + 1))
    # Measured before the sides run, while this process alone uses the CPUs.
    matmul_size = 512 if FLAGS.quick else 2048
    matmul_rates = matmul_peak_flops(size=matmul_size)
    with tempfile.TemporaryDirectory() as side_dir:
        hf_model.save_pretrained(side_dir)
        del hf_model
        np.save(os.path.join(side_dir, "batches.npy"), token_batches.astype(np.int32))
        sides = {s: spawn_side(s, side_dir, repeats) for s in ("torch", "jaxlab")}
    pt, jx = sides["torch"], sides["jaxlab"]

    pt_tps = tokens_per_step / pt["step_median_s"]
    jx_tps = tokens_per_step / jx["step_median_s"]
    loss_diffs = [abs(a - b) for a, b in zip(pt["losses"], jx["losses"], strict=True)]
    max_loss_diff = max(loss_diffs)

    def mib(side: str, stage: str, key: str = "peak_mib") -> float:
        return sides[side]["memory_mib"][stage][key]

    peak = {s: mib(s, "after_timed_steps") for s in sides}
    # The peak right after the imports is their RSS (nothing has been freed yet).
    increase = {s: peak[s] - mib(s, "after_imports") for s in sides}
    name = f"train step b={batch} s={seq}"
    print()
    print(
        f"One AdamW training step (forward, backward, clip, update) on [{batch}, {seq}] tokens, "
        f"float32, CPU; tok/s = {tokens_per_step}/step time, median of {repeats}. "
        "Peak RSS: high-water mark (VmHWM) of each side's own process up to the end of the timed "
        "steps; increase = over its RSS after imports (both sides import torch, transformers and "
        "jax)."
    )
    print()
    print("| row | transformers tok/s | jaxlab tok/s | ratio (jaxlab/transformers) |")
    print("|---|---:|---:|---:|")
    print(f"| {name} | {pt_tps:,.0f} | {jx_tps:,.0f} | {jx_tps / pt_tps:.2f}x |")
    print()
    print("| row | transformers MiB | jaxlab MiB | ratio (jaxlab/transformers) |")
    print("|---|---:|---:|---:|")
    print(
        f"| peak RSS, {name} | {peak['torch']:,.0f} | {peak['jaxlab']:,.0f} | "
        f"{peak['jaxlab'] / peak['torch']:.2f}x |"
    )
    print(
        f"| peak RSS increase over imports, {name} | {increase['torch']:,.0f} | "
        f"{increase['jaxlab']:,.0f} | {increase['jaxlab'] / increase['torch']:.2f}x |"
    )
    print()
    for s in sides:
        stages = ", ".join(
            f"{stage.removeprefix('after_').replace('_', ' ')} {m['peak_mib']:,.0f}"
            for stage, m in sides[s]["memory_mib"].items()
        )
        print(
            f"{s} peak RSS MiB after: {stages}; RSS at the end of the timed steps "
            f"{mib(s, 'after_timed_steps', 'current_mib'):,.0f}"
        )
    if jx.get("xla_memory_mib"):
        x = jx["xla_memory_mib"]
        print(
            f"jaxlab compiled step, XLA buffers MiB: temp {x['temp']:,.0f}, arguments "
            f"{x['argument']:,.0f}, outputs {x['output']:,.0f} (aliased {x['alias']:,.0f})"
        )
    print()
    print(
        f"step time: transformers {pt['step_median_s'] * 1e3:.0f} ms, jaxlab "
        f"{jx['step_median_s'] * 1e3:.0f} ms; first step transformers {pt['first_step_s']:.2f} s, "
        f"jaxlab {jx['first_step_s']:.2f} s after {jx['compile_s']:.2f} s of compilation"
    )
    print(
        "losses of the first steps (same weights and batches): transformers "
        f"{[round(v, 6) for v in pt['losses']]}, jaxlab {[round(v, 6) for v in jx['losses']]}; "
        f"max |difference| {max_loss_diff:.3g}"
    )
    step_flops = step_matmul_flops(hf, batch, seq)
    peak_rate = max(matmul_rates.values())
    floor_s = step_flops / peak_rate
    compute_bound = dict(
        step_matmul_flops=step_flops,
        matmul_size=matmul_size,
        matmul_peak_flop_s=matmul_rates,
        step_floor_s=floor_s,
        fraction_of_peak={s: step_flops / r["step_median_s"] / peak_rate for s, r in sides.items()},
        ratio_bound=pt["step_median_s"] / floor_s,
    )
    print(
        f"compute bound: the step's matrix products (at least {step_flops / 1e9:.1f} GFLOP) at "
        f"the better measured float32 rate of a [{matmul_size}, {matmul_size}] product ("
        + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in matmul_rates.items())
        + f" GFLOP/s) take {floor_s * 1e3:.0f} ms: transformers runs at "
        f"{compute_bound['fraction_of_peak']['torch']:.0%} of that rate, jaxlab at "
        f"{compute_bound['fraction_of_peak']['jaxlab']:.0%}; at that rate no float32 step "
        f"could beat transformers' tok/s by more than {compute_bound['ratio_bound']:.2f}x"
    )
    if _BREAKDOWN.value:
        print()
        print(
            "| part of the step | transformers ms | jaxlab ms | time ratio (jaxlab/transformers) |"
        )
        print("|---|---:|---:|---:|")
        parts = [
            ("full step", pt["step_median_s"], jx["step_median_s"]),
            *(
                (k.replace("_", " "), pt["breakdown_median_s"][k], jx["breakdown_median_s"][k])
                for k in ("forward_loss", "forward_backward", "clip_and_update")
            ),
        ]
        for part, a, b in parts:
            print(f"| {part} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.2f}x |")
    for s, r in sides.items():
        if r["cpu_busy_before"] is not None and r["cpu_busy_before"] > 0.2:
            print(
                f"WARNING: the CPUs were {r['cpu_busy_before']:.0%} busy just before the {s} side "
                "ran; its timings are likely distorted."
            )

    wall = time.perf_counter() - wall_start
    env["load_average_at_end"] = os.getloadavg()
    result = dict(
        quick=FLAGS.quick,
        repeats=repeats,
        model=dict(hf.to_diff_dict(), dtype="float32"),
        setup=dict(
            batch=batch,
            seq_len=seq,
            num_layers=config.model.num_layers,
            tokens_per_step=tokens_per_step,
            loss_steps=_LOSS_STEPS.value,
        ),
        optimizer={k: config.optim[k] for k in OPTIM},
        rows=[
            dict(
                name=name,
                transformers_tok_s=pt_tps,
                jaxlab_tok_s=jx_tps,
                ratio=jx_tps / pt_tps,
                transformers_median_s=pt["step_median_s"],
                jaxlab_median_s=jx["step_median_s"],
            )
        ],
        memory=dict(
            peak_rss_mib=peak,
            peak_rss_increase_mib=increase,
            ratio_peak=peak["jaxlab"] / peak["torch"],
            ratio_increase=increase["jaxlab"] / increase["torch"],
        ),
        losses=dict(transformers=pt["losses"], jaxlab=jx["losses"], max_abs_diff=max_loss_diff),
        compute_bound=compute_bound,
        sides=sides,
        environment=env,
        wall_s=wall,
    )
    write_json(FLAGS.out, result)
    print(f"wrote {FLAGS.out} (total {wall:.1f} s)")


if __name__ == "__main__":
    app.run(main)
