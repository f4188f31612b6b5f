"""Held-out evaluation: the eval sets (overall and per source) and their loss and perplexity."""

from __future__ import annotations

import math

import numpy as np
from absl import logging

from jaxlab.data import pipeline
from jaxlab.train.build import Experiment
from jaxlab.train.feed import on_devices


def eval_sets(exp: Experiment, components) -> dict[str, list[dict[str, np.ndarray]]]:
    """Held-out batches: ``""`` over all components' validation documents, and with
    ``config.eval_per_source`` (and more than one component) each component's own, by name."""
    config = exp.config
    args = (config.data, exp.tokenizer, config.seq_len, config.batch_size, config.eval_batches)
    sets = {"": pipeline.eval_batches(*args, components)}
    with_validation = [c for c in components if len(c.validation)]
    if config.eval_per_source and len(with_validation) > 1:
        for c in with_validation:
            sets[c.name] = pipeline.eval_batches(*args, [c])
    if config.eval_per_source and len(components) > 1:
        # Components with documents but none held out (reasoning and qa sources hold none).
        if missing := [c.name for c in components if len(c.train) and not len(c.validation)]:
            logging.warning(
                "eval_per_source: no held-out documents in %s at config.data.validation_fraction="
                "%s, so no eval_loss/<name> for them",
                missing,
                config.data.validation_fraction,
            )
    return sets


def evaluate(exp: Experiment, params, eval_data, eval_step) -> dict[str, float]:
    """``eval_loss`` and ``eval_perplexity`` (token means) over ``eval_data``: a list of batches,
    or ``{name: batches}`` from :func:`eval_sets`, where each named source adds
    ``eval_loss/<name>`` and ``eval_perplexity/<name>``."""
    sets = eval_data if isinstance(eval_data, dict) else {"": eval_data}
    result = {}
    for name, batches in sets.items():
        loss_sum, tokens = 0.0, 0.0
        for batch in batches:
            out = eval_step(params, on_devices(batch, exp.mesh))
            loss_sum += float(out["loss_sum"])
            tokens += float(out["tokens"])
        loss = loss_sum / max(tokens, 1.0)
        suffix = f"/{name}" if name else ""
        result[f"eval_loss{suffix}"] = loss
        result[f"eval_perplexity{suffix}"] = math.exp(min(loss, 50.0))
    return result
