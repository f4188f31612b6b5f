"""Train a language model: ``python -m experiments.train_lm --config=configs/lm_tiny.py
--workdir=DIR [--config.field=value ...]``.

Restarting with the same workdir resumes from its newest checkpoint. Process 0 writes
``REPORT.md`` (held-out loss and perplexity, overall and per source) and ``results.json``.
Multi-process runs pass ``--coordinator_address``, ``--num_processes`` and ``--process_id`` (or
the JAXLAB_* environment variables; ``--coordinator_address=auto`` on managed clusters).
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jaxlab.eval import report
from jaxlab.train import loop, sharding

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, or 'auto'.")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
config_flags.DEFINE_config_file("config", None, "Experiment configuration.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    sharding.initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep library INFO lines out of the progress bar
    if jax.process_count() > 1:
        print(
            f"process {jax.process_index()} of {jax.process_count()}: "
            f"{jax.local_device_count()} local devices of {jax.device_count()}"
        )
    summary = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    print(f"final eval: {summary.eval}")
    if jax.process_index() == 0:
        doc = report.Report(f"Training run: {FLAGS.workdir}").add(
            f"Steps {summary.start_step} to {summary.step} of {FLAGS.config.num_steps} in this "
            f"call; the config is `config.json`, every metric `metrics.jsonl`."
        )
        doc.table(
            ("held-out data", "loss", "perplexity"),
            [
                (source or "all sources", f"{m['loss']:.4f}", f"{m['perplexity']:.3f}")
                for source, m in summary.eval_by_source.items()
            ],
            align="lrr",
        )
        doc.images(("loss.png", "loss curve"))
        report.write(
            FLAGS.workdir, doc, dict(step=summary.step, train=summary.train, eval=summary.eval)
        )


if __name__ == "__main__":
    jax.config.config_with_absl()
    app.run(main)
