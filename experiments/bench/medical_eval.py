r"""Evaluation throughput of the medical harness's modes on a tiny random Llama (CPU or device).

Questions per second of ``top_token`` (short greedy generation then parsing), ``likelihood``
(every option's continuation scored in one forward pass per row) and ``sc_cot`` (``--samples``
chain-of-thought completions per question of ``--cot_tokens`` tokens at temperature 0.8, then a
vote), on the same synthetic MedMCQA-shaped questions in MEDITRON's zero-shot prompt. Each mode
runs once untimed (compilation) and then ``--repeats`` timed times (median reported); the ratios
to top-token are in one run, so they compare like with like on a shared machine.

Usage::

  python -m experiments.bench.medical_eval --out=bench_results/bench_medical_eval.json [--quick]
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags
from flax import nnx

from experiments.bench.common import environment, write_json
from jaxlab import models
from jaxlab.data.tokenizers import ByteTokenizer
from jaxlab.eval import medical
from jaxlab.models import TransformerConfig

_OUT = flags.DEFINE_string(
    "out", "bench_results/bench_medical_eval.json", "Where to write the JSON."
)
_QUICK = flags.DEFINE_bool("quick", False, "Smoke run: smaller model, fewer questions, 1 repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per mode (median reported).")
_SAMPLES = flags.DEFINE_integer("samples", 5, "SC-CoT samples per question (the paper's 5).")
_COT_TOKENS = flags.DEFINE_integer("cot_tokens", 32, "SC-CoT new tokens per sample.")


def _questions(n: int) -> list[medical.Question]:
    rng = np.random.default_rng(0)
    words = ["nerve", "artery", "muscle", "enzyme", "drug", "lesion", "gland", "cell"]
    return [
        medical.Question(
            f"q{i}",
            f"Which {rng.choice(words)} is most affected in case {i}?",
            tuple(f"{rng.choice(words)} {k}" for k in range(4)),
            "ABCD"[i % 4],
        )
        for i in range(n)
    ]


def main(argv):
    del argv
    quick = _QUICK.value
    repeats = 1 if quick else _REPEATS.value
    tokenizer = ByteTokenizer()
    config = TransformerConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32 if quick else 128,
        num_layers=2 if quick else 4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64 if quick else 344,
        max_seq_len=768,
    )
    model = models.build(config, nnx.Rngs(0))
    questions = _questions(8 if quick else 32)
    samples, cot_tokens = (2, 8) if quick else (_SAMPLES.value, _COT_TOKENS.value)
    modes = {
        "top_token": medical.EvalConfig("medmcqa", mode="top_token", batch_size=8),
        "likelihood": medical.EvalConfig("medmcqa", mode="likelihood", batch_size=8),
        "sc_cot": medical.EvalConfig(
            "medmcqa",
            mode="sc_cot",
            sc_samples=samples,
            cot_max_new_tokens=cot_tokens,
            seeds=(1234,),
            batch_size=8,
        ),
    }
    results = {}
    for name, eval_config in modes.items():
        medical.evaluate(model, tokenizer, eval_config, questions)  # compile
        seconds = []
        for _ in range(repeats):
            begin = time.perf_counter()
            medical.evaluate(model, tokenizer, eval_config, questions)
            seconds.append(time.perf_counter() - begin)
        median = float(np.median(seconds))
        results[name] = {"seconds": seconds, "questions_per_second": len(questions) / median}
        print(f"{name}: {results[name]['questions_per_second']:.2f} questions/s")
    base = results["top_token"]["questions_per_second"]
    ratios = {
        f"{name}_vs_top_token": r["questions_per_second"] / base for name, r in results.items()
    }
    write_json(
        _OUT.value,
        {
            "benchmark": "medical_eval",
            "quick": quick,
            "questions": len(questions),
            "model": {"hidden_size": config.hidden_size, "num_layers": config.num_layers},
            "sc_cot": {"samples": samples, "new_tokens": cot_tokens, "temperature": 0.8},
            "modes": results,
            "ratios": ratios,
            "environment": environment(),
        },
    )
    print({k: round(v, 3) for k, v in ratios.items()})


if __name__ == "__main__":
    app.run(main)
