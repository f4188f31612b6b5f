"""Layer Parallelism (issue 19) on lm_tiny's Llama, 12 layers deep, trained on the embedded corpus.

Usage:
  python -m experiments.train_lm --config=configs/layer_parallel.py --workdir=runs/lp_teacher
  python -m experiments.layer_parallel --workdir=runs/layer_parallel   # the sweep of issue 19
  python -m experiments.bench.layer_parallel                           # decode and step costs

``experiment`` holds what only ``experiments/layer_parallel.py`` and its bench read (they drop the
block from the teacher's run config): the Delta values (layers paired), the start positions of
the paired run, the recovery fine-tune and the decode measurement.
"""

import ml_collections

from configs import lm_tiny


def get_config() -> ml_collections.ConfigDict:
    config = lm_tiny.get_config()
    config.model.num_layers = 12
    # The teacher trains on one device; the tensor-mesh measurements build their own mesh.
    config.mesh.update(data=1, num_devices=1)
    config.experiment = ml_collections.ConfigDict(
        dict(
            # Delta: consecutive layers evaluated in pairs, so the depth drops by Delta / 2.
            deltas=(2, 4, 6),
            # Start positions of the paired run [start, start + Delta); empty: every even start
            # that keeps the first and the last layer sequential (default_starts).
            starts=(),
            # Recovery fine-tune of the best LP model's paired layers (all else frozen), by KL to
            # the teacher: the Deltas it runs for (those also in deltas; empty: all of deltas;
            # 4 is the cut nearest the paper's 1.19x), its steps, learning rate and the weight of
            # next-token cross-entropy added to the KL.
            recovery_deltas=(4,),
            recovery_steps=200,
            recovery_learning_rate=1e-3,
            recovery_ce_weight=0.0,
            # Greedy decoding: rows generated at once, tokens per row after a prompt_len prompt,
            # timed rounds (median), and the devices of the tensor mesh measurement (0 or 1:
            # none). tensor_devices > 1 makes that many fake CPU devices on a CPU host.
            decode_batches=(1, 16),
            decode_tokens=128,
            prompt_len=16,
            decode_repeats=3,
            tensor_devices=2,
            # Take the teacher as it is from --teacher_workdir, a finished run of any
            # experiment (e.g. MEDITRON's continued pretraining): its stored config.json
            # replaces every field of this config but this block (model, data, held-out set).
            teacher_from_run=False,
        )
    )
    return config


def default_starts(num_layers: int, delta: int) -> tuple[int, ...]:
    """Every even start ``s >= 2`` with ``s + delta <= num_layers - 1``: the paired run keeps the
    first and the last layer sequential (the authors keep early and last layers as they are)."""
    return tuple(range(2, num_layers - delta, 2))


def sweep_starts(config: ml_collections.ConfigDict, delta: int) -> tuple[int, ...]:
    """The start positions ``experiment.starts`` names (those whose run fits in the model), or
    :func:`default_starts`."""
    num_layers = config.model.num_layers
    if config.experiment.starts:
        return tuple(s for s in config.experiment.starts if 0 <= s and s + delta <= num_layers)
    return default_starts(num_layers, delta)
