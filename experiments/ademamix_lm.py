"""AdEMAMix against AdamW on the tiny LM: a learning-rate sweep and the forgetting experiment.

1. Sweep: ``configs/ademamix_lm.py`` trained with AdamW and with AdEMAMix (same steps, batches and
   token budget) at each learning rate of ``--lrs``; the best final held-out loss of each is
   compared and both best runs' curves are plotted (``sweep.png``).
2. Forgetting (the paper's Fig. 4): at the best learning rates, one held-out batch is shown once,
   at step ``--inject_step`` in place of the regular batch, and its loss is tracked for the rest
   of training. A control run, identical but without the injection, gives the loss the batch
   would have had; the difference (control minus injected) is what the model still remembers of
   it (``forgetting.png``).

Writes ``REPORT.md`` in ``--workdir``.

  python -m experiments.ademamix_lm --workdir=runs/ademamix_vs_adamw [--config.num_steps=200]

``--config`` (default ``configs/ademamix_lm.py``) is every run's configuration, with
``optim.name`` and ``optim.learning_rate`` set per run; an overridden ``--config.num_steps``
rescales evaluations and warm-ups (``lm_tiny.with_num_steps``).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import run_config
from jaxlab.data import pipeline
from jaxlab.eval import plots, report
from jaxlab.train import loop, sharding
from jaxlab.train.step import MODEL_INPUTS

flags.DEFINE_string("workdir", "runs/ademamix_vs_adamw", "Output directory.")
flags.DEFINE_list(
    "lrs", ["2.5e-4", "5e-4", "1e-3", "2e-3"], "Learning rates swept for both optimizers."
)
flags.DEFINE_integer("inject_step", 0, "Step at which the probe batch is trained on (0 = half).")
flags.DEFINE_integer("probe_every", 5, "Steps between probe evaluations after the injection.")
config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "..", "configs", "ademamix_lm.py"),
    "Every run's configuration (the optimizer and learning rate are set per run).",
    lock_config=True,
)
FLAGS = flags.FLAGS

OPTIMIZERS = ("adamw", "ademamix")
CLAIMS_RULE = (
    "the loss claim holds when AdEMAMix's best final held-out loss (over the swept learning "
    "rates) is below AdamW's best by more than 0.01 nats/byte; the forgetting claim holds when "
    "AdEMAMix still remembers more of the injected batch at the end of training (control minus "
    "injected probe loss) than AdamW."
)


def make_config(base, optimizer: str, lr: float):
    config = copy.deepcopy(base)
    config.optim.name = optimizer
    config.optim.learning_rate = lr
    return config


def sweep(base, workdir: str, lrs: list[float]) -> dict:
    results = {}
    for optimizer in OPTIMIZERS:
        for lr in lrs:
            run = os.path.join(workdir, f"{optimizer}_lr{lr:g}")
            print(f"--- {optimizer}, lr {lr:g}: {run}")
            summary = loop.train_and_evaluate(make_config(base, optimizer, lr), run)
            results[(optimizer, lr)] = dict(run=run, eval_loss=summary.eval["eval_loss"])
    return results


def probe_losses(base, optimizer, lr, inject_step: int | None, watch_from: int, every: int):
    """Loss of a held-out probe batch from ``watch_from`` on, the probe trained on once at
    ``inject_step`` (None: never; the control run)."""
    config = make_config(base, optimizer, lr)
    num_steps = config.num_steps
    exp = loop.build_experiment(config)
    state = loop.init_state(exp)
    train_step, eval_step = loop.compile_steps(exp)
    components = pipeline.build_components(config.data)
    data = pipeline.train_iterator(
        config.data, exp.tokenizer, config.seq_len, config.batch_size, components
    )
    (probe,) = pipeline.eval_batches(
        config.data, exp.tokenizer, config.seq_len, config.batch_size, 1, components
    )

    def on_device(batch):
        return sharding.global_batch_to_devices({k: batch[k] for k in MODEL_INPUTS}, exp.mesh)

    probe_d = on_device(probe)
    record = []
    for step in range(1, num_steps + 1):
        batch = next(data)  # drawn every step, so all runs see the same other batches
        state, _ = train_step(state, on_device(probe if step == inject_step else batch), {})
        if step >= watch_from and (step % every == 0 or step in (watch_from, watch_from + 1)):
            out = eval_step(state.params, probe_d)
            record.append((step, float(out["loss_sum"]) / float(out["tokens"])))
    return record


def forgetting(base, optimizer: str, lr: float, inject_step: int, every: int):
    """``[(step, control loss, injected loss)]`` of the probe batch from just before injection."""
    watch = inject_step - 1
    injected = probe_losses(base, optimizer, lr, inject_step, watch, every)
    control = probe_losses(base, optimizer, lr, None, watch, every)
    return [(s, c, i) for (s, i), (_, c) in zip(injected, control, strict=True)]


def claims(results) -> list[report.Claim]:
    """The claims table from ``results`` (as written to results.json), by ``CLAIMS_RULE``."""
    best = {
        o: min(loss for run, loss in results["sweep"].items() if run.split("@")[0] == o)
        for o in OPTIMIZERS
    }
    kept = {o: results["forgetting"][o]["final"] for o in OPTIMIZERS}
    return [
        report.Claim(
            "AdEMAMix reaches a lower held-out loss than AdamW with the same steps and tokens",
            "1.3B: AdEMAMix on 101B tokens matches AdamW on 197B tokens",
            f"best held-out loss AdEMAMix {best['ademamix']:.4f} vs AdamW {best['adamw']:.4f}",
            report.verdict(best["ademamix"] < best["adamw"] - 0.01),
        ),
        report.Claim(
            "AdEMAMix forgets a batch seen once more slowly than AdamW",
            "slower forgetting of an injected batch (Fig. 4, no number)",
            f"remembered at the end: AdEMAMix {kept['ademamix']:.4f} vs AdamW {kept['adamw']:.4f}",
            report.verdict(kept["ademamix"] > kept["adamw"]),
        ),
    ]


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    workdir, base = FLAGS.workdir, run_config.from_flag(FLAGS["config"])
    os.makedirs(workdir, exist_ok=True)
    lrs = [float(x) for x in FLAGS.lrs]
    num_steps = base.num_steps
    inject = FLAGS.inject_step or num_steps // 2

    results = sweep(base, workdir, lrs)
    best = {
        o: min((r for (opt, _), r in results.items() if opt == o), key=lambda r: r["eval_loss"])
        for o in OPTIMIZERS
    }
    best_lr = {o: next(lr for (opt, lr), r in results.items() if r is best[o]) for o in OPTIMIZERS}

    fig, ax = plots.figure((6.5, 4))
    for optimizer in OPTIMIZERS:
        records = loop.read_metrics(best[optimizer]["run"])
        steps = np.array([r["step"] for r in records if "loss" in r])
        train = np.array([r["loss"] for r in records if "loss" in r])
        window = min(20, len(train))
        smooth = np.convolve(train, np.ones(window) / window, mode="valid")
        line = ax.plot(
            steps[window - 1 :], smooth, label=f"{optimizer} train (lr {best_lr[optimizer]:g})"
        )
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        ax.plot(
            *zip(*evals, strict=True),
            "o--",
            color=line[0].get_color(),
            label=f"{optimizer} held-out",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_ylim(top=3.5)
    ax.legend()
    ax.grid(alpha=0.3)
    report.save_figure(fig, workdir, "sweep.png")

    print(f"--- forgetting: probe batch trained on once at step {inject}")
    curves = {o: forgetting(base, o, best_lr[o], inject, FLAGS.probe_every) for o in OPTIMIZERS}
    fig, (top, bottom) = plots.figure((6.5, 6), 2, 1, sharex=True)
    for optimizer, record in curves.items():
        steps, control, injected = map(np.array, zip(*record, strict=True))
        line = top.plot(steps, injected, label=f"{optimizer}: shown once at step {inject}")
        top.plot(steps, control, ":", color=line[0].get_color(), label=f"{optimizer}: never shown")
        bottom.plot(steps, control - injected, color=line[0].get_color(), label=optimizer)
    for ax in (top, bottom):
        ax.axvline(inject, color="gray", linewidth=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    top.set_ylabel("loss of the probe batch")
    bottom.set_ylabel("remembered (control - injected)")
    bottom.set_xlabel("step")
    report.save_figure(fig, workdir, "forgetting.png")

    def memory_summary(record):
        remembered = {s: c - i for s, c, i in record}
        after = remembered[inject]
        half = next(
            (s - inject for s, r in remembered.items() if s > inject and r <= after / 2), None
        )
        return remembered[inject - 1], after, record[-1][1] - record[-1][2], half

    doc = report.Report("AdEMAMix vs AdamW on the tiny LM").add(
        f"`configs/ademamix_lm.py`: {num_steps} steps x {base.batch_size} x "
        f"{base.seq_len} bytes of the embedded corpus, same batches for both; "
        "AdEMAMix with beta3 0.999, alpha 8, both warmed up over the whole run.",
    )
    doc.table(
        ("optimizer", *(f"lr {lr:g}" for lr in lrs)),
        [
            (
                f"{optimizer} held-out loss",
                *(f"{results[(optimizer, lr)]['eval_loss']:.4f}" for lr in lrs),
            )
            for optimizer in OPTIMIZERS
        ],
    )
    doc.images(("sweep.png", "sweep"))
    doc.section(f"Forgetting (batch injected at step {inject})")
    doc.add(
        "Remembered = probe loss in the control run (never shown) minus in the run that",
        "showed it once; 0 before the injection by construction.",
    )
    summary = {}
    for optimizer, record in curves.items():
        before, after, final, half = memory_summary(record)
        summary[optimizer] = dict(before=before, after=after, final=final, half_steps=half)
    doc.table(
        ("optimizer", "remembered before", "right after", "at the end", "steps to lose half"),
        [
            (
                optimizer,
                f"{s['before']:.4f}",
                f"{s['after']:.4f}",
                f"{s['final']:.4f}",
                "not within the run" if s["half_steps"] is None else s["half_steps"],
            )
            for optimizer, s in summary.items()
        ],
    )
    doc.images(("forgetting.png", "forgetting"))
    results_json = dict(
        sweep={f"{o}@{lr:g}": r["eval_loss"] for (o, lr), r in results.items()},
        best_lr=best_lr,
        forgetting=summary,
        curves={o: c for o, c in curves.items()},
    )
    claimed = claims(results_json)
    results_json["claims"] = [dataclasses.asdict(c) for c in claimed]
    doc.section("Claims")
    doc.claims(claimed, rule=CLAIMS_RULE)
    print(report.write(workdir, doc, results_json), end="")


if __name__ == "__main__":
    jax.config.config_with_absl()
    app.run(main)
