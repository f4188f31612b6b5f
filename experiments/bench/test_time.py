r"""Samples per second of the test-time scaling teacher and a Mamba student, at batch 1, 32, 128.

The teacher is ``configs/reasoning_lm.py``'s Llama, the student ``configs/test_time_scaling.py``'s
``student_model`` (a Mamba-1 LM of about the same size), both with random weights (speed does
not depend on them) and the reasoning task's tokenizer. Each batch size is timed with
:func:`jaxlab.infer.test_time.draw_samples`, the code that produces the experiment's time axis:
batch 1 is one problem with one sample, batch ``b >= 32`` is ``b / 32`` problems with 32 samples
each (one prefill per problem), on the first test problems of the task. Every completion runs the
full ``new_tokens`` (no early stop: random weights would stop at random points), the length of
the longest test answer plus eos. Reported per batch: samples per second of each model
(compilation excluded, ``--repeats`` runs, median), and the student / teacher ratio.

With ``--distill_workdir`` (a finished ``experiments/distill`` run) the arms are that run's
trained teacher and the students of ``--students`` instead (each at its last stage, as
``experiments/test_time_scaling`` with ``experiment.distill_workdir`` compares them), and every
student's ratio to the teacher is reported.

Usage::

  python -m experiments.bench.test_time --out=bench_results/bench_test_time.json [--quick]
  python -m experiments.bench.test_time --distill_workdir=runs/distill \
      --out=bench_results/bench_test_time_distilled.json
"""

from __future__ import annotations

import statistics
import time

import jax
from absl import app, flags
from flax import nnx

from configs import test_time_scaling
from experiments import test_time_scaling as experiment
from experiments.bench.common import environment, write_json
from jaxlab import models
from jaxlab.data import reasoning
from jaxlab.data.tokenizers import load_tokenizer
from jaxlab.infer import test_time
from jaxlab.train import pretrained

_OUT = flags.DEFINE_string("out", "bench_results/bench_test_time.json", "Where to write the JSON.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed draws per measurement (median reported).")
_QUICK = flags.DEFINE_bool(
    "quick", False, "Tiny smoke run: 1-layer width-16 models, 8 new tokens, batches 1 and 4."
)
_DISTILL = flags.DEFINE_string(
    "distill_workdir", "", "A finished experiments/distill run: time its teacher and students."
)
_STUDENTS = flags.DEFINE_list(
    "students", ["hybrid50", "hybrid25", "pure"], "With --distill_workdir: the students timed."
)

SAMPLES_PER_PROBLEM = 32
FULL = dict(batches=(1, 32, 128), new_tokens=0, shrink={})
QUICK = dict(
    batches=(1, 4),
    new_tokens=8,
    shrink=dict(hidden_size=16, intermediate_size=32, num_layers=1),
)


def build(fields: dict, vocab_size: int) -> nnx.Module:
    values = dict(fields, vocab_size=vocab_size)
    values.setdefault("name", "llama")
    return models.build(models.make_config(values), nnx.Rngs(0))


def layout(batch: int, per_problem: int) -> tuple[int, int]:
    """(problems per call, samples per problem) for ``batch`` rows: one sample at batch 1,
    otherwise ``per_problem`` samples (fewer when the batch is smaller) per problem."""
    samples = min(batch, per_problem)
    if batch % samples:
        raise ValueError(f"bench batch {batch} must be a multiple of {samples} samples")
    return batch // samples, samples


def main(argv):
    del argv
    setup = QUICK if _QUICK.value else FULL
    repeats = 1 if _QUICK.value else _REPEATS.value
    env = environment()
    busy = env["cpu_busy_before_run"]
    if busy is not None and busy > 0.2:
        print(
            f"WARNING: the CPUs were {busy:.0%} busy in the second before the run: another "
            "process is using them and the timings will be distorted."
        )
    config = test_time_scaling.get_config()
    tokenizer = load_tokenizer("reasoning")
    problems = reasoning.parse_spec(config.data.sources[0]).split("test")
    new_tokens = setup["new_tokens"] or max(len(p.answer) for p in problems) + 1
    per_problem = 4 if _QUICK.value else SAMPLES_PER_PROBLEM
    if _DISTILL.value:
        sources = experiment.distilled_models(_DISTILL.value, tuple(_STUDENTS.value))
        fields = sources
        arms = {
            name: pretrained.load_model(src, "--distill_workdir") for name, src in sources.items()
        }
    else:
        fields = {
            "teacher (llama)": dict(config.model.to_dict(), **setup["shrink"]),
            "student (mamba)": dict(config.student_model.to_dict(), **setup["shrink"]),
        }
        arms = {name: build(f, tokenizer.vocab_size) for name, f in fields.items()}
    parameters = {
        name: int(sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param))))
        for name, m in arms.items()
    }
    rows = []
    for batch in setup["batches"]:
        calls, samples = layout(batch, per_problem)
        prompts = [p.prompt for p in problems[: 2 * calls]]  # two timed calls per draw
        row = dict(batch=batch, problems_per_call=calls, samples_per_problem=samples)
        for name, model in arms.items():
            per_draw, compile_and_first = [], None
            for r in range(repeats):
                begin = time.perf_counter()
                drawn = test_time.draw_samples(
                    model,
                    tokenizer,
                    prompts,
                    num_samples=samples,
                    extract=reasoning.extract_answer,
                    max_new_tokens=new_tokens,
                    problems_per_call=calls,
                    seed=r,
                    stop_tokens=(),
                    add_bos=True,
                )
                if compile_and_first is None:
                    compile_and_first = time.perf_counter() - begin
                if drawn.lengths.min() != new_tokens:
                    raise RuntimeError(f"{name} batch {batch}: a row stopped before {new_tokens}")
                per_draw.append(drawn.seconds_per_sample)
            seconds = statistics.median(per_draw)
            row[name] = dict(
                seconds_per_sample=per_draw,
                median_seconds_per_sample=seconds,
                samples_per_s=1.0 / seconds,
                tokens_per_s=new_tokens / seconds,
                first_draw_wall_s=compile_and_first,
            )
        teacher, *students = arms  # the first arm is the teacher
        speeds = {n: row[n]["samples_per_s"] for n in arms}
        row["over_teacher"] = {n: speeds[n] / speeds[teacher] for n in students}
        if not _DISTILL.value:
            row["student_over_teacher"] = row["over_teacher"][students[0]]
        rows.append(row)
        print(
            f"  batch {batch:>3} ({calls} x {samples}): "
            + ", ".join(f"{n} {speeds[n]:,.1f} samples/s" for n in arms)
            + "; / teacher: "
            + ", ".join(f"{n} {r:.2f}" for n, r in row["over_teacher"].items()),
            flush=True,
        )
    result = dict(
        environment=env,
        quick=_QUICK.value,
        repeats=repeats,
        new_tokens=new_tokens,
        prompt_tokens_max=max(len(p.prompt) for p in problems) + 1,
        parameters=parameters,
        models=fields,
        rows=rows,
        distill_workdir=_DISTILL.value or None,
        note="samples/s = samples / timed generation seconds of draw_samples (compilation "
        "excluded by its untimed first call), median over repeats; no early stop, the reasoning "
        "task's test prompts; "
        + ("the distill run's trained weights" if _DISTILL.value else "random weights"),
    )
    write_json(_OUT.value, result)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
