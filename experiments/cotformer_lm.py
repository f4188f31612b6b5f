"""CoTFormer against BUT and standard Transformers at CPU scale, on the embedded corpus.

Trains ``configs/cotformer_lm.py``'s setup, with the same data, steps and optimizer, as: standard
Transformers of depth L and 2L, the Block Universal Transformer (BUT) Lx3, the CoTFormer Lx3, an
LN-CoTFormer with reserved blocks, and the adaptive LN-CoTFormer (Mixture of Repeats, trained with
budgets drawn per batch) evaluated at 5 budgets, each over ``experiment.seeds``. Reports held-out
perplexity (mean and max-min spread over seeds) beside the paper's Table 1/2 numbers, a
perplexity-vs-MACs plot, and greedy decode throughput and decoding-cache bytes against standard
Transformers of the same parameter count (depth L) and about the same MACs (depth 3L, untrained:
speed and memory do not depend on the weights). Writes ``REPORT.md``, ``results.json`` and
``perplexity_vs_macs.png`` in ``--workdir``.

  python -m experiments.cotformer_lm --workdir=runs/cotformer_lm [--config.num_steps=300]
      [--config.experiment.seeds=0,1,2]

``--config`` (default ``configs/cotformer_lm.py``): L is ``model.n_layer_mid``, the repeats
``model.n_repeat``; every arm sets its own blocks and CoTFormer options, and the standard arms
are Llama models with the same block fields. An overridden ``--config.num_steps`` rescales
evaluations and warm-ups (``lm_tiny.with_num_steps``).
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

from configs.cotformer_lm import BLOCK_FIELDS, standard_model
from experiments import run_config
from experiments.bench.common import time_calls
from jaxlab import models
from jaxlab.eval import report
from jaxlab.eval.plots import figure
from jaxlab.infer import generate
from jaxlab.models.cotformer import CoTFormerConfig, macs
from jaxlab.train import loop

flags.DEFINE_string("workdir", "runs/cotformer_lm", "Output directory.")
flags.DEFINE_integer("decode_batch", 8, "Rows generated at once in the throughput measurement.")
flags.DEFINE_integer(
    "decode_tokens", 128, "Tokens generated per row in the throughput measurement."
)
config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "..", "configs", "cotformer_lm.py"),
    "The CoTFormer's configuration (model.n_layer_mid is L); the other arms are derived from it.",
    lock_config=True,
)
FLAGS = flags.FLAGS

# The paper's validation perplexities on OWT2 (brief section 3.3; ICLR 2025 PDF, checked there),
# for the analogue of each arm: 12-layer models of Table 1 at x3, Table 2's LN-CoTFormer and the
# adaptive model at full budget (Sec. 5). Different data, width and steps from ours.
PAPER = {
    "standard L": "28.39 (12x1, Table 1)",
    "standard 2L": "25.93 (24x1, Table 1)",
    "BUT": "27.47 (12x3, Table 1)",
    "CoTFormer": "27.07 (12x3, Table 1)",
    "LN-CoTFormer": "24.11 (2->21x5->1, Table 2)",
    "adaptive": "23.83 at full budget (60k steps, Sec. 5)",
}


def default_budgets(n_repeat: int) -> tuple[tuple[float, ...], ...]:
    """5 budgets from no extra repeat to full depth: at level g in (0, 1/4, .., 1) the extra
    repeats share ``g * (n_repeat - 1)`` repeats' worth of tokens, filled in order (so each
    budget is non-increasing, as :func:`jaxlab.models.cotformer.budget_counts` needs)."""
    extra = n_repeat - 1
    levels = (0.0, 0.25, 0.5, 0.75, 1.0)
    return tuple(
        tuple(float(np.clip(g * extra - r, 0.0, 1.0)) for r in range(extra)) for g in levels
    )


def arm_models(base) -> dict[str, tuple[str, dict]]:
    """``{arm name: (paper key, model fields)}``; the fields replace ``base.model``'s."""
    m, e = base.model, base.experiment
    depth, repeats = m.n_layer_mid, m.n_repeat
    begin, end = e.ln_layer_begin, e.ln_layer_end
    fixed = dict(adaptive=False, routing="threshold")
    cotformer = dict(fixed, n_layer_begin=0, n_layer_end=0, ln_mid=False, depth_embedding="none")
    ln = dict(n_layer_begin=begin, n_layer_end=end, ln_mid=True)
    reserved = f"{begin}->{depth}x{repeats}->{end}"
    return {
        f"Transformer L={depth}": ("standard L", standard_model(m, depth)),
        f"Transformer L={2 * depth}": ("standard 2L", standard_model(m, 2 * depth)),
        f"BUT {depth}x{repeats}": ("BUT", dict(cotformer, cross_repeat=False)),
        f"CoTFormer {depth}x{repeats}": ("CoTFormer", dict(cotformer, cross_repeat=True)),
        f"LN-CoTFormer {reserved}": (
            "LN-CoTFormer",
            dict(ln, **fixed, cross_repeat=True, depth_embedding="none"),
        ),
        f"adaptive LN-CoTFormer {reserved}": (
            "adaptive",
            dict(ln, cross_repeat=True, depth_embedding="linear", adaptive=True, routing="sample"),
        ),
    }


