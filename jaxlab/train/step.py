"""Pure train and eval steps over ``(TrainState, batch)``.

The model is carried as an NNX graph definition (static) plus a pure dict of parameters, so the
steps are plain functions that ``jax.jit`` compiles with explicit shardings and donation.

Loss: next-token cross-entropy averaged over the tokens whose ``loss_mask`` is 1. With gradient
accumulation the batch is split into ``accum_steps`` micro-batches whose *summed* losses and token
counts are accumulated, so the update equals the full-batch update exactly (up to float
summation order), however the masked tokens fall across micro-batches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxlab.mixing.doge import domain_gradients, weighted_sum
from jaxlab.mixing.doremi import domain_excess, domain_means
from jaxlab.models.partitioning import DEFAULT_RULES, Rules, activation_sharding

Batch = dict[str, jax.Array]
# The batch entries the model and loss read (``domain`` and other extras stay on the host).
MODEL_INPUTS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def activation_sharding_during_trace(mesh: Mesh | None, rules: Rules):
    """Decorator: trace ``fn`` inside :func:`activation_sharding`, so its jitted form keeps the
    activation constraints whoever calls it."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with activation_sharding(mesh, rules):
                return fn(*args, **kwargs)

        return wrapped

    return decorate


class TrainState(NamedTuple):
    """Everything a training step reads and writes.

    Attributes:
      step: [] int32, number of updates applied.
      params: pure dict of parameter arrays (``nnx.to_pure_dict`` of the model's ``Param`` state).
      opt_state: the optimizer's state.
      mixer: the data mixer's state, or ``()``.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    mixer: Any = ()  # a data mixer's state (DoGE, DoReMi) when the run learns domain weights


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def token_losses(graphdef: nnx.GraphDef, params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy ``[batch, seq]`` and the float loss mask."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return losses, batch["loss_mask"].astype(jnp.float32)


def loss_sums(graphdef: nnx.GraphDef, params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Summed masked cross-entropy and the number of target tokens.

    Args:
      graphdef: the model's graph definition.
      params: pure dict of parameters.
      batch: ``inputs, targets, loss_mask, segment_ids, positions``, each [batch, seq].

    Returns:
      (sum of per-token losses, token count), float32 scalars.
    """
    losses, mask = token_losses(graphdef, params, batch)
    return jnp.sum(losses * mask), jnp.sum(mask)


def domain_masks(domain, mask, domains: tuple[int, ...]):
    """``[len(domains), batch, seq]``: the loss mask restricted to each domain's tokens."""
    return jnp.stack([(domain == d).astype(jnp.float32) * mask for d in domains])


def domain_mean_losses(losses, mask, domain, domains: tuple[int, ...]):
    """``([len(domains)] mean loss per domain, [len(domains)] token counts)``; a domain with no
    token in the batch gets loss 0 (and so zero gradient)."""
    return domain_means(losses, domain_masks(domain, mask, domains))


