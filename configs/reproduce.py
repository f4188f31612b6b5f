"""The reproduction sets of ``experiments/reproduce.py``: every paper's experiment, in order.

``demo`` (``make demo``): each experiment at a size a 2-core CPU runs in minutes. Measured
(2026-12-02, a fresh clone on a 2-core AMD EPYC, nothing else running): 25 min 15 s in all with
the install (1:52), 23:23 of runs; the minutes below are that run's (its goal: under 30 minutes
with the install).
``repro`` (``make repro``): the experiments' own full configs (more steps, seeds and sweeps;
hours). Each run is ``python -m MODULE --workdir=WORKDIR/NAME --config=CONFIG ARGS``;
``{root}`` in ARGS is the set's WORKDIR, so a run can read an earlier run's outputs (it names
that run in ``after``). ``minutes``: the expected wall time on 2 CPU cores, printed before the
set starts (demo: the times of the measured run above).

``untestable``: (claim text, reason) pairs declared before the run: the claims whose text holds
that string ("*": every claim of the run) cannot be decided at this set's size, for the reason
given; the combined report shows them as "not testable at this scale" beside the verdict the
experiment's rule printed. The demo sizes and these reasons come from trial runs of each
experiment on this machine (2026-12-02; the numbers quoted in the reasons are theirs).

Compositions (``jaxlab.eval.claims.COMPOSITIONS``): A, the ``compose_*`` runs of
``configs/composition.py`` (a DoGE mixture, a DenseFormer with sparse attention pretrained on it
with AdEMAMix, then continued on the arithmetic task and distilled into Mamba hybrids, then
test-time scaling; the first two are engine runs, ``reports=False``); B,
``layer_parallel_meditron``: Layer Parallelism on the MEDITRON run's continued-pretrained model,
taken as it is (``config.experiment.teacher_from_run``).
"""

import ml_collections

# lm_tiny's Llama narrowed to about 0.9M parameters (from 3.2M): steps about 3x cheaper on a CPU.
NARROW = (
    "--config.model.hidden_size=128",
    "--config.model.intermediate_size=344",
    "--config.model.num_heads=4",
    "--config.model.num_kv_heads=2",
)
# The composition: Layer Parallelism on MEDITRON's continued-pretrained model as it is; its 4
# layers leave one pair (layers 1-2) between the first and the last.
LP_ON_MEDITRON = (
    "--teacher_workdir={root}/meditron/1_cpt",
    "--config.experiment.teacher_from_run=True",
    "--config.experiment.deltas=(2,)",
    "--config.experiment.starts=(1,)",
    "--config.experiment.recovery_deltas=(2,)",
)
TEACHER_AT_CHANCE = (
    "the demo's reasoning teacher (120 steps) is at chance on exact match (a 300-step trial "
    "teacher scored 11-12% against 10% chance)"
)


# Measured in a trial of composition A at these sizes (2026-12-02, hybrid50_random included).
COMPOSED_TEACHER = (
    "the composition's teacher (60 corpus steps, then 120 steps on the task) had 0% greedy exact "
    "match in a trial run, and 1,763 of its 1,920 samples had no answer"
)


def _run(name, module, config, minutes, *args, after=(), untestable=(), reports=True):
    return ml_collections.ConfigDict(
        dict(
            name=name,
            module=module,
            config=config,
            args=tuple(args),
            minutes=float(minutes),
            after=tuple(after),
            untestable=tuple(untestable),
            reports=reports,
        )
    )


def composition_runs(
    minutes, mixture=(), pretrain=(), distill=(), tts=(), distill_untestable=(), tts_untestable=()
):
    """Composition A's four runs (configs/composition.py), each reading the one before; the
    arguments narrow each run (the set's sizes), ``minutes`` its four expected times."""
    config = "configs/composition.py:"
    return (
        _run(
            "compose_mixture",
            "experiments.train_lm",
            config + "mixture",
            minutes[0],
            *mixture,
            reports=False,
        ),
        _run(
            "compose_pretrain",
            "experiments.train_lm",
            config + "pretrain",
            minutes[1],
            "--config.data.weights_file={root}/compose_mixture/domain_weights.json",
            *pretrain,
            after=("compose_mixture",),
            reports=False,
        ),
        _run(
            "compose_distill",
            "experiments.distill",
            config + "distill",
            minutes[2],
            "--config.init_from=run:{root}/compose_pretrain",
            *distill,
            after=("compose_pretrain",),
            untestable=distill_untestable,
        ),
        _run(
            "compose_tts",
            "experiments.test_time_scaling",
            config + "tts",
            minutes[3],
            "--config.experiment.distill_workdir={root}/compose_distill",
            *tts,
            after=("compose_distill",),
            untestable=tts_untestable,
        ),
    )


