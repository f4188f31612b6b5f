"""DenseFormer's depth comparison at CPU scale, on the embedded corpus with equal steps.

Trains ``configs/denseformer_lm.py``'s setup as: a baseline Transformer of depth L, a 1x1
DenseFormer of depth L, a dilated and periodic 2x2 DenseFormer of depth L, and a baseline of depth
1.5 L. Reports held-out losses, the learned DWA weights as the paper's heatmap, and generation
throughput of the depth-L DenseFormer against the depth-1.5L baseline (the paper's claim:
DenseFormer matches a deeper model and is faster than it). Writes ``REPORT.md`` in ``--workdir``.

  python -m experiments.denseformer_lm --workdir=runs/denseformer_depth [--config.num_steps=200]

``--config`` (default ``configs/denseformer_lm.py``) is every run's configuration: L is its
``model.num_layers``, and each run sets its own depth and ``model.dwa``. An overridden
``--config.num_steps`` rescales evaluations and warm-ups (``lm_tiny.with_num_steps``).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from experiments import run_config
from experiments.bench.common import time_calls
from jaxlab.eval import report
from jaxlab.eval.plots import plot_dwa_weights
from jaxlab.infer import generate
from jaxlab.models.denseformer import DWAConfig, dwa_positions
from jaxlab.train import loop

flags.DEFINE_string("workdir", "runs/denseformer_depth", "Output directory.")
flags.DEFINE_integer("decode_batch", 8, "Rows generated at once in the throughput measurement.")
flags.DEFINE_integer(
    "decode_tokens", 128, "Tokens generated per row in the throughput measurement."
)
config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "..", "configs", "denseformer_lm.py"),
    "Every run's configuration; model.num_layers is L, the depth of the baseline and DenseFormers.",
    lock_config=True,
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


def make_config(base, depth: int, dwa: dict | None):
    config = copy.deepcopy(base)
    with config.unlocked():
        config.model.num_layers = depth
        config.model.dwa = None if dwa is None else ml_collections.ConfigDict(dwa)
    return config


def decode_tokens_per_s(summary, batch: int, new_tokens: int) -> float:
    exp = summary.experiment
    model = nnx.merge(exp.graphdef, summary.state.params)
    prompts = np.full((batch, 16), exp.tokenizer.bos_id, np.int32)

    def run():
        return generate(model, prompts, max_new_tokens=new_tokens, stop_tokens=()).tokens

    return batch * new_tokens / time_calls(run, repeats=3).median


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    workdir, base = FLAGS.workdir, run_config.from_flag(FLAGS["config"])
    depth = base.model.num_layers
    os.makedirs(workdir, exist_ok=True)
    results = {}
    for name, (layers, dwa) in variants(depth).items():
        run = os.path.join(workdir, name.replace(" ", "_").replace("=", ""))
        print(f"--- {name}: {run}")
        summary = loop.train_and_evaluate(make_config(base, layers, dwa), run)
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
    dense_loss, deep_loss = results[dense]["eval_loss"], results[deep]["eval_loss"]
    doc = report.Report("DenseFormer depth comparison on the tiny LM").add(
        "Same data, steps and optimizer for every model (`configs/denseformer_lm.py`); decode "
        f"throughput: greedy generation of {FLAGS.decode_tokens} tokens for "
        f"{FLAGS.decode_batch} rows on {jax.default_backend()}.",
    )
    doc.table(
        ("model", "parameters", "held-out loss", "decode tokens/s"),
        [
            (n, f"{r['parameters']:,}", f"{r['eval_loss']:.4f}", f"{r['decode_tokens_per_s']:,.0f}")
            for n, r in results.items()
        ],
        align="lrrr",
    )
    doc.add(
        f"{dense} decodes at {speedup:.2f}x the speed of {deep}; held-out loss "
        f"{dense_loss:.4f} vs "
        f"{deep_loss:.4f}.",
    )
    claims = [
        report.Claim(
            f"{dense} matches the held-out loss of {deep}",
            "equal perplexity to a 1.5x deeper Transformer",
            f"loss {dense_loss:.4f} vs {deep_loss:.4f}",
            report.verdict(dense_loss <= 1.01 * deep_loss),
        ),
        report.Claim(
            f"{dense} is faster than {deep}",
            "faster inference than the deeper Transformer",
            f"{speedup:.2f}x its decode speed",
            report.verdict(speedup > 1.0),
        ),
    ]
    results["claims"] = [dataclasses.asdict(c) for c in claims]
    doc.claims(
        claims,
        rule="the loss claim holds when the DenseFormer's held-out loss is at most 1.01x the "
        "deeper Transformer's; the speed claim holds when its decode throughput is higher.",
    )
    doc.images(
        ("dwa_weights_1x1.png", "DWA weights 1x1"), ("dwa_weights_2x2.png", "DWA weights 2x2")
    )
    print(report.write(workdir, doc, results), end="")


if __name__ == "__main__":
    jax.config.config_with_absl()
    app.run(main)
