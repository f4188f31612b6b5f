"""Test-time scaling under a fixed time budget (issue 21): teacher and students on the arithmetic
task of ``configs/reasoning_lm.py``.

The run config is the teacher's (``configs/reasoning_lm.py``). ``student_model`` is the stand-in
student trained when ``experiment.models`` is empty: a pure Mamba-1 LM with the teacher's width,
depth and MLPs (a Mamba mixer in place of attention), trained from scratch on the same task with
the same steps and optimizer, until distilled students exist. ``experiment`` holds what only
``experiments/test_time_scaling.py`` and its bench read.

Cost of a full run (measured 2026-12-01 on the shared 2-core CPU, load average 7-9; the full run
itself was not made): teacher 1500 steps at about 4,600 training tokens/s, about 14 min; the
stand-in Mamba student at about 1,500 tokens/s (its scan is slower to train on CPU), about 43 min;
sampling 200 x 32 = 6,400 completions of up to 102 tokens at 128 rows per call, at the bench's
104 (teacher) and 304 (student) samples/s, about 1 and 0.5 min plus compilation. About an hour
in all with ``experiment.models`` empty; a few minutes per model when the models are given.
Bench (``experiments/bench/test_time.py``, same load, random weights, 102 tokens, no early stop):
student / teacher samples/s 0.92 at batch 1, 1.55 at 32, 2.92 at 128.

Usage:
  python -m experiments.test_time_scaling --workdir=runs/test_time_scaling
  python -m experiments.test_time_scaling --workdir=runs/tts \
      --config.experiment.models=teacher=run:runs/reasoning,hybrid=run:runs/hybrid
  python -m experiments.test_time_scaling --workdir=runs/test_time_scaling \
      --config.experiment.distill_workdir=runs/distill
  python -m experiments.bench.test_time --out=bench_results/bench_test_time.json
"""

import ml_collections

from configs import reasoning_lm


def student_model() -> dict:
    """The stand-in student: Mamba-1 mixers (expand 1, state 16) with the teacher's SwiGLU MLPs,
    hidden size and depth (about the teacher's parameter count)."""
    return dict(
        name="mamba",
        vocab_size=0,
        hidden_size=64,
        num_layers=4,
        intermediate_size=256,
        mixer="mamba1",
        expand=1,
        state_size=16,
        conv_kernel=4,
        head_dim=16,
        num_groups=1,
        chunk_size=64,
        scan_impl="auto",
        attention_layers=(),
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=160,
        rope_theta=10000.0,
        tie_embeddings=True,
        initializer_range=0.02,
        param_dtype="float32",
        dtype="float32",
        remat=False,
    )


def get_config() -> ml_collections.ConfigDict:
    config = reasoning_lm.get_config()
    config.student_model = ml_collections.ConfigDict(student_model())
    config.experiment = ml_collections.ConfigDict(
        dict(
            # "name=run:DIR[@STEP],name=hf:PATH,...": the models compared; the first is the
            # reference (the teacher) each other model's crossover is measured against. Empty:
            # train the teacher (this config) and the stand-in student (student_model) here,
            # unless distill_workdir is set.
            models="",
            # A finished experiments/distill run (its results.json): with models empty, compare
            # its teacher and the students named in distill_students (each at its last stage).
            distill_workdir="",
            distill_students=("hybrid50", "hybrid25", "pure"),
            # The first num_problems test problems of the task (config.data.sources[0]).
            num_problems=200,
            # Completions per problem (n), their temperature, and the problems generated
            # together: problems_per_call * num_samples rows decode at once (the batch size the
            # time axis is measured at).
            num_samples=32,
            temperature=1.0,
            problems_per_call=4,
            # Tokens generated per completion; 0: the longest test answer plus eos.
            max_new_tokens=0,
            seed=0,
            # Bootstrap resamples of the problems for the confidence intervals (95%).
            bootstrap_resamples=1000,
        )
    )
    return config