def _micro_batches(batch: Batch, accum_steps: int) -> Batch:
    """``[batch, ...] -> [accum_steps, batch / accum_steps, ...]``, micro-batch ``i`` taking rows
    ``i, i + accum_steps, ...``: every device keeps contributing its own rows to each micro-batch
    (contiguous blocks would put each micro-batch on a fraction of the devices)."""

    def split(x):
        if x.shape[0] % accum_steps:
            raise ValueError(
                f"batch size {x.shape[0]} is not divisible by accum_steps={accum_steps}"
            )
        return x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    *,
    accum_steps: int = 1,
    learning_rate: optax.Schedule | None = None,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """A pure ``(state, batch) -> (state, metrics)`` step.

    Metrics: ``loss`` (mean over target tokens), ``tokens``, ``grad_norm`` (before clipping),
    ``param_norm`` (after the update), and ``learning_rate`` if a schedule is given. With a
    ``mesh``, activations are pinned to the logical-axis ``rules`` (batch over data x fsdp).
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    grad_of_sums = jax.value_and_grad(lambda p, b: loss_sums(graphdef, p, b), has_aux=True)

    def train_step(state: TrainState, batch: Batch):
        batch = {
            k: batch[k] for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")
        }

        def accumulate(carry, micro):
            loss_sum, count, grads = carry
            (micro_loss, micro_count), micro_grads = grad_of_sums(state.params, micro)
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            return (loss_sum + micro_loss, count + micro_count, grads), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (jnp.float32(0), jnp.float32(0), zeros)
        (loss_sum, count, grads), _ = jax.lax.scan(
            accumulate, init, _micro_batches(batch, accum_steps)
        )
        denominator = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss_sum / denominator,
            "tokens": count,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
        }
        if learning_rate is not None:
            metrics["learning_rate"] = learning_rate(state.step)
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def make_eval_step(
    graphdef: nnx.GraphDef, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES
) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """``(params, batch) -> {"loss_sum", "tokens"}``; sum over batches, then divide."""

    @activation_sharding_during_trace(mesh, rules)
    def eval_step(params, batch: Batch):
        loss_sum, count = loss_sums(graphdef, params, batch)
        return {"loss_sum": loss_sum, "tokens": count}

    return eval_step


def make_mixer_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    mixer,
    *,
    kind: str,
    train_domains: tuple[int, ...],
    domain_names: tuple[str, ...],
    target_domains: tuple[int, ...] = (),
    reference_params=None,
    learning_rate: optax.Schedule | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """A ``(state, batch) -> (state, metrics)`` step that learns domain weights while training.

    ``batch["domain"]`` holds each token's source index. ``kind="doge"``: per-domain gradients of
    the ``train_domains`` (and of the ``target_domains`` for the OOD objective), clipped per
    domain by the mixer, the mixer update, then the optimizer steps on the weighted sum of the
    domain gradients. ``kind="doremi"``: the per-token excess loss over the frozen
    ``reference_params`` (clipped at 0, averaged per domain) sets the weights, then the optimizer
    steps on the weighted sum of domain losses. Metrics: as :func:`make_train_step`
    (``loss`` is the token-mean loss over the train domains) plus ``weight_<name>`` per domain.
    """
    if kind not in ("doge", "doremi"):
        raise ValueError(f"make_mixer_train_step: kind must be 'doge' or 'doremi', got {kind!r}")

    def per_domain(params, batch, domains):
        losses, mask = token_losses(graphdef, params, batch)
        return domain_mean_losses(losses, mask, batch["domain"], domains)

    def train_step(state: TrainState, batch: Batch):
        if kind == "doge":
            losses, grads, counts = domain_gradients(
                lambda p: per_domain(p, batch, train_domains), state.params, has_aux=True
            )
            grads = mixer.prepare(grads)  # per-domain clipping for the scores and the update
            target = None
            if target_domains:
                _, target = domain_gradients(
                    lambda p: per_domain(p, batch, target_domains)[0], state.params
                )
            weights, mixer_state = mixer.update(grads, state.mixer, target)
            update = weighted_sum(weights, grads)
        else:
            tokens_ref, _ = token_losses(graphdef, reference_params, batch)
            mask = batch["loss_mask"].astype(jnp.float32)
            # One forward pass: the token losses set the weights, then the VJP with cotangent
            # sum_i w_i mask_i / count_i gives the gradient of sum_i w_i mean_loss_i.
            tokens_now, vjp = jax.vjp(lambda p: token_losses(graphdef, p, batch)[0], state.params)
            masks = domain_masks(batch["domain"], mask, train_domains)
            excess, present = domain_excess(tokens_now, jax.lax.stop_gradient(tokens_ref), masks)
            losses, counts = domain_means(tokens_now, masks)
            weights, mixer_state = mixer.update(excess, state.mixer, present)
            per_token = weights / jnp.maximum(counts, 1.0)
            (update,) = vjp(jnp.tensordot(per_token, masks, axes=1).astype(tokens_now.dtype))
        updates, opt_state = optimizer.update(update, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        tokens = jnp.sum(counts)
        metrics = {
            "loss": jnp.dot(losses, counts) / jnp.maximum(tokens, 1.0),
            "tokens": tokens,
            "grad_norm": optax.tree.norm(update),
            "param_norm": optax.tree.norm(params),
        }
        metrics.update({f"weight_{n}": w for n, w in zip(domain_names, weights, strict=True)})
        if learning_rate is not None:
            metrics["learning_rate"] = learning_rate(state.step)
        return TrainState(state.step + 1, params, opt_state, mixer_state), metrics

    return train_step
