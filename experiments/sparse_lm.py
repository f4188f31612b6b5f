"""Dense vs dynamic sparse attention on the tiny LM: held-out loss at equal steps and data.

Trains ``configs/sparse_lm.py``'s setup (512-token windows of the embedded corpus) with dense
causal attention, hash-sparse attention (8 buckets per head) and QK-sparse attention (half the
queries and keys kept), and reports held-out loss, perplexity and training throughput beside the
paper's claim (no perplexity loss at 2.0x/3.3x faster training at 8k/16k tokens, on GPUs with the
Pallas-class kernels). Writes ``REPORT.md``, ``results.json`` and ``loss.png`` in ``--workdir``.

On a CPU the sparse variants run the XLA paths, so throughput here says little about the kernels:
``make bench-gpu`` measures those.

  python -m experiments.sparse_lm --workdir=runs/sparse_lm [--config.num_steps=300]

``--config`` (default ``configs/sparse_lm.py``) is the hash variant's config; the dense run drops
its ``model.sparse_attention`` and the qk run changes its ``kind``. An overridden
``--config.num_steps`` rescales evaluations and warm-ups (``lm_tiny.with_num_steps``); shorter
windows at the same tokens per batch are ``--config.seq_len=64 --config.batch_size=32``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import run_config
from jaxlab.eval import report
from jaxlab.eval.plots import plot_loss_curves
from jaxlab.train import loop

flags.DEFINE_string("workdir", "runs/sparse_lm", "Output directory.")
config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "..", "configs", "sparse_lm.py"),
    "The sparse (hash) run's configuration; the other variants are derived from it.",
    lock_config=True,
)
FLAGS = flags.FLAGS

VARIANTS = (None, "hash", "qk")  # dense, then the two sparse kinds


def variant_name(config: ml_collections.ConfigDict) -> str:
    """The row label, from the settings the run really used."""
    sparse = config.model.sparse_attention
    if sparse is None:
        return "dense"
    if sparse.kind == "hash":
        return f"hash, {sparse.num_buckets} buckets"
    return f"qk, keep {sparse.keep_rate}"


def make_config(base: ml_collections.ConfigDict, variant: str | None) -> ml_collections.ConfigDict:
    """``base`` with dense attention (``variant`` None) or sparse attention of kind ``variant``."""
    config = copy.deepcopy(base)
    with config.unlocked():
        if variant is None:
            config.model.sparse_attention = None
        else:
            config.model.sparse_attention.kind = variant
    return config


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    workdir, base = FLAGS.workdir, run_config.from_flag(FLAGS["config"])
    os.makedirs(workdir, exist_ok=True)
    results, curves = {}, {}
    for variant in VARIANTS:
        run = os.path.join(workdir, variant or "dense")
        config = make_config(base, variant)
        name = variant_name(config)
        print(f"--- {name}: {run}")
        start = time.perf_counter()
        summary = loop.train_and_evaluate(config, run)
        elapsed = time.perf_counter() - start
        records = loop.read_metrics(run)
        curves[name] = records
        tokens = sum(r["tokens"] for r in records if "tokens" in r)
        results[name] = dict(
            eval_loss=summary.eval["eval_loss"],
            eval_perplexity=summary.eval["eval_perplexity"],
            # Whole run: compilation and evaluations included.
            tokens_per_s=tokens / elapsed,
            steps=config.num_steps,
            seq_len=config.seq_len,
            batch_size=config.batch_size,
        )
    plot_loss_curves(
        curves,
        os.path.join(workdir, "loss.png"),
        "tiny LM, dense vs sparse attention (same data and steps)",
    )
    dense = results["dense"]
    cfg = next(iter(results.values()))

    def speed(r):
        return f"{r['tokens_per_s']:,.0f}"

    def speed_ratio(r):
        return f"{r['tokens_per_s'] / dense['tokens_per_s']:.2f}x"

    def perplexity_ratio(r):
        return r["eval_perplexity"] / dense["eval_perplexity"]

    sparse = {n: r for n, r in results.items() if r is not dense}
    doc = report.Report("Dense vs dynamic sparse attention on the tiny LM").add(
        f"{cfg['steps']} steps of {cfg['batch_size']} x {cfg['seq_len']} tokens of the embedded "
        f"corpus, same data order, optimizer and initialisation for every variant; "
        f"{jax.default_backend()} backend (the sparse variants run "
        f"{'the Pallas kernels' if jax.default_backend() == 'gpu' else 'the XLA paths'}).",
    )
    doc.table(
        ("attention", "held-out loss", "perplexity", "vs dense", "tokens/s (whole run)")
        + ("vs dense",),
        [
            (
                n,
                f"{r['eval_loss']:.4f}",
                f"{r['eval_perplexity']:.3f}",
                f"{perplexity_ratio(r):.3f}x",
                speed(r),
                speed_ratio(r),
            )
            for n, r in results.items()
        ],
        align="lrrrrr",
    )
    doc.add(
        "Paper (Pagliardini et al. 2023, abstract): no perplexity loss with 2.0x / 3.3x faster "
        "training at 8k / 16k tokens (GPT-2-small-like models on OpenWebText2, A100 kernels).",
    )
    claims = [
        report.Claim(
            f"no perplexity loss ({n})",
            "perplexity 1.00x dense",
            f"{perplexity_ratio(r):.3f}x dense",
            report.verdict(perplexity_ratio(r) <= 1.01),
        )
        for n, r in sparse.items()
    ] + [
        report.Claim(
            "2.0x / 3.3x faster training at 8k / 16k tokens",
            "2.0x / 3.3x",
            ", ".join(f"{n}: {speed_ratio(r)}" for n, r in sparse.items())
            + f" at {cfg['seq_len']} tokens on {jax.default_backend()} (short windows; the GPU "
            "kernels are timed by make bench-gpu)",
            report.verdict(None),
        )
    ]
    results["claims"] = [dataclasses.asdict(c) for c in claims]
    doc.claims(
        claims,
        rule="the perplexity claim holds for a variant whose held-out perplexity is at most "
        "1.01x dense's; the speed claim needs 8k-16k-token windows on a GPU, so it is not "
        "tested here.",
    )
    doc.images(("loss.png", "loss curves"))
    print(report.write(workdir, doc, results), end="")


if __name__ == "__main__":
    jax.config.config_with_absl()
    app.run(main)
