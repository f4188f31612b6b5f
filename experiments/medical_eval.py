r"""Evaluate a jaxlab model on a MEDITRON benchmark (MedQA, MedQA-4, MedMCQA, PubMedQA,
MMLU-medical) from the benchmark's released files, and write the result as JSON.

``--model`` is ``hf:PATH`` (a Hugging Face Llama directory) or ``run:WORKDIR[@STEP]`` (a jaxlab
run's checkpoint). The tokenizer is ``--tokenizer`` (``byte``, a ``*.model``/``tokenizer.json``
file or a directory), by default the HF directory itself or the run's ``data.tokenizer``.
``--chat`` wraps prompts in MEDITRON's ChatML (finetuned models) and adds ``<|im_start|>`` /
``<|im_end|>`` to the tokenizer when they are not single tokens already (the model's vocabulary
must hold them). See :mod:`jaxlab.eval.medical.runner` for the modes and the two parsers.

  python -m experiments.medical_eval --model=hf:/ckpt/meditron-7b --benchmark=medqa \
      --data_dir=/data/medqa --mode=top_token --format=meditron --parser=parity --shots=3 \
      --seeds=1234,432,32 --out=runs/medqa_top_token.json
"""

from __future__ import annotations

from absl import app, flags

from jaxlab.data.prompts import CHATML_TOKENS
from jaxlab.data.tokenizers import add_special_tokens, load_tokenizer
from jaxlab.eval import medical
from jaxlab.train import pretrained

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags; only when run as a program, so that tests can import
    this module beside others that define the same names."""
    flags.DEFINE_string("model", None, "hf:PATH or run:WORKDIR[@STEP].", required=True)
    flags.DEFINE_string("tokenizer", "", "Tokenizer spec; default from --model.")
    flags.DEFINE_enum("benchmark", "medqa", medical.BENCHMARKS, "Benchmark.")
    flags.DEFINE_string("data_dir", None, "The benchmark's released files.", required=True)
    flags.DEFINE_enum("mode", "top_token", medical.MODES, "Evaluation mode.")
    flags.DEFINE_enum("format", "meditron", medical.FORMATS, "Prompt format.")
    flags.DEFINE_enum("parser", "parity", medical.PARSERS, "Answer parsing rules.")
    flags.DEFINE_integer("shots", 0, "Few-shot demonstrations (3 for 7B, 5 for 70B).")
    flags.DEFINE_list("seeds", [str(s) for s in medical.SEEDS], "Few-shot/sampling seeds.")
    flags.DEFINE_bool("chat", False, "MEDITRON's ChatML wrapper (finetuned models).")
    flags.DEFINE_integer("sc_samples", 5, "SC-CoT samples per question.")
    flags.DEFINE_float("temperature", 0.8, "SC-CoT sampling temperature.")
    flags.DEFINE_integer("cot_max_new_tokens", 1024, "CoT generation budget.")
    flags.DEFINE_integer("batch_size", 16, "Questions per generation call.")
    flags.DEFINE_integer("cop_base", 1, "MedMCQA cop of option A (1 release, 0 HF).")
    flags.DEFINE_integer("max_questions", 0, "Evaluate only the first N (0: all).")
    flags.DEFINE_string("out", "runs/medical_eval.json", "Where to write the JSON.")


def load_model(spec: str):
    """The model of an ``hf:``/``run:`` source, its parameters on the default device."""
    return pretrained.load_model(spec, "--model")


def tokenizer_for(spec: str, tokenizer_spec: str, chat: bool, vocab_size: int):
    """``tokenizer_spec``, or the model source's own tokenizer; with ChatML tokens for ``chat``."""
    tokenizer = load_tokenizer(tokenizer_spec or pretrained.source_tokenizer(spec, "--model"))
    if chat and any(len(tokenizer.encode(t)) != 1 for t in CHATML_TOKENS):
        tokenizer = add_special_tokens(tokenizer, CHATML_TOKENS)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"--tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
            f"{vocab_size}: its ids would fall outside the embedding"
        )
    return tokenizer


def main(argv):
    del argv
    model = load_model(FLAGS.model)
    tokenizer = tokenizer_for(FLAGS.model, FLAGS.tokenizer, FLAGS.chat, model.config.vocab_size)
    config = medical.EvalConfig(
        benchmark=FLAGS.benchmark,
        mode=FLAGS.mode,
        fmt=FLAGS.format,
        parser=FLAGS.parser,
        shots=FLAGS.shots,
        seeds=tuple(int(s) for s in FLAGS.seeds),
        chat=FLAGS.chat,
        sc_samples=FLAGS.sc_samples,
        temperature=FLAGS.temperature,
        cot_max_new_tokens=FLAGS.cot_max_new_tokens,
        batch_size=FLAGS.batch_size,
    )
    test = medical.load(config.benchmark, FLAGS.data_dir, "test", cop_base=FLAGS.cop_base)
    if FLAGS.max_questions:
        test = test[: FLAGS.max_questions]
    train = (
        medical.load(config.benchmark, FLAGS.data_dir, "train", cop_base=FLAGS.cop_base)
        if config.shots
        else []
    )
    result = medical.evaluate(model, tokenizer, config, test, train)
    result["model"] = FLAGS.model
    result["data_dir"] = FLAGS.data_dir
    medical.write_json(FLAGS.out, result)
    acc, failures = result["accuracy"], result["parse_failures"]
    print(
        f"{config.benchmark} {config.mode} ({config.fmt}, {config.parser}, {config.shots}-shot): "
        f"accuracy {100 * acc['mean']:.1f} +- {100 * acc['std']:.1f} over seeds "
        f"{result['seeds']}, parse failures {failures['per_seed']}, "
        f"{result['questions_per_second']:.2f} questions/s -> {FLAGS.out}"
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
