"""Composition A (issue 26): DenseFormer + hash-sparse attention + AdEMAMix on a DoGE-reweighted
mixture of the embedded corpus, then the reasoning task, distilled into Mamba hybrids that keep
the teacher's depth-weighted averages and sparse attention, then test-time scaling.

Four runs through the same engine and experiments, each reading the one before
(``configs/reproduce.py`` chains them; ``ROOT`` below is any folder):

1. ``mixture``: DoGE (its OOD objective) with the teacher's architecture as the proxy, over
   the corpus domains :data:`DOMAINS`, the target :data:`TARGET` scored, not trained on;
   writes ``ROOT/compose_mixture/domain_weights.json``::

     python -m experiments.train_lm --config=configs/composition.py:mixture \
         --workdir=ROOT/compose_mixture

2. ``pretrain``: the teacher's architecture (:func:`teacher_model`: a 1x1 DenseFormer whose
   attention is hash-bucket sparse) trained with AdEMAMix on the corpus at those weights::

     python -m experiments.train_lm --config=configs/composition.py:pretrain \
         --workdir=ROOT/compose_pretrain \
         --config.data.weights_file=ROOT/compose_mixture/domain_weights.json

3. ``distill``: ``experiments/distill.py`` continues the pretrained model on the arithmetic task
   (``configs/reasoning_lm.py``'s task, same byte tokenizer as the corpus; AdEMAMix again) as
   the teacher, then distils the students of ``experiment.students`` (the pure one by MOHAWK,
   the hybrids by MambaInLlama's recipe; a student carries the DenseFormer averages and keeps the
   sparse attention in its attention layers: :func:`jaxlab.distill.student_config`)::

     python -m experiments.distill --config=configs/composition.py:distill \
         --workdir=ROOT/compose_distill --config.init_from=run:ROOT/compose_pretrain

4. ``tts``: ``experiments/test_time_scaling.py`` samples teacher and students under a time
   budget::

     python -m experiments.test_time_scaling --config=configs/composition.py:tts \
         --workdir=ROOT/compose_tts \
         --config.experiment.distill_workdir=ROOT/compose_distill

The sizes here are the full set's (``make repro``); the demo set narrows the steps.
"""

import ml_collections

from configs import ademamix_lm, distill, lm_tiny, reasoning_lm, test_time_scaling

# Corpus domains (standard-library packages of the embedded corpus) and DoGE's OOD target.
DOMAINS = ("email", "asyncio", "multiprocessing")
TARGET = "urllib"
# The reasoning teacher's width and depth; 160 tokens hold the longest 8-step example.
SEQ_LEN = 160
STAGES = ("mixture", "pretrain", "distill", "tts")


def teacher_model() -> dict:
    """The composed architecture: reasoning_lm's Llama as a 1x1 DenseFormer with hash-bucket
    sparse attention (4 buckets: a query sees about a quarter of its keys)."""
    model = reasoning_lm.get_config().model.to_dict()
    model.update(
        vocab_size=0,  # the byte tokenizer's, for the corpus and the task alike
        dwa=dict(dilation=1, period=1),
        sparse_attention=dict(
            kind="hash", num_buckets=4, keep_rate=0.5, impl="auto", seed=0, slack=2.0
        ),
    )
    return model


def _ademamix(config: ml_collections.ConfigDict) -> None:
    """AdEMAMix with configs/ademamix_lm.py's hyperparameters; the learning rate is the run's,
    and the alpha / beta3 warm-up spans the run (as the paper's), also when --config.num_steps
    changes it (a field reference)."""
    lr = config.optim.learning_rate
    config.optim = ademamix_lm.get_config().optim
    config.optim.learning_rate = lr
    config.optim.warmup_alpha_b3 = config.get_oneway_ref("num_steps")


def _corpus(num_steps: int, mixer: bool) -> ml_collections.ConfigDict:
    config = lm_tiny.get_config()
    config.seq_len = SEQ_LEN
    config.batch_size = 16
    config.model = ml_collections.ConfigDict(teacher_model())
    config.mesh.update(data=1, num_devices=1)
    config.data.sources = tuple(f"embedded:{d}" for d in (*DOMAINS, TARGET))
    config.eval_per_source = True
    config.optim.learning_rate = 3e-3
    config = lm_tiny.with_num_steps(config, num_steps)
    if mixer:
        config.objective.name = "doge"
        config.mixer.update(mu=0.05, target_sources=(TARGET,))
    else:
        _ademamix(config)
    return config


def _distill() -> ml_collections.ConfigDict:
    config = distill.get_config()
    config.model = ml_collections.ConfigDict(teacher_model())
    config.data.tokenizer = "byte"
    _ademamix(config)
    # The pure student (MOHAWK: its blocks aligned on the teacher's averaged inputs), the hybrids
    # (MambaInLlama's recipe) and the random-init ablation.
    config.experiment.students = ("pure", "hybrid50", "hybrid25", "hybrid50_random")
    return config


def _tts() -> ml_collections.ConfigDict:
    config = test_time_scaling.get_config()
    config.data.tokenizer = "byte"
    config.experiment.distill_students = ("hybrid50", "hybrid25", "pure")
    return config


def get_config(stage: str = "distill") -> ml_collections.ConfigDict:
    if stage not in STAGES:
        raise ValueError(
            f"configs/composition.py: the stage must be one of {STAGES}, got {stage!r}"
        )
    if stage == "mixture":
        return _corpus(300, mixer=True)
    if stage == "pretrain":
        return _corpus(600, mixer=False)
    if stage == "distill":
        return _distill()
    return _tts()
