"""DoGE against uniform and DoReMi domain weights.

Writes ``REPORT.md``, ``results.json`` and PNG plots in ``--workdir``:
(1) generated domains with known roles (``jaxlab.mixing.synthetic``): averaged weights per role
    for DoGE-OOD, DoGE-universal and DoReMi; the sign check of DoGE's scores against finite
    differences; the target loss of fresh models trained on each weight vector;
(2) the embedded corpus: standard-library packages as domains and one held-out package as the
    OOD target. A DoGE-OOD proxy and a DoReMi proxy (reference: the uniform run) learn weights
    through the training engine; base models are trained on uniform, DoGE and DoReMi weights
    (``config.data.weights_file``) and compared on per-domain validation perplexity.

  python -m experiments.doge --workdir=runs/doge [--config=configs/doge.py]
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from configs import lm_tiny
from jaxlab.data import pipeline
from jaxlab.eval import plots, report
from jaxlab.mixing import synthetic
from jaxlab.train import loop

flags.DEFINE_string("workdir", "runs/doge", "Output directory.")
config_flags.DEFINE_config_file("config", "configs/doge.py", "Experiment configuration.")
FLAGS = flags.FLAGS
CLAIMS_RULE = (
    "a claim holds when DoGE-OOD's weights give a lower mean (over seeds) loss or perplexity on "
    "the OOD target than both uniform and DoReMi weights; the corpus claim is not measured when "
    "the corpus runs are off (corpus.steps = 0)."
)


def corpus_config(c, seed, *, sources, mixer=None, weights=None, weights_file=""):
    """The LM run of ``c.lm`` on ``sources`` with a mixer, explicit weights or a weights file;
    ``seed`` sets the initialisation and the data order."""
    config = lm_tiny.with_num_steps(copy.deepcopy(c.lm), c.steps)
    config.seed = config.data.seed = seed
    config.data.sources = tuple(f"embedded:{d}" for d in sources)
    config.data.weights = tuple(weights) if weights is not None else ()
    config.data.weights_file = weights_file
    config.eval_per_source = False  # per_domain_perplexity covers every domain, targets included
    if mixer is not None:
        mixer = dict(mixer)
        config.objective.name = mixer.pop("name")
        config.mixer.update(**mixer)
    return config


def per_domain_perplexity(summary, config, domains, eval_batches):
    """Validation perplexity of the run's final model on each domain's held-out documents."""
    exp = summary.experiment
    _, eval_step = loop.compile_steps(exp)
    out = {}
    for domain in domains:
        data = copy.deepcopy(config.data)
        data.sources, data.weights, data.weights_file = (f"embedded:{domain}",), (), ""
        batches = pipeline.eval_batches(
            data, exp.tokenizer, config.seq_len, config.batch_size, eval_batches
        )
        loss = loop.evaluate(exp, summary.state.params, batches, eval_step)["eval_loss"]
        out[domain] = math.exp(loss)
    return out


def corpus_seed(c, workdir, seed):
    """One seed of the corpus workflow: reference/uniform run, DoGE-OOD and DoReMi proxies, base
    models on their weights; per-domain validation perplexity of the three base models."""
    domains, target = tuple(c.domains), c.target
    k = len(domains)
    runs = {}

    def train(name, config):
        print(f"corpus seed {seed}: training {name}", flush=True)
        run_dir = os.path.join(workdir, "corpus", f"seed{seed}", name)
        runs[name] = (loop.train_and_evaluate(config, run_dir), config, run_dir)
        return run_dir

    uniform_dir = train("uniform", corpus_config(c, seed, sources=domains, weights=[1.0] * k))
    doge_dir = train(
        "doge_proxy",
        corpus_config(
            c,
            seed,
            sources=(*domains, target),
            mixer=dict(name="doge", mu=c.mu, target_sources=(target,)),
        ),
    )
    doremi_dir = train(
        "doremi_proxy",
        corpus_config(
            c,
            seed,
            sources=domains,
            mixer=dict(
                name="doremi",
                step_size=c.doremi_step_size,
                smoothing=c.doremi_smoothing,
                reference_workdir=uniform_dir,
            ),
        ),
    )
    weights = {"uniform": dict(zip(domains, [1.0 / k] * k, strict=True))}
    for name, run_dir in (("doge", doge_dir), ("doremi", doremi_dir)):
        weights_file = os.path.join(run_dir, "domain_weights.json")
        with open(weights_file) as f:
            record = json.load(f)
        weights[name] = dict(zip(record["domains"], record["average"], strict=True))
        train(f"base_{name}", corpus_config(c, seed, sources=domains, weights_file=weights_file))
    perplexity = {}
    for name, run in (("uniform", "uniform"), ("doge", "base_doge"), ("doremi", "base_doremi")):
        summary, config, _ = runs[run]
        perplexity[name] = per_domain_perplexity(
            summary, config, (*domains, target), c.eval_batches
        )
    trajectories = {}
    for name in ("doge_proxy", "doremi_proxy"):
        metrics = loop.read_metrics(runs[name][2])
        rows = [m for m in metrics if f"weight_{domains[0]}" in m]
        by_domain = {d: [m[f"weight_{d}"] for m in rows] for d in domains}
        trajectories[name] = dict(steps=[m["step"] for m in rows], weights=by_domain)
    return dict(seed=seed, weights=weights, perplexity=perplexity, trajectories=trajectories)


def corpus(c, workdir):
    """``corpus_seed`` for every seed in ``c.seeds``."""
    return dict(
        seeds=[corpus_seed(c, workdir, seed) for seed in c.seeds],
        domains=list(c.domains),
        target=c.target,
    )


def plot(workdir, synthetic_results, corpus_result):
    first = synthetic_results[0]
    fig, axes = plots.figure((15, 3.8), 1, 3)
    for ax, method in zip(axes, ("doge-ood", "doge-universal", "doremi"), strict=True):
        trajectory = first["trajectories"][method]
        for i, role in enumerate(first["roles"]):
            ax.plot(trajectory[:, i], label=f"domain {i}: {role}")
        ax.set_title(f"synthetic seed {first['seed']}: {method}", fontsize=9)
        ax.set_xlabel("proxy step")
        ax.set_ylabel("domain weight")
        ax.legend(fontsize=7)
    report.save_figure(fig, workdir, "synthetic_weights.png", dpi=110)
    if corpus_result is None:
        return
    fig, axes = plots.figure((11, 3.8), 1, 2)
    first_seed = corpus_result["seeds"][0]
    for ax, (name, t) in zip(axes, first_seed["trajectories"].items(), strict=True):
        for domain, values in t["weights"].items():
            ax.plot(t["steps"], values, label=domain)
        ax.set_title(
            f"corpus {name}, seed {first_seed['seed']} (target {corpus_result['target']})",
            fontsize=9,
        )
        ax.set_xlabel("step")
        ax.set_ylabel("domain weight")
        ax.legend(fontsize=7)
    report.save_figure(fig, workdir, "corpus_weights.png", dpi=110)


def build_report(config, synthetic_results, corpus_result):
    s = config.synthetic
    doc = report.Report("DoGE against uniform and DoReMi weights")
    lines = [
        "## Generated domains (roles: a seeded permutation per seed)",
        "",
        f"MLP {tuple(s.hidden)} proxy, {s.proxy_steps} steps, batch {s.batch_size} per "
        f"domain, Adam {s.learning_rate} cosine to x{s.final_lr_ratio}; DoGE mu "
        f"{s.mu_ood} (OOD) / {s.mu_universal} (universal), scores clipped to "
        f"{tuple(s.score_clip)} x lr; DoReMi step {s.doremi_step_size}, smoothing "
        f"{s.doremi_smoothing}, reference = the uniform proxy. Averaged weights by role "
        "(related = the two related domains summed).",
        "",
        "| seed | method | related (2) | duplicate | unrelated | noise |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in synthetic_results:
        for method in r["weights"]:
            shares = synthetic.role_shares(r, method)
            lines.append(
                f"| {r['seed']} | {method} | {shares['related']:.3f} | "
                f"{shares['duplicate']:.3f} | {shares['unrelated']:.3f} | "
                f"{shares['noise']:.3f} |"
            )
    lines += [
        "",
        "Score signs (DoGE-OOD proxy at the end): domains whose score "
        "<g_i, g_target> has the opposite sign of the central finite difference "
        f"L_T(theta - h g_i) - L_T(theta + h g_i), h = {s.fd_step}:",
        "",
    ]
    for r in synthetic_results:
        ratio = np.asarray(r["signs"]["changes"]) / (
            -2 * s.fd_step * np.asarray(r["signs"]["scores"])
        )
        lines.append(
            f"- seed {r['seed']}: {r['signs']['agree']}/{len(r['roles'])} agree; "
            f"finite difference / (-2 h score) = "
            f"{np.round(ratio, 3).tolist()}"
        )
    lines += [
        "",
        f"Target loss of a fresh MLP trained {s.base_steps} steps on batches sampled "
        "with each weight vector (held-out target sample of 20000):",
        "",
        "| seed | uniform | DoGE-OOD | DoReMi |",
        "|---:|---:|---:|---:|",
    ]
    for r in synthetic_results:
        t = r["target_loss"]
        lines.append(
            f"| {r['seed']} | {t['uniform']:.4f} | {t['doge-ood']:.4f} | {t['doremi']:.4f} |"
        )
    means = {
        m: [r["target_loss"][m] for r in synthetic_results]
        for m in ("uniform", "doge-ood", "doremi")
    }
    lines.append(
        "| mean +- std | "
        + " | ".join(f"{np.mean(v):.4f} +- {np.std(v):.4f}" for v in means.values())
        + " |"
    )
    if corpus_result is not None:
        c = config.corpus
        domains, target = corpus_result["domains"], corpus_result["target"]
        lines += [
            "",
            f"## Embedded corpus: domains {domains}, OOD target {target}",
            "",
            f"Byte-level Llama ({c.lm.model.num_layers} layers, {c.lm.model.hidden_size} "
            f"wide), {c.steps} steps for every run, batch {c.lm.batch_size} x "
            f"{c.lm.seq_len}; DoGE-OOD mu {c.mu}; DoReMi step {c.doremi_step_size}, "
            f"smoothing {c.doremi_smoothing}, reference = the uniform base run.",
            "",
            "| weights (mean over seeds) | " + " | ".join(domains) + " |",
            "|---|" + "---:|" * len(domains),
        ]
        seeds = corpus_result["seeds"]
        for name in seeds[0]["weights"]:
            mean = {d: np.mean([r["weights"][name][d] for r in seeds]) for d in domains}
            lines.append(f"| {name} | " + " | ".join(f"{mean[d]:.3f}" for d in domains) + " |")
        for r in seeds:  # the learned weights per seed
            for name in ("doge", "doremi"):
                lines.append(
                    f"| {name}, seed {r['seed']} | "
                    + " | ".join(f"{r['weights'][name][d]:.3f}" for d in domains)
                    + " |"
                )
        lines += [
            "",
            f"Validation perplexity of the base models (byte level), mean +- std over "
            f"seeds {tuple(c.seeds)}:",
            "",
            "| base model | " + " | ".join(domains) + f" | average | {target} (OOD) |",
            "|---|" + "---:|" * (len(domains) + 2),
        ]
        for name in seeds[0]["perplexity"]:
            per_seed = [r["perplexity"][name] for r in seeds]
            columns = [[p[d] for p in per_seed] for d in domains]
            columns.append([np.mean([p[d] for d in domains]) for p in per_seed])
            columns.append([p[target] for p in per_seed])
            lines.append(
                f"| {name} | "
                + " | ".join(f"{np.mean(v):.3f} +- {np.std(v):.3f}" for v in columns)
                + " |"
            )
    lines += ["", "![synthetic weights](synthetic_weights.png)"]
    if corpus_result is not None:
        lines.append("![corpus weights](corpus_weights.png)")
    return doc.add(*lines)


def claims(results) -> list[report.Claim]:
    """The claims table from ``results`` (as written to results.json), by ``CLAIMS_RULE``."""
    paper = (
        "better OOD-target perplexity than uniform and DoReMi (abstract); table values (unverified)"
    )
    methods = {"DoGE-OOD": "doge-ood", "uniform": "uniform", "DoReMi": "doremi"}

    def claim(what, values):
        """``values``: the mean OOD-target number per method name of ``methods``."""
        ours = ", ".join(f"{n} {v:.4f}" for n, v in values.items())
        holds = values["DoGE-OOD"] < min(values["uniform"], values["DoReMi"])
        return report.Claim(what, paper, ours, report.verdict(holds))

    synthetic_loss = {
        n: float(np.mean([r["target_loss"][m] for r in results["synthetic"]]))
        for n, m in methods.items()
    }
    out = [claim("generated domains: DoGE-OOD weights give the lowest target loss", synthetic_loss)]
    corpus_claim = "embedded corpus: DoGE-OOD weights give the lowest perplexity on the OOD package"
    corpus_result = results["corpus"]
    if corpus_result is None:
        out.append(
            report.Claim(corpus_claim, paper, "not run (corpus.steps = 0)", report.verdict(None))
        )
        return out
    target = corpus_result["target"]
    methods["DoGE-OOD"] = "doge"  # the corpus runs name their DoGE-OOD weights "doge"
    perplexity = {
        n: float(np.mean([r["perplexity"][m][target] for r in corpus_result["seeds"]]))
        for n, m in methods.items()
    }
    out.append(claim(f"{corpus_claim} ({target})", perplexity))
    return out


def main(argv):
    del argv
    config, workdir = FLAGS.config, FLAGS.workdir
    os.makedirs(workdir, exist_ok=True)
    synthetic_results = synthetic.run(config.synthetic)
    corpus_result = corpus(config.corpus, workdir) if config.corpus.steps else None
    plot(workdir, synthetic_results, corpus_result)
    doc = build_report(config, synthetic_results, corpus_result)
    for r in synthetic_results:
        r["trajectories"] = {k: v.tolist() for k, v in r["trajectories"].items()}
    results = dict(synthetic=synthetic_results, corpus=corpus_result)
    claimed = claims(results)
    results["claims"] = [dataclasses.asdict(c) for c in claimed]
    doc.section("Claims").claims(claimed, rule=CLAIMS_RULE)
    print(report.write(workdir, doc, results), end="")


if __name__ == "__main__":
    app.run(main)
