"""DoGE and DoReMi as training objectives (``config.objective.name = "doge" | "doremi"``).

The engine's batches carry ``domain`` (each token's component index). The components of
``config.data.sources`` are the domains; ``config.mixer.target_sources`` (DoGE's OOD objective)
are scored against but not trained on. Components are sampled uniformly: the weights act on the
gradients (DoGE) or the losses (DoReMi). The mixer's state is the objective's state, so it is
checkpointed and resumed with the run; after every checkpoint the averaged (published) and current
weights go to ``WORKDIR/domain_weights.json``, which a base run reads with
``config.data.weights_file``. DoReMi's reference model is the frozen model ``reference``, loaded
from ``run:{config.mixer.reference_workdir}``.

Both steps share the proxy experiments' code: :func:`jaxlab.mixing.proxy.doge_update` (on
per-domain gradients taken row by row, see :func:`doge_objective`) and :func:`doremi_gradients`.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from jaxlab import objectives
from jaxlab.mixing._doge import averaged_weights, current_weights, doge, row_domain_gradients
from jaxlab.mixing._doremi import domain_means, doremi
from jaxlab.mixing.proxy import doge_gradients, doge_update, doremi_gradients
from jaxlab.models.partitioning import mesh_parts
from jaxlab.optim import params_matching


def domain_masks(domain, mask, domains: tuple[int, ...]):
    """``[len(domains), batch, seq]``: the loss mask restricted to each domain's tokens."""
    return jnp.stack([(domain == d).astype(jnp.float32) * mask for d in domains])


def domain_mean_losses(losses, mask, domain, domains: tuple[int, ...]):
    """``([len(domains)] mean loss per domain, [len(domains)] token counts)``; a domain with no
    token in the batch gets loss 0 (and so zero gradient)."""
    return domain_means(losses, domain_masks(domain, mask, domains))


def _validate(config) -> None:
    if config.accum_steps != 1:
        raise ValueError(
            f"config.accum_steps must be 1 with a data mixer, got {config.accum_steps}"
        )
    if config.data.get("weights_file") or len(set(config.data.weights)) > 1:
        raise ValueError(
            "config.data.weights / weights_file: a mixer run samples its "
            "components uniformly (the weights act on gradients or losses); "
            "leave them empty"
        )


def _validate_doremi(config) -> None:
    _validate(config)
    if not config.mixer.reference_workdir:
        raise ValueError(
            "config.mixer.reference_workdir must name a finished run's workdir "
            "(DoReMi's reference model)"
        )
    if config.mixer.target_sources:
        raise ValueError("config.mixer.target_sources: DoReMi has no target domains")