def demo_runs():
    return (
        _run(
            "acvi",
            "experiments.acvi",
            "configs/acvi.py",
            1.0,
            "--config.seeds=(0,)",
            "--config.gan.seeds=(0,1)",
        ),
        _run(
            "udp",
            "experiments.udp",
            "configs/udp.py",
            1.2,
            "--config.margin.seeds=(0,1,2)",
            "--config.margin.steps=3000",
            "--config.margin.long_steps=8000",
            "--config.slab.seeds=(0,)",
            "--config.slab.steps=1000",
            "--config.moons.steps=1000",
            untestable=(
                (
                    "reduces simplicity bias",
                    "1,000 slab steps: in a trial run every model (ERM, UDP, PGD) still relied "
                    "only on the simple coordinate (0.48-0.49 accuracy with it shuffled)",
                ),
            ),
        ),
        _run(
            "doge",
            "experiments.doge",
            "configs/doge.py",
            2.2,
            "--config.synthetic.proxy_steps=500",
            "--config.synthetic.base_steps=500",
            "--config.corpus.seeds=(0,)",
            "--config.corpus.steps=80",
            "--config.corpus.eval_batches=4",
            "--config.corpus.domains=('email','asyncio','multiprocessing')",
        ),
        _run(
            "ademamix_lm",
            "experiments.ademamix_lm",
            "configs/ademamix_lm.py",
            1.1,
            "--config.num_steps=60",
            "--lrs=2e-3",
            "--probe_every=10",
            *NARROW,
            untestable=(
                (
                    "*",
                    "60 steps: AdEMAMix's slow EMA (beta3 = 0.999) averages over about 1,000 "
                    "steps and the paper's gains show over long runs; a 200-step trial was "
                    "behind AdamW (held-out loss 3.32 vs 2.91)",
                ),
            ),
        ),
        _run(
            "denseformer_lm",
            "experiments.denseformer_lm",
            "configs/denseformer_lm.py",
            1.5,
            "--config.num_steps=60",
            "--decode_tokens=32",
            *NARROW,
            untestable=(
                (
                    "matches the held-out loss",
                    "60 steps of 4- and 6-layer models: in a 200-step trial all four models "
                    "were within 0.06 nats, the plain 4-layer one best; the paper's gap is at "
                    "depth 24-72 after long training",
                ),
            ),
        ),
        _run(
            "cotformer_lm",
            "experiments.cotformer_lm",
            "configs/cotformer_lm.py",
            2.1,
            "--config.num_steps=20",
            "--config.seq_len=64",
            "--config.batch_size=8",
            "--config.experiment.seeds=(0,)",
            "--decode_tokens=16",
            *NARROW,
            untestable=(
                (
                    "*",
                    "20 steps and one seed (a seed spread of 0): in a 100-step trial two seeds of "
                    "one model ended at perplexity 25.3 and 29.0, more apart than any two arms",
                ),
            ),
        ),
        _run(
            "sparse_lm",
            "experiments.sparse_lm",
            "configs/sparse_lm.py",
            1.0,
            "--config.num_steps=40",
            "--config.seq_len=128",
            "--config.batch_size=16",
            *NARROW,
            untestable=(
                (
                    "no perplexity loss",
                    "40 steps: the dense and sparse models are all near the unigram level",
                ),
            ),
        ),
        _run(
            "distill",
            "experiments.distill",
            "configs/distill.py",
            3.3,
            "--config.num_steps=120",
            "--config.eval_batches=2",
            "--config.experiment.students=('pure','hybrid50','hybrid50_random')",
            "--config.experiment.student_steps=40",
            "--config.experiment.test_problems=100",
            "--config.experiment.extra_task=",
            "--config.experiment.decode_batches=(1,16)",
            "--config.experiment.decode_lengths=(64,256)",
            "--config.experiment.decode_repeats=2",
            untestable=(
                ("exact match (difficulty 8) is within", TEACHER_AT_CHANCE),
                ("student is below the teacher, but within", TEACHER_AT_CHANCE),
            ),
        ),
        _run(
            "test_time_scaling",
            "experiments.test_time_scaling",
            "configs/test_time_scaling.py",
            0.8,
            "--config.experiment.distill_workdir={root}/distill",
            "--config.experiment.distill_students=('hybrid50','pure')",
            "--config.experiment.num_problems=60",
            "--config.experiment.num_samples=32",
            "--config.experiment.bootstrap_resamples=500",
            after=("distill",),
            untestable=(
                (
                    "at a fixed time budget",
                    TEACHER_AT_CHANCE + ", and so are the students: the faster sampler wins by "
                    "guessing more often",
                ),
            ),
        ),
        _run(
            "layer_parallel",
            "experiments.layer_parallel",
            "configs/layer_parallel.py",
            1.8,
            "--config.num_steps=150",
            "--config.seq_len=64",
            "--config.model.num_layers=8",
            *NARROW,
            "--config.experiment.deltas=(2,4)",
            "--config.experiment.recovery_deltas=(2,)",
            "--config.experiment.recovery_steps=30",
            "--config.experiment.decode_batches=(1,)",
            "--config.experiment.decode_tokens=64",
            "--config.experiment.tensor_devices=0",
            untestable=tuple(
                (
                    claim,
                    "a 150-step teacher's middle layers barely matter: in a 200-step trial every "
                    "intervention, pruning included, kept 0.99-1.01 of its perplexity",
                )
                for claim in (
                    "retains more perplexity than pruning",
                    "keeps >= 95% of accuracy",
                    "Fine-tuning only the paired layers",
                )
            ),
        ),
        _run(
            "meditron",
            "experiments.meditron",
            "configs/meditron.py",
            1.6,
            "--config.num_steps=80",
            "--config.batch_size=8",
            *NARROW,
            "--config.experiment.cpt_steps=40",
            "--config.experiment.benchmarks=('pubmedqa',)",
            "--config.experiment.finetune_steps=10",
            "--config.experiment.modes=('top_token',)",
            "--config.experiment.parsers=('clean',)",
            "--config.experiment.seeds=(1234,)",
            untestable=tuple(
                (
                    claim,
                    "10 finetuning steps do not teach the answer format (in a trial run both "
                    "finetuned models scored 0%: no top token was an answer option)",
                )
                for claim in ("beats chance on", "helps after finetuning")
            ),
        ),
        _run(
            "layer_parallel_meditron",
            "experiments.layer_parallel",
            "configs/layer_parallel.py",
            0.9,
            *LP_ON_MEDITRON,
            "--config.experiment.recovery_steps=20",
            "--config.experiment.decode_batches=(1,)",
            "--config.experiment.decode_tokens=64",
            "--config.experiment.tensor_devices=0",
            after=("meditron",),
        ),
        *composition_runs(
            (0.8, 0.6, 2.6, 0.9),
            # experiments.train_lm takes these as given (no rescaling): warm-ups to match.
            mixture=(
                "--config.num_steps=40",
                "--config.eval_every=20",
                "--config.optim.warmup_steps=4",
            ),
            pretrain=(
                "--config.num_steps=60",
                "--config.eval_every=30",
                "--config.optim.warmup_steps=6",
            ),
            distill=(
                "--config.num_steps=120",
                "--config.eval_batches=2",
                "--config.experiment.students=('hybrid50',)",
                "--config.experiment.student_steps=40",
                "--config.experiment.test_problems=100",
                "--config.experiment.extra_task=",
                "--config.experiment.decode_batches=(1,16)",
                "--config.experiment.decode_lengths=(64,256)",
                "--config.experiment.decode_repeats=2",
            ),
            tts=(
                "--config.experiment.distill_students=('hybrid50',)",
                "--config.experiment.num_problems=40",
                "--config.experiment.num_samples=32",
                "--config.experiment.bootstrap_resamples=500",
            ),
            distill_untestable=(("exact match (difficulty 8) is within", COMPOSED_TEACHER),),
            tts_untestable=(
                ("at a fixed time budget", COMPOSED_TEACHER + "; the student's are no better"),
            ),
        ),
    )


