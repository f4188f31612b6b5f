"""The main demo: train the tiny byte-level Llama on the embedded standard-library corpus.

Trains ``configs/lm_tiny.py`` for a few minutes on a CPU, then writes ``REPORT.md`` with the
held-out perplexity before and after training against the unigram baseline (the perplexity of
the training set's byte frequencies on the same held-out tokens), a generated sample, and the
loss curve ``loss.png``. Rerunning on the same workdir resumes (or, if finished, only reports).

  python -m experiments.demo_lm --workdir=runs/demo
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from jaxlab.data import pipeline
from jaxlab.eval import report
from jaxlab.infer import SamplingConfig, generate
from jaxlab.train import loop

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/demo", "Directory for checkpoints, metrics, plot, report.")
flags.DEFINE_string("prompt", "def main(argv):\n    ", "Text the generated samples start from.")
config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "..", "configs", "lm_tiny.py"),
    "Training configuration.",
    lock_config=True,
)


def unigram_perplexity(config, tokenizer, eval_data) -> float:
    """Perplexity of add-one-smoothed training-set token frequencies on the held-out targets."""
    counts = np.ones(tokenizer.vocab_size)
    for component in pipeline.build_components(config.data):
        for text in component.train:
            ids = tokenizer.encode(text, add_bos=True, add_eos=True)
            counts += np.bincount(ids, minlength=tokenizer.vocab_size)
    log_p = np.log(counts / counts.sum())
    nll, n = 0.0, 0
    for batch in eval_data:
        mask = batch["loss_mask"].astype(bool)
        nll -= log_p[batch["targets"][mask]].sum()
        n += mask.sum()
    return math.exp(nll / n)


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config, workdir = FLAGS.config, FLAGS.workdir
    print(
        f"training {config.model.num_layers}-layer, {config.model.hidden_size}-wide byte-level "
        f"Llama for {config.num_steps} steps of {config.batch_size}x{config.seq_len} tokens "
        f"on {jax.device_count()} {jax.default_backend()} device(s); workdir {workdir}"
    )
    summary = loop.train_and_evaluate(config, workdir)
    exp = summary.experiment
    records = loop.read_metrics(workdir)
    evals = [r for r in records if "eval_loss" in r]
    before, after = evals[0], evals[-1]

    eval_data = pipeline.eval_batches(
        config.data, exp.tokenizer, config.seq_len, config.batch_size, config.eval_batches
    )
    print("computing the unigram baseline on the same held-out tokens")
    unigram = unigram_perplexity(config, exp.tokenizer, eval_data)

    model = nnx.merge(exp.graphdef, summary.state.params)
    prompt = np.asarray([exp.tokenizer.encode(FLAGS.prompt, add_bos=True)] * 2)
    max_new = min(200, exp.model_config.max_seq_len - prompt.shape[1])
    out = generate(
        model,
        prompt,
        max_new_tokens=max_new,
        stop_tokens=(exp.tokenizer.eos_id,),
        sampling=SamplingConfig(temperature=0.7, top_p=0.95),
        rng=jax.random.PRNGKey(config.seed),
    )
    samples = [
        FLAGS.prompt + exp.tokenizer.decode(np.asarray(out.tokens[i, : int(out.lengths[i])]))
        for i in range(2)
    ]
    n_params = sum(x.size for x in jax.tree.leaves(summary.state.params))
    doc = report.Report("jaxlab demo: a tiny Llama trained on the embedded corpus").add(
        f"{n_params:,} parameters, byte tokenizer, {config.num_steps} steps x "
        f"{config.batch_size} x {config.seq_len} tokens on {jax.default_backend()}; held-out "
        f"set: {config.eval_batches} batches of standard-library files never trained on.",
    )
    perplexities = [
        ("unigram baseline (training byte frequencies)", f"{unigram:.2f}"),
        (f"model before training (step {before['step']})", f"{before['eval_perplexity']:.2f}"),
        (f"model after training (step {after['step']})", f"{after['eval_perplexity']:.2f}"),
    ]
    doc.table(("held-out perplexity (per byte)", "value"), perplexities)
    doc.images(("loss.png", "loss curve"))
    doc.add("Samples (temperature 0.7, top-p 0.95):")
    doc.add(*(f"```python\n{s}\n```\n" for s in samples))
    results = dict(
        parameters=int(n_params),
        unigram_perplexity=unigram,
        before=dict(step=before["step"], eval_perplexity=before["eval_perplexity"]),
        after=dict(step=after["step"], eval_perplexity=after["eval_perplexity"]),
    )
    report.write(workdir, doc, results)
    print("\n".join(report.table(("held-out perplexity (per byte)", "value"), perplexities)))
    print(f"\nsample:\n{samples[0]}\n\nreport: {os.path.join(workdir, 'REPORT.md')}")


if __name__ == "__main__":
    jax.config.config_with_absl()
    app.run(main)