def make_config(base, fields: dict, seed: int):
    """``base`` (without its ``experiment`` block) with model ``fields`` and init ``seed``."""
    config = copy.deepcopy(base)
    with config.unlocked():
        del config["experiment"]
        if "num_layers" not in fields:
            config.model.update(fields)
        else:
            config.model = ml_collections.ConfigDict(fields)
        config.seed = seed
    return config


def model_macs(model_config, seq_len: int, budget=None) -> int:
    """Multiply-accumulates of one row's forward pass; a standard Transformer counts as a
    CoTFormer with one pass through all its blocks (the same blocks, see ``macs``)."""
    if isinstance(model_config, CoTFormerConfig):
        return macs(model_config, seq_len, budget)
    c = model_config
    fields = {k: getattr(c, k) for k in BLOCK_FIELDS}
    return macs(CoTFormerConfig(**fields, n_layer_mid=c.num_layers, n_repeat=1), seq_len)


def cache_bytes(model_config, batch: int, max_len: int) -> int:
    """Bytes of the decoding cache for ``batch`` rows of ``max_len`` tokens (shapes only)."""
    shapes = jax.eval_shape(lambda: models.make_cache(model_config, batch, max_len))
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)))


def decode_stats(exp, params, batch: int, new_tokens: int) -> dict[str, float]:
    """Greedy decode tokens/s (median of 3) and the cache bytes of that generation."""
    model = nnx.merge(exp.graphdef, params)
    if getattr(model, "routing", None) is not None:
        model.routing = "threshold"  # the causal rule: the only one that decodes token by token
    prompts = np.full((batch, 16), exp.tokenizer.bos_id, np.int32)

    def run():
        return generate(model, prompts, max_new_tokens=new_tokens, stop_tokens=()).tokens

    tokens_per_s = batch * new_tokens / time_calls(run, repeats=3).median
    return dict(
        decode_tokens_per_s=tokens_per_s,
        cache_bytes=cache_bytes(exp.model_config, batch, 16 + new_tokens),
    )


def residual_rms(exp, params) -> list[float]:
    """Root mean square of every residual (embedding, reserved blocks, repeats) over the first
    held-out batch: how much each stage changes the stream (a norm after a repeat resets it)."""
    model = nnx.merge(exp.graphdef, params)
    tokens = loop.eval_sets(exp, exp.components)[""][0]["inputs"]
    _, hidden = model(jax.numpy.asarray(tokens), return_hidden=True)
    return [float(np.sqrt(np.mean(np.square(np.asarray(h, np.float64))))) for h in hidden.residuals]


def evaluate_budget(summary, budget) -> float:
    """Held-out perplexity of a trained adaptive model run at ``budget`` (a routing tuple)."""
    exp = summary.experiment
    model = nnx.merge(exp.graphdef, summary.state.params)
    model.routing = tuple(budget)
    graphdef, _ = nnx.split(model)
    exp = dataclasses.replace(exp, graphdef=graphdef)
    _, eval_step = loop.compile_steps(exp)
    data = loop.eval_sets(exp, exp.components)
    return loop.evaluate(exp, summary.state.params, data, eval_step)["eval_perplexity"]


def spread_stats(values) -> dict:
    values = [float(v) for v in values]
    return dict(per_seed=values, mean=float(np.mean(values)), spread=max(values) - min(values))