def repro_runs():
    """The experiments' full configs; minutes from their configs' measured or estimated costs
    (2 shared CPU cores)."""
    return (
        _run("acvi", "experiments.acvi", "configs/acvi.py", 5),
        _run("udp", "experiments.udp", "configs/udp.py", 20),
        _run("doge", "experiments.doge", "configs/doge.py", 60),
        _run("ademamix_lm", "experiments.ademamix_lm", "configs/ademamix_lm.py", 120),
        _run("denseformer_lm", "experiments.denseformer_lm", "configs/denseformer_lm.py", 15),
        _run("cotformer_lm", "experiments.cotformer_lm", "configs/cotformer_lm.py", 150),
        _run("sparse_lm", "experiments.sparse_lm", "configs/sparse_lm.py", 75),
        _run("distill", "experiments.distill", "configs/distill.py", 80),
        _run(
            "test_time_scaling",
            "experiments.test_time_scaling",
            "configs/test_time_scaling.py",
            15,
            "--config.experiment.distill_workdir={root}/distill",
            after=("distill",),
        ),
        _run("layer_parallel", "experiments.layer_parallel", "configs/layer_parallel.py", 60),
        _run("meditron", "experiments.meditron", "configs/meditron.py", 170),
        _run(
            "layer_parallel_meditron",
            "experiments.layer_parallel",
            "configs/layer_parallel.py",
            15,
            *LP_ON_MEDITRON,
            after=("meditron",),
        ),
        *composition_runs((10, 20, 60, 10)),
    )


SETS = {"demo": demo_runs, "repro": repro_runs}


def get_config(set_name: str = "demo") -> ml_collections.ConfigDict:
    if set_name not in SETS:
        raise ValueError(
            f"configs/reproduce.py: the set must be one of {sorted(SETS)}, got {set_name!r}"
        )
    return ml_collections.ConfigDict(dict(set=set_name, runs=SETS[set_name]()))
