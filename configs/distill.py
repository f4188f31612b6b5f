"""Mamba and hybrid students distilled from the reasoning task's Llama teacher (issue 20 item 3).

The teacher is ``configs/reasoning_lm.py``'s run; ``experiment`` holds what only
``experiments/distill.py`` and ``experiments/bench/distill.py`` read (they drop the block from
the teacher's run config): the students, their distillation, the scoring and the decode grid.

Cost of a full run (not run; measured with ``experiments.bench.distill`` at this size, 2 CPU
cores shared with other jobs): a student train step of [16, 160] tokens takes 0.44 s (next-token)
to 0.50 s (distill_kl, the teacher's forward inside: 1.05x for the pure student, 1.13x for the
50% hybrid); greedy decoding at batch 128 x 512 tokens ran at 8.1k tokens/s (teacher), 12.3k
(50% hybrid) and 110k (pure). So: the teacher about 16 minutes (configs/reasoning_lm.py; 0 if
reused with --teacher_workdir), six students x 1000 steps about 50 minutes, greedy scoring of
seven models on 629 problems a few minutes, the decode grid about 10 minutes (its b=128 x 2048
cells dominate): about 1 h 20 min in all. Measured when every student ran one end-to-end KL
stage; the staged students (MOHAWK, MambaInLlama) run the same number of steps, as 3 and 2 runs
with their own compile and evaluations, and MOHAWK's alignment steps were not timed.

Usage:
  python -m experiments.distill --workdir=runs/distill [--teacher_workdir=runs/reasoning]
  python -m experiments.bench.distill [--quick]
"""

import ml_collections

from configs import reasoning_lm

# Extra scoring problems at the training difficulties (2, 4, 6 steps), from another seed; those
# whose prompt is also a training prompt are dropped before scoring (experiments/distill.py).
EXTRA_TASK = "reasoning:train=1-8&test=2-6&num_train=1&num_test=150&modulus=10&ops=add,sub&seed=1"


def get_config() -> ml_collections.ConfigDict:
    config = reasoning_lm.get_config()
    config.mesh.update(data=1, num_devices=1)
    config.experiment = ml_collections.ConfigDict(
        dict(
            # The students trained, in this order (keys of experiments/distill.py's STUDENTS;
            # claims about one left out are not measured).
            students=(
                "pure",
                "hybrid50",
                "hybrid25",
                "hybrid50_mamba1",
                "hybrid50_random",
                "scratch",
            ),
            # Every student trains this many steps in all, split over its stages so that the
            # comparisons stay fair: the pure student's MOHAWK stages (matrix, hidden, KL) by
            # mohawk_fractions (200, 200, 600 steps), the hybrids' MambaInLlama stages
            # (replacement with the rest frozen, then end-to-end KL; the random-init ablation
            # too) by mambainllama_fractions (200, 800); the from-scratch SSM in one next-token
            # stage at learning_rate (the staged students use their recipes' rates and
            # schedules). Each stage but the last takes round(fraction * student_steps) steps,
            # at least 1; the last the rest.
            student_steps=1000,
            mohawk_fractions=(0.2, 0.2, 0.6),
            mambainllama_fractions=(0.2, 0.8),
            learning_rate=1e-3,
            # Forward KL's temperature (distill_kl, masked token mean; also the KL stages').
            temperature=1.0,
            # Greedy exact match: the first test_problems of the teacher's test split (difficulty
            # 8, held out) and the extra problems of EXTRA_TASK (empty: none).
            test_problems=500,
            extra_task=EXTRA_TASK,
            eval_batch=100,
            # Decode grid: tokens/s of greedy decoding (no early stop) for teacher, the 50%
            # mamba2 hybrid and the pure student, batch x generated length after a prompt_len
            # prompt, median of decode_repeats round-robin rounds. The grid is batch
            # 1-128 x length 64-2048; this is its corners and middle, what 2 shared CPU cores
            # time in minutes.
            decode_batches=(1, 16, 128),
            decode_lengths=(64, 512, 2048),
            prompt_len=32,
            decode_repeats=3,
        )
    )
    return config