def plot_perplexity_vs_macs(results, path: str, title: str) -> None:
    """Mean perplexity (min-max bars) against MACs: a point per fixed arm, the adaptive curve."""
    fig, ax = figure((6, 4))
    for i, (name, r) in enumerate(results["arms"].items()):
        if "budgets" in r:
            points = r["budgets"]
            x = [p["macs"] for p in points]
            y = [p["perplexity"]["mean"] for p in points]
            lo = [p["perplexity"]["mean"] - min(p["perplexity"]["per_seed"]) for p in points]
            hi = [max(p["perplexity"]["per_seed"]) - p["perplexity"]["mean"] for p in points]
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", color=f"C{i}", label=f"{name} (budgets)")
        else:
            p = r["perplexity"]
            yerr = [[p["mean"] - min(p["per_seed"])], [max(p["per_seed"]) - p["mean"]]]
            ax.errorbar([r["macs"]], [p["mean"]], yerr=yerr, marker="s", color=f"C{i}", label=name)
    ax.set_xlabel("MACs per sequence (forward)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    report.save_figure(fig, os.path.dirname(path), os.path.basename(path))


def verdict_beats(a: dict, b: dict) -> tuple[bool, float]:
    """Whether mean perplexity ``a`` is lower than ``b``'s by more than the seed spread (the
    larger max-min over seeds of the two); also returns that spread."""
    spread = max(a["spread"], b["spread"])
    return b["mean"] - a["mean"] > spread, spread


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    workdir, base = FLAGS.workdir, run_config.from_flag(FLAGS["config"])
    seeds = tuple(int(s) for s in base.experiment.seeds)
    if not seeds:
        raise ValueError(f"config.experiment.seeds must name at least one seed, got {seeds!r}")
    budgets = tuple(tuple(float(f) for f in b) for b in base.experiment.budgets) or (
        default_budgets(base.model.n_repeat)
    )
    os.makedirs(workdir, exist_ok=True)
    arms = arm_models(base)
    results = dict(
        seeds=list(seeds), seq_len=base.seq_len, steps=base.num_steps, arms={}, paper=PAPER
    )
    for name, (key, fields) in arms.items():
        perplexities, by_budget, row = [], [], {}
        for seed in seeds:
            run = os.path.join(workdir, name.replace(" ", "_").replace("=", ""), f"seed{seed}")
            print(f"--- {name}, seed {seed}: {run}")
            summary = loop.train_and_evaluate(make_config(base, fields, seed), run)
            exp = summary.experiment
            if key == "adaptive":
                by_budget.append([evaluate_budget(summary, b) for b in budgets])
            perplexities.append(summary.eval["eval_perplexity"])
            if seed == seeds[0]:
                params = sum(x.size for x in jax.tree.leaves(summary.state.params))
                row.update(
                    paper_key=key,
                    parameters=int(params),
                    macs=model_macs(exp.model_config, base.seq_len),
                    residual_rms=dict(
                        init=residual_rms(exp, loop.init_state(exp).params),
                        trained=residual_rms(exp, summary.state.params),
                    ),
                    **decode_stats(
                        exp, summary.state.params, FLAGS.decode_batch, FLAGS.decode_tokens
                    ),
                )
        row["perplexity"] = spread_stats(perplexities)
        if key == "adaptive":
            row["budgets"] = [
                dict(
                    budget=list(b),
                    macs=model_macs(exp.model_config, base.seq_len, b),
                    perplexity=spread_stats([p[i] for p in by_budget]),
                )
                for i, b in enumerate(budgets)
            ]
        results["arms"][name] = row

    # The same-MACs reference for decoding: a standard Transformer of depth 3L, untrained.
    depth, repeats = base.model.n_layer_mid, base.model.n_repeat
    deep_name = f"Transformer L={repeats * depth} (untrained)"
    deep_fields = standard_model(base.model, repeats * depth)
    deep = loop.build_experiment(make_config(base, deep_fields, seeds[0]))
    deep_params = loop.init_state(deep).params
    results["decode_reference"] = {
        deep_name: dict(
            parameters=int(sum(x.size for x in jax.tree.leaves(deep_params))),
            macs=model_macs(deep.model_config, base.seq_len),
            **decode_stats(deep, deep_params, FLAGS.decode_batch, FLAGS.decode_tokens),
        )
    }

    names = list(arms)
    standard, standard2, but, cot, ln, adaptive = names
    r = results["arms"]
    plot_perplexity_vs_macs(
        results,
        os.path.join(workdir, "perplexity_vs_macs.png"),
        f"held-out perplexity vs MACs, {base.seq_len}-token rows (bars: min-max over seeds)",
    )
    doc = report.Report("CoTFormer, BUT and standard Transformers on the tiny LM").add(
        f"{base.num_steps} steps of {base.batch_size} x {base.seq_len} tokens of the embedded "
        f"corpus, the same data, optimizer and schedule for every arm (`configs/cotformer_lm.py`), "
        f"seeds {list(seeds)} (parameter initialisation); perplexity is the mean over seeds with "
        f"the max-min spread. MACs: one row's forward pass (`jaxlab.models.cotformer.macs`). "
        f"Decode: greedy generation of {FLAGS.decode_tokens} tokens after 16 for "
        f"{FLAGS.decode_batch} rows on {jax.default_backend()} (seed {seeds[0]}; the adaptive "
        f"model decodes with its causal threshold rule); cache: the decoding cache's bytes. The "
        "adaptive model's row is evaluated with its training rule (a budget drawn per batch), "
        "its curve below at fixed budgets.",
    )

    def ppl(p):
        return f"{p['mean']:.3f} ± {p['spread'] / 2:.3f}"

    doc.table(
        ("model", "parameters", "MACs", "perplexity (mean ± half spread)", "paper (OWT2)"),
        [
            (
                n,
                f"{a['parameters']:,}",
                f"{a['macs']:,}",
                ppl(a["perplexity"]),
                PAPER[a["paper_key"]],
            )
            for n, a in r.items()
        ],
        align="lrrrl",
    )
    doc.section("Adaptive model at 5 budgets")
    doc.table(
        ("budget (fraction per extra repeat)", "MACs", "perplexity (mean ± half spread)"),
        [
            (str(tuple(b["budget"])), f"{b['macs']:,}", ppl(b["perplexity"]))
            for b in r[adaptive]["budgets"]
        ],
        align="lrr",
    )
    doc.add(
        "Paper (Fig. 4): a perplexity-vs-MACs curve with no percentage saving; the 20-30% and "
        "30-50% compute savings quoted for it come from summaries [secondary, not in the paper]."
    )
    doc.section("Residual scale")
    doc.add(
        "Root mean square of the residual stream after the embedding, each reserved block and "
        "each repeat (standard arms: each layer), on the first held-out batch, seed "
        f"{seeds[0]}, at initialisation and after training. The LN-CoTFormer's norm after every "
        "repeat sets the stream to the norm's scale (1 at initialisation); the other arms carry "
        "it at the scale the embedding and the blocks' updates give it.",
    )

    def scales(values):
        return " → ".join(f"{v:.2f}" for v in values)

    doc.table(
        ("model", "at initialisation", "after training"),
        [
            (n, scales(a["residual_rms"]["init"]), scales(a["residual_rms"]["trained"]))
            for n, a in r.items()
        ],
        align="lll",
    )
    doc.section("Decoding")
    rows = {**{n: r[n] for n in (standard, cot)}, **results["decode_reference"]}
    rows.update({n: r[n] for n in names if n not in rows})
    cot_speed = r[cot]["decode_tokens_per_s"]
    doc.table(
        ("model", "decode tokens/s", "vs CoTFormer", "cache bytes", "vs CoTFormer"),
        [
            (
                n,
                f"{a['decode_tokens_per_s']:,.0f}",
                f"{a['decode_tokens_per_s'] / cot_speed:.2f}x",
                f"{a['cache_bytes']:,}",
                f"{a['cache_bytes'] / r[cot]['cache_bytes']:.2f}x",
            )
            for n, a in rows.items()
        ],
        align="lrrrr",
    )

    # Verdict rules, fixed before the numbers are compared.
    beats, beats_spread = verdict_beats(r[cot]["perplexity"], r[but]["perplexity"])
    ln_ppl, deep_ppl = r[ln]["perplexity"], r[standard2]["perplexity"]
    ln_spread = max(ln_ppl["spread"], deep_ppl["spread"])
    ln_matches = ln_ppl["mean"] <= deep_ppl["mean"] + ln_spread
    lowest, full = r[adaptive]["budgets"][0], r[adaptive]["budgets"][-1]
    budget_helps, budget_spread = verdict_beats(full["perplexity"], lowest["perplexity"])

    claims = [
        report.Claim(
            f"{cot} beats {but}",
            "27.07 vs 27.47 (12x3), 24.85 vs 25.19 (24x3), Table 1",
            f"{r[cot]['perplexity']['mean']:.3f} vs {r[but]['perplexity']['mean']:.3f}, seed "
            f"spread {beats_spread:.3f}",
            report.verdict(beats),
        ),
        report.Claim(
            f"{ln} matches {standard2}",
            "LN-CoTFormer 24.11 vs standard 48x1 24.17, Table 2",
            f"{ln_ppl['mean']:.3f} vs {deep_ppl['mean']:.3f}, seed spread {ln_spread:.3f}",
            report.verdict(ln_matches),
        ),
        report.Claim(
            f"{adaptive}: a larger budget lowers perplexity",
            "perplexity falls with MACs, Fig. 4 (no number given)",
            f"{full['perplexity']['mean']:.3f} at {tuple(full['budget'])} vs "
            f"{lowest['perplexity']['mean']:.3f} at {tuple(lowest['budget'])}, seed spread "
            f"{budget_spread:.3f}",
            report.verdict(budget_helps),
        ),
    ]
    results["claims"] = [dataclasses.asdict(c) for c in claims]
    doc.claims(
        claims,
        rule="a model 'beats' another (CoTFormer vs BUT; the adaptive model's full budget vs its "
        "lowest) when its mean perplexity is lower by more than the seed spread, the larger "
        "max-min over seeds of the two; otherwise the claim does not hold at this scale (the "
        "gap is within the noise or reversed). LN-CoTFormer 'matches' the 2L Transformer when "
        "its mean perplexity is at most the 2L mean plus that spread.",
    )
    doc.images(("perplexity_vs_macs.png", "perplexity vs MACs"))
    print(report.write(workdir, doc, results), end="")


if __name__ == "__main__":
    jax.config.config_with_absl()
    app.run(main)
