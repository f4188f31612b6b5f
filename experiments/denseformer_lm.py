"""DenseFormer's depth comparison at CPU scale, on the embedded corpus with equal steps.

Trains ``configs/denseformer_lm.py``'s setup as: a baseline Transformer of depth L, a 1x1
DenseFormer of depth L, a dilated and periodic 2x2 DenseFormer of depth L, and a baseline of depth
1.5 L. Reports held-out losses, the learned DWA weights as the paper's heatmap, and generation
throughput of the depth-L DenseFormer against the depth-1.5L baseline (the paper's claim:
DenseFormer matches a deeper model and is faster than it). Writes ``REPORT.md`` in ``--workdir``.

  python -m experiments.denseformer_lm --workdir=runs/denseformer_depth
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from configs import denseformer_lm, lm_tiny
from jaxlab.eval.plots import plot_dwa_weights
from jaxlab.infer import generate
from jaxlab.models.denseformer import DWAConfig, dwa_positions
from jaxlab.train import loop

flags.DEFINE_string("workdir", "runs/denseformer_depth", "Output directory.")
flags.DEFINE_integer("num_steps", 0, "Steps per run (0 = the config's).")
flags.DEFINE_integer("depth", 4, "L: the depth of the baseline and of the DenseFormers.")
flags.DEFINE_integer("decode_batch", 8, "Rows generated at once in the throughput measurement.")
flags.DEFINE_integer(
    "decode_tokens", 128, "Tokens generated per row in the throughput measurement."
)
FLAGS = flags.FLAGS


def variants(depth: int) -> dict[str, tuple[int, dict | None]]:
    deeper = (3 * depth + 1) // 2
    return {
        f"Transformer L={depth}": (depth, None),
        f"DenseFormer 1x1 L={depth}": (depth, dict(dilation=1, period=1)),
        f"DenseFormer 2x2 L={depth}": (depth, dict(dilation=2, period=2)),
        f"Transformer L={deeper}": (deeper, None),
    }


def make_config(depth: int, dwa: dict | None, num_steps: int):
    config = denseformer_lm.get_config()
    config.model.num_layers = depth
    config.model.dwa = None if dwa is None else ml_collections.ConfigDict(dwa)
    if num_steps:
        lm_tiny.with_num_steps(config, num_steps)
    return config


def decode_tokens_per_s(summary, batch: int, new_tokens: int) -> float:
    exp = summary.experiment
    model = nnx.merge(exp.graphdef, summary.state.params)
    prompts = np.full((batch, 16), exp.tokenizer.bos_id, np.int32)

    def run():
        return jax.block_until_ready(
            generate(model, prompts, max_new_tokens=new_tokens, stop_tokens=()).tokens
        )

    run()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return batch * new_tokens / float(np.median(times))


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    workdir, depth = FLAGS.workdir, FLAGS.depth
    os.makedirs(workdir, exist_ok=True)
    results = {}
    for name, (layers, dwa) in variants(depth).items():
        run = os.path.join(workdir, name.replace(" ", "_").replace("=", ""))
        print(f"--- {name}: {run}")
        summary = loop.train_and_evaluate(make_config(layers, dwa, FLAGS.num_steps), run)
        params = sum(x.size for x in jax.tree.leaves(summary.state.params))
        results[name] = dict(
            eval_loss=summary.eval["eval_loss"],
            parameters=int(params),
            decode_tokens_per_s=decode_tokens_per_s(
                summary, FLAGS.decode_batch, FLAGS.decode_tokens
            ),
        )
        if dwa is not None:
            exp = summary.experiment
            model = nnx.merge(exp.graphdef, summary.state.params)
            matrix = model.dwa.weight_matrix()
            results[name]["dwa_weights"] = np.where(np.isnan(matrix), None, matrix).tolist()
            tag = f"{dwa['dilation']}x{dwa['period']}"
            plot_dwa_weights(
                matrix,
                f"learned DWA weights, {tag} DenseFormer, L={layers}",
                os.path.join(workdir, f"dwa_weights_{tag}.png"),
                dwa_positions(layers, DWAConfig(**dwa)),
            )

    names = list(results)
    dense, deep = names[1], names[3]
    speedup = results[dense]["decode_tokens_per_s"] / results[deep]["decode_tokens_per_s"]
    lines = [
        "# DenseFormer depth comparison on the tiny LM",
        "",
        "Same data, steps and optimizer for every model (`configs/denseformer_lm.py`); decode "
        f"throughput: greedy generation of {FLAGS.decode_tokens} tokens for "
        f"{FLAGS.decode_batch} rows on {jax.default_backend()}.",
        "",
        "| model | parameters | held-out loss | decode tokens/s |",
        "|---|---:|---:|---:|",
        *(
            f"| {n} | {r['parameters']:,} | {r['eval_loss']:.4f} | "
            f"{r['decode_tokens_per_s']:,.0f} |"
            for n, r in results.items()
        ),
        "",
        f"{dense} decodes at {speedup:.2f}x the speed of {deep}; held-out loss "
        f"{results[dense]['eval_loss']:.4f} vs "
        f"{results[deep]['eval_loss']:.4f}.",
        "",
        "![DWA weights 1x1](dwa_weights_1x1.png) ![DWA weights 2x2](dwa_weights_2x2.png)",
    ]
    with open(os.path.join(workdir, "REPORT.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("\n".join(lines))


if __name__ == "__main__":
    jax.config.config_with_absl()
    app.run(main)
