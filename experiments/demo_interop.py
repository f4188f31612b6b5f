"""Interop demo: build a tiny Llama, export it to Hugging Face format, reload, compare, generate.

Writes ``REPORT.md``, ``logits_agreement.png`` and the exported checkpoint into ``--workdir``.
The model is untrained (the training engine is a separate experiment), so its text is noise:
the point is that every path agrees to float32 precision.

  python -m experiments.demo_interop --workdir=runs/demo
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from jaxlab import models
from jaxlab.data.tokenizers import ByteTokenizer
from jaxlab.eval import report
from jaxlab.eval.plots import scatter_agreement
from jaxlab.infer import SamplingConfig, generate
from jaxlab.interop.hf import load_hf_llama, save_hf_llama

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/demo", "Directory for the checkpoint, report and plot.")
config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "..", "configs", "demo_interop.py"),
    "Demo configuration.",
    lock_config=True,
)


def _transformers_logits(path: str, tokens: np.ndarray) -> np.ndarray | None:
    try:
        import torch
        import transformers
    except ImportError:
        logging.warning("transformers/torch not installed: skipping the cross-check")
        return None
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return hf(torch.as_tensor(tokens)).logits.numpy()


def main(argv):
    del argv
    config, workdir = FLAGS.config, FLAGS.workdir
    os.makedirs(workdir, exist_ok=True)
    tokenizer = ByteTokenizer()
    print(
        f"[1/5] building a {config.model.num_layers}-layer, {config.model.hidden_size}-wide "
        f"Llama (vocab {config.model.vocab_size}) on {jax.default_backend()}"
    )
    model = models.build(config.model, nnx.Rngs(config.seed))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

    ckpt = os.path.join(workdir, "hf_checkpoint")
    print(f"[2/5] exporting to Hugging Face format: {ckpt}")
    save_hf_llama(model, ckpt)
    reloaded = load_hf_llama(ckpt)

    print("[3/5] comparing logits: original vs reloaded vs transformers")
    text = "import numpy as np\nprint(np.arange(10).sum())\n"
    tokens = np.asarray([tokenizer.encode(text, add_bos=True)])
    ours = np.asarray(model(jnp.asarray(tokens)))
    diff_reload = float(np.abs(np.asarray(reloaded(jnp.asarray(tokens))) - ours).max())
    hf = _transformers_logits(ckpt, tokens)
    diff_hf = None if hf is None else float(np.abs(hf - ours).max())
    plot = None
    if hf is not None:
        plot = os.path.join(workdir, "logits_agreement.png")
        scatter_agreement(
            hf.ravel(),
            ours.ravel(),
            "transformers logits",
            "jaxlab logits",
            f"{tokens.shape[1]} positions x {ours.shape[-1]} vocab; max |diff| {diff_hf:.2e}",
            plot,
        )

    print("[4/5] generating (greedy, then nucleus sampling)")
    prompt = np.asarray([tokenizer.encode(config.prompt, add_bos=True)])
    greedy = generate(reloaded, prompt, max_new_tokens=config.max_new_tokens)
    sampling = SamplingConfig(temperature=config.temperature, top_p=config.top_p)
    batch = np.repeat(prompt, config.num_samples, axis=0)
    # Same static arguments for both calls, so the second one is timed without compilation.
    sampled = generate(
        reloaded,
        batch,
        max_new_tokens=config.max_new_tokens,
        sampling=sampling,
        rng=jax.random.PRNGKey(config.seed),
        stop_tokens=(),
    )
    jax.block_until_ready(sampled.tokens)
    start = time.perf_counter()
    timed = generate(
        reloaded,
        batch,
        max_new_tokens=config.max_new_tokens,
        sampling=sampling,
        rng=jax.random.PRNGKey(config.seed + 1),
        stop_tokens=(),
    )
    jax.block_until_ready(timed.tokens)
    seconds = time.perf_counter() - start
    tok_per_s = config.num_samples * config.max_new_tokens / seconds

    def show(out, row):
        return repr(tokenizer.decode(np.asarray(out.tokens[row, : int(out.lengths[row])])))

    print("[5/5] writing the report")
    doc = report.Report("jaxlab demo: Hugging Face interop and decoding").add(
        "An untrained tiny Llama built by jaxlab, exported with `save_hf_llama`, reloaded with",
        "`load_hf_llama` and with `transformers`, then decoded with the compiled KV-cache loop.",
        "The model is untrained, so its text is noise; the numbers are what matter.",
    )
    checks = [
        ("parameters", f"{n_params:,}"),
        ("max abs logit diff, jaxlab vs reloaded jaxlab", f"{diff_reload:.2e}"),
        (
            "max abs logit diff, jaxlab vs transformers",
            "not run (transformers missing)" if diff_hf is None else f"{diff_hf:.2e}",
        ),
        (
            f"sampled decode speed, batch {config.num_samples}",
            f"{tok_per_s:,.0f} tokens/s ({1e3 * seconds / config.max_new_tokens:.2f} ms per step)",
        ),
    ]
    doc.table(("check", "result"), checks)
    doc.add(f"Prompt: `{config.prompt!r}`")
    doc.add(
        f"- greedy: {show(greedy, 0)}",
        *(f"- sample {i}: {show(sampled, i)}" for i in range(config.num_samples)),
    )
    if plot:
        doc.images((os.path.basename(plot), "logits agreement"))
    results = dict(
        parameters=int(n_params),
        max_abs_logit_diff_reload=diff_reload,
        max_abs_logit_diff_transformers=diff_hf,
        decode_tokens_per_s=tok_per_s,
    )
    report.write(workdir, doc, results)
    print("\n".join(report.table(("check", "result"), checks)))
    print(f"report: {os.path.join(workdir, report.REPORT_FILE)}")
    ok = diff_reload < 1e-5 and (diff_hf is None or diff_hf < 1e-4)
    if not ok:
        raise SystemExit("logits disagree beyond float32 tolerance; see the report")


if __name__ == "__main__":
    jax.config.config_with_absl()
    app.run(main)