def _domains(context) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(train, target)`` component indices."""
    m, names = context.config.mixer, context.components
    unknown = sorted(set(m.target_sources) - set(names))
    if unknown:
        raise ValueError(
            f"config.mixer.target_sources {unknown} are not data components {list(names)}"
        )
    target = tuple(i for i, n in enumerate(names) if n in m.target_sources)
    train = tuple(i for i in range(len(names)) if i not in target)
    if len(train) < 2:
        raise ValueError(
            f"a data mixer needs >= 2 training components, got {list(names)} with "
            f"targets {list(m.target_sources)}"
        )
    return train, target


def _weights_writer(kind: str, names, train, target):
    def on_checkpoint(workdir: str, state) -> None:
        state = jax.device_get(state)
        record = {
            "mixer": kind,
            "steps": int(state.step),
            "domains": [names[i] for i in train],
            "average": [float(w) for w in averaged_weights(state)],
            "last": [float(w) for w in current_weights(state)],
            "targets": [names[i] for i in target],
        }
        with open(os.path.join(workdir, "domain_weights.json"), "w") as f:
            json.dump(record, f, indent=2)

    return on_checkpoint


def _metrics(losses, counts, weights, names):
    tokens = jnp.sum(counts)
    metrics = {"loss": jnp.dot(losses, counts) / jnp.maximum(tokens, 1.0), "tokens": tokens}
    metrics.update({f"weight_{n}": w for n, w in zip(names, weights, strict=True)})
    return metrics


def _scored(context):
    """DoGE's ``param_filter``: the ``selected_params`` that train (frozen leaves never move, so
    their gradients must not enter the scores); None for all parameters."""
    m, trainable = context.config.mixer, context.trainable
    if not m.selected_params and trainable is None:
        return None
    selected = jax.tree.map(lambda _: True, context.params)
    if m.selected_params:
        selected = params_matching(
            context.params, m.selected_params, "config.mixer.selected_params"
        )
    if trainable is not None:
        selected = jax.tree.map(lambda s, t: s and t, selected, trainable)
    if not any(jax.tree.leaves(selected)):
        raise ValueError(
            f"config.mixer.selected_params {list(m.selected_params)} select only "
            f"frozen parameters (config.optim.frozen)"
        )
    return selected


def doge_objective(context) -> objectives.Objective:
    """Per-domain gradients of the training components (and of the targets for the OOD
    objective), clipped per domain by the mixer, the mixer update, then the weighted sum of the
    domain gradients. Metrics: ``loss`` (token mean over the train domains), ``weight_<name>``.

    The engine's rows each come from one component (:class:`jaxlab.data.pipeline.DataIterator`)
    and a language model's rows do not interact, so each domain's gradient is the sum of its
    rows' gradients: :func:`row_domain_gradients` gives every train and target domain's gradient
    from one forward and one backward pass (per-row gradients, ``B`` of them held at once, or
    ``config.mixer.rows_per_pass`` at a time).
    A batch with a row mixing domains' counted tokens takes the general path instead
    (:func:`jaxlab.mixing.proxy.doge_gradients`: ``k`` backward passes, ``m`` more for the
    targets), chosen per batch by ``lax.cond``; so does every batch when the mesh splits the
    batch over devices (a one-row model has no batch axis to split)."""
    m, names, graphdef = context.config.mixer, context.components, context.graphdef
    train, target = _domains(context)
    mixer = doge(
        num_domains=len(train),
        mu=m.mu,
        lr_schedule=context.schedule,
        score_clip=tuple(m.score_clip),
        objective="ood" if target else "universal",
        smoothing=m.smoothing,
        grad_clip=m.grad_clip or None,
        param_filter=_scored(context),
    )
    k = len(train)
    rows_per_pass = m.get("rows_per_pass", 0)
    if not isinstance(rows_per_pass, int) or rows_per_pass < 0:
        raise ValueError(
            "config.mixer.rows_per_pass must be an integer >= 0 (0: every row at once), got "
            f"{rows_per_pass!r}"
        )

    def per_domain(params, batch, domains):
        params = objectives.stop_frozen(params, context.trainable)
        losses, mask = objectives.token_losses(graphdef, params, batch)
        return domain_mean_losses(losses, mask, batch["domain"], domains)

    def by_domain(params, batch, state):
        target_losses = None
        if target:

            def target_losses(p):
                return per_domain(p, batch, target)[0]

        return doge_gradients(
            lambda p: per_domain(p, batch, train), params, mixer, state, target_losses
        )

    def row_loss(params, row):
        """One row's tokens weighted by 1 / (its domain's token count): its share of its
        domain's mean loss; aux: its per-token losses."""
        params = objectives.stop_frozen(params, context.trainable)
        one = {key: row[key][None] for key in objectives.MODEL_INPUTS}
        losses = objectives.token_losses(graphdef, params, one)[0][0]
        return jnp.sum(losses * row["weight"]), losses

    def by_rows(params, batch, state, masks):
        counts = jnp.sum(masks, axis=(1, 2))
        rows = {key: batch[key] for key in objectives.MODEL_INPUTS}
        rows["weight"] = jnp.sum(masks / jnp.maximum(counts, 1.0)[:, None, None], axis=0)
        members = jnp.any(masks > 0, axis=2)  # [train + target, B]
        grads, losses = row_domain_gradients(
            row_loss, params, rows, members, rows_per_pass=rows_per_pass
        )
        means = domain_means(losses, masks[:k])[0]
        target_grads = jax.tree.map(lambda g: g[k:], grads) if target else None
        grads = jax.tree.map(lambda g: g[:k], grads)
        return (*doge_update(grads, mixer, state, target_grads), means, counts[:k])

    def gradients(params, batch, frozen, state, rng):
        del frozen, rng
        if mesh_parts("batch") > 1:
            update, weights, state, losses, counts = by_domain(params, batch, state)
        else:
            mask = batch["loss_mask"].astype(jnp.float32)
            masks = domain_masks(batch["domain"], mask, train + target)
            one_domain_rows = jnp.all(jnp.sum(jnp.any(masks > 0, axis=2), axis=0) <= 1)
            update, weights, state, losses, counts = jax.lax.cond(
                one_domain_rows,
                by_rows,
                lambda params, batch, state, _: by_domain(params, batch, state),
                params,
                batch,
                state,
                masks,
            )
        return update, state, _metrics(losses, counts, weights, [names[i] for i in train])

    return objectives.Objective(
        gradients,
        init=mixer.init,
        batch_keys=("domain",),
        uniform_sampling=True,
        on_checkpoint=_weights_writer("doge", names, train, target),
    )


def doremi_objective(context) -> objectives.Objective:
    """The per-token excess loss over the frozen ``reference`` model (clipped at 0, averaged per
    domain) sets the weights; the model steps on the weighted sum of domain losses."""
    m, names, graphdef = context.config.mixer, context.components, context.graphdef
    train, target = _domains(context)
    reference = context.frozen["reference"]
    reference_vocab = context.frozen_configs["reference"].vocab_size
    if reference_vocab != context.model_config.vocab_size:
        raise ValueError(
            f"config.mixer.reference_workdir: the reference model's vocab_size "
            f"{reference_vocab} differs from the model's "
            f"{context.model_config.vocab_size}"
        )
    mixer = doremi(num_domains=len(train), step_size=m.step_size, smoothing=m.smoothing)

    def gradients(params, batch, frozen, state, rng):
        del rng
        reference_losses, mask = objectives.token_losses(reference, frozen["reference"], batch)
        masks = domain_masks(batch["domain"], mask, train)
        grads, weights, state, losses, counts = doremi_gradients(
            lambda p: objectives.token_losses(
                graphdef, objectives.stop_frozen(p, context.trainable), batch
            )[0],
            params,
            reference_losses,
            masks,
            mixer,
            state,
        )
        return grads, state, _metrics(losses, counts, weights, [names[i] for i in train])

    return objectives.Objective(
        gradients,
        init=mixer.init,
        batch_keys=("domain",),
        uniform_sampling=True,
        on_checkpoint=_weights_writer("doremi", names, train, target),
    )


objectives.register_objective("doge", doge_objective, validate=_validate)
objectives.register_objective(
    "doremi",
    doremi_objective,
    validate=_validate_doremi,
    frozen_models=lambda config: {"reference": f"run:{config.mixer.reference_workdir}"},
)
