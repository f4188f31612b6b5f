"""A tiny byte-level Llama trained on the embedded standard-library corpus (minutes on a CPU).

Usage:
  python -m experiments.train_lm --config=configs/lm_tiny.py --workdir=runs/lm_tiny
  python -m experiments.train_lm --config=configs/lm_tiny.py --workdir=runs/x \
      --config.num_steps=50 --config.mesh.data=4 --config.mesh.tensor=2
"""

import ml_collections

from jaxlab.models.partitioning import DEFAULT_RULES


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Random seed of the parameter initialisation.
    config.seed = 0
    # Optimizer updates in the run (also the learning-rate schedule's horizon).
    config.num_steps = 600
    # Sequences per update (global, over all processes); split into accum_steps micro-batches.
    config.batch_size = 16
    config.accum_steps = 1
    # Tokens per packed sequence.
    config.seq_len = 128
    # Held-out evaluation every N steps, over eval_batches batches.
    config.eval_every = 200
    config.eval_batches = 4
    # Checkpoint every N steps, keeping the newest keep_checkpoints.
    config.checkpoint_every = 200
    config.keep_checkpoints = 3
    # Training metrics are fetched from the device and logged every N steps.
    config.log_every = 10
    # Held-out loss per data component too (eval_loss/<name>), when there are several.
    config.eval_per_source = True
    # Fields a resumed run may change although they alter the run (e.g. ("num_steps",) to extend
    # it); any other change to data, model, batch, sequence, seed or optimizer refuses to resume.
    config.allow_changes = ()

    # Starting parameters: "" (random, config.seed), "hf:PATH" (a Hugging Face Llama directory)
    # or "run:WORKDIR[@STEP]" (another run's checkpoint). "exact" needs every parameter to match;
    # "partial" copies the matching paths and keeps the rest random (init_from.json names them).
    # init_from_map renames source path prefixes first, e.g. (("layers/0", "layers/1"),).
    # A resumed run always starts from its own checkpoint.
    config.init_from = ""
    config.init_from_mode = "exact"
    config.init_from_map = ()
    # At the end of the run (step num_steps), the final parameters as a Hugging Face Llama
    # directory: "" (none), an absolute path, or a path inside the workdir; written in
    # export_hf_dtype ("" = the parameter dtype). Checked before training starts.
    config.export_hf = ""
    config.export_hf_dtype = ""

    # What the train step minimises (jaxlab.objectives registry): "next_token", "distill_kl"
    # (KL to the frozen teacher at `teacher`, "hf:PATH" or "run:WORKDIR[@STEP]", at
    # `temperature`, plus ce_weight x cross-entropy), or a data mixer, "doge" / "doremi"
    # (config.mixer below).
    config.objective = ml_collections.ConfigDict(
        dict(name="next_token", teacher="", temperature=1.0, ce_weight=0.0)
    )

    # The model (jaxlab.models.build); vocab_size 0 = the tokenizer's.
    config.model = ml_collections.ConfigDict(
        dict(
            name="llama",
            vocab_size=0,
            hidden_size=256,
            intermediate_size=688,
            num_layers=4,
            num_heads=8,
            num_kv_heads=4,
            max_seq_len=1024,
            rope_theta=10000.0,
            initializer_range=0.02,
            tie_embeddings=True,
            param_dtype="float32",
            dtype="float32",
            attention_impl="xla",
            # DenseFormer depth-weighted averages, e.g. {"dilation": 1, "period": 1}; None = off.
            dwa=None,
            # Dynamic sparse attention, e.g. {"kind": "hash", "num_buckets": 8} or
            # {"kind": "qk", "keep_rate": 0.5} (jaxlab.models.sparse_attention); None = dense.
            sparse_attention=None,
            # Recompute block activations in the backward pass (gradient checkpointing).
            remat=False,
            # Stack the blocks' parameters and run them with jax.lax.scan: one block is traced
            # and compiled, not num_layers. No KV-cache decoding, dwa or sparse_attention.
            scan_layers=False,
        )
    )

    # Data: mixture components by spec (see jaxlab.data.pipeline.resolve_source), token-share
    # weights (empty = natural proportions), tokenizer ("byte", or a path), documents packed
    # side by side per source (0 = batch_size).
    config.data = ml_collections.ConfigDict(
        dict(
            sources=("embedded",),
            weights=(),
            tokenizer="byte",
            text_field="text",
            tfds_data_dir="",
            validation_fraction=0.05,
            seed=0,
            lanes=0,
            # A domain_weights.json from a DoGE / DoReMi run: its averaged weights by name.
            weights_file="",
            # Tokens added to the tokenizer, one new id each (e.g. ChatML's "<|im_start|>",
            # "<|im_end|>"); with init_from, the embedding and head grow to fit them.
            special_tokens=(),
        )
    )

    # Optimizer (jaxlab.optim registry) and learning-rate schedule.
    config.optim = ml_collections.ConfigDict(
        dict(
            name="adamw",
            learning_rate=4e-3,
            warmup_steps=50,
            schedule="cosine",
            final_lr_fraction=0.1,
            decay_steps=0,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            clip_norm=1.0,
            # "wsd" (warmup-stable-decay): the last wsd_decay_fraction of the run decays in
            # wsd_shape ("linear", "cosine", "sqrt").
            wsd_decay_fraction=0.2,
            wsd_shape="linear",
            # Step counts of training stages (summing to num_steps); each restarts the schedule.
            stage_steps=(),
            # Parameters not trained: path patterns such as "embed" or "layers/0/" (no update,
            # no optimizer moments).
            frozen=(),
        )
    )

    # Parallelism: mesh axis sizes (-1 = the remaining devices; num_devices 0 = all devices) and
    # logical-axis rules (empty = jaxlab.train.sharding.DEFAULT_RULES). A dimension its mesh axes
    # do not divide is an error, so the byte tokenizer's 259 ids are replicated explicitly here;
    # with a real tokenizer whose vocabulary divides the tensor axis, set
    # --config.logical_axis_rules="()" to shard the embedding over it (llama2_7b.py does).
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, num_devices=0))
    config.logical_axis_rules = tuple(
        (axis, None if axis == "vocab" else target) for axis, target in DEFAULT_RULES
    )

    # Data mixer hyperparameters, for config.objective.name "doge" or "doremi" (jaxlab.mixing),
    # which learn domain weights while training. The components of config.data.sources are the
    # domains; target_sources (DoGE's OOD objective) are scored against but not trained on.
    # Components are sampled uniformly.
    # The averaged weights go to WORKDIR/domain_weights.json (config.data.weights_file reads it).
    # selected_params: DoGE scores only parameters whose path contains one of these strings
    # (e.g. "layers/1/mlp"; empty = all), which bounds the score computation.
    # rows_per_pass: DoGE takes per-row gradients (one backward pass for every domain) this many
    # rows at a time; memory rows_per_pass x the parameters (0: the whole batch at once).
    config.mixer = ml_collections.ConfigDict(
        dict(
            mu=0.01,
            score_clip=(0.0, 5.0),
            grad_clip=0.0,
            smoothing=0.0,
            target_sources=(),
            step_size=1.0,
            reference_workdir="",
            selected_params=(),
            rows_per_pass=0,
        )
    )
    return config


def with_num_steps(config: ml_collections.ConfigDict, num_steps: int) -> ml_collections.ConfigDict:
    """Rescales a run to ``num_steps``: evaluate 5 times, checkpoint at the end, warm-ups no longer
    than a tenth of the run (AdEMAMix's alpha/beta3 warm-up spans the whole run)."""
    config.num_steps = config.checkpoint_every = num_steps
    config.eval_every = max(num_steps // 5, 1)
    config.optim.warmup_steps = min(config.optim.warmup_steps, num_steps // 10)
    if "warmup_alpha_b3" in config.optim:
        config.optim.warmup_alpha_b3 = num_steps
    return config
