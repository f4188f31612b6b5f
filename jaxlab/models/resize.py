"""Growing (or shrinking) a language model's vocabulary, e.g. after adding special tokens.

:func:`resize_vocabulary` returns a new model whose configuration has the new ``vocab_size`` and
whose parameters are the old model's, except that the input embedding ``embed: [vocab, embed]``
and, for an untied head, ``lm_head: [embed, vocab]`` gain rows / columns for the new ids. The old
rows and columns are copied unchanged, so on inputs made only of old ids the old ids' logits are
bitwise the same; the new ids get extra logits.

New rows start as the mean of the old rows (``init="mean"``; the common Hugging Face practice,
which keeps the new tokens' logits near the average logit instead of at a random scale) or as
``N(0, initializer_range^2)`` draws (``init="normal"``, the model's own initialiser). An untied
head's new columns are initialised the same way from the old columns. The tied head uses the
embedding, so it follows it.

Shrinking (``new_vocab_size < vocab_size``) drops the last rows / columns, for example the padding
that Megatron adds to a vocabulary; the kept ids' logits are unchanged as well.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlab import models

INITS = ("mean", "normal")


def _new_rows(old: jax.Array, count: int, init: str, std: float, key: jax.Array) -> jax.Array:
    """``[count, width]`` rows for ``old: [vocab, width]``, in ``old``'s dtype."""
    if init == "mean":
        mean = jnp.mean(old.astype(jnp.float32), axis=0, keepdims=True)
        rows = jnp.broadcast_to(mean, (count, old.shape[1]))
    else:
        rows = std * jax.random.normal(key, (count, old.shape[1]), jnp.float32)
    return rows.astype(old.dtype)


def resize_rows(
    old: jax.Array, size: int, init: str = "mean", std: float = 0.02, key: jax.Array | None = None
) -> jax.Array:
    """``old: [vocab, width]`` cut or extended to ``[size, width]`` (new rows as
    :func:`resize_vocabulary` makes them)."""
    if size <= old.shape[0]:
        return old[:size]
    return jnp.concatenate([old, _new_rows(old, size - old.shape[0], init, std, key)], axis=0)


def resize_vocabulary(
    model: nnx.Module,
    new_vocab_size: int,
    *,
    init: str = "mean",
    rng: jax.Array | int | None = None,
) -> nnx.Module:
    """A copy of ``model`` with ``new_vocab_size`` token ids.

    Works for any registered model with an ``embed: [vocab, embed]`` parameter, an optional
    ``lm_head: [embed, vocab]`` (absent when ``config.tie_embeddings``) and a frozen dataclass
    config with ``vocab_size`` (the Transformer and MambaLM). The input model is not modified.
    Parameters keep their dtypes and logical axis names (flax's ``out_sharding`` metadata).

    Args:
      model: the model to resize.
      new_vocab_size: the new number of ids (> 0). Smaller than the current size drops the last
        ids.
      init: ``"mean"`` (new rows = mean of the old rows; deterministic) or ``"normal"`` (normal
        draws with std ``config.initializer_range``; needs ``rng``).
      rng: a PRNG key or an int seed; required for ``init="normal"``, ignored for ``"mean"``.

    Returns:
      The resized model; ``model.config`` is ``dataclasses.replace(config,
      vocab_size=new_vocab_size)``.

    Raises:
      ValueError: a bad ``new_vocab_size`` or ``init``, ``init="normal"`` without ``rng``, or a
        model without the parameters described above.
    """
    config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(config) or not hasattr(config, "vocab_size"):
        raise ValueError(
            f"resize_vocabulary: model must have a dataclass config with vocab_size, got "
            f"{type(model).__name__} with config {type(config).__name__}"
        )
    if (
        not isinstance(new_vocab_size, int)
        or isinstance(new_vocab_size, bool)
        or (new_vocab_size < 1)
    ):
        raise ValueError(
            f"resize_vocabulary: new_vocab_size must be a positive int, got {new_vocab_size!r}"
        )
    if init not in INITS:
        raise ValueError(f"resize_vocabulary: init must be one of {INITS}, got {init!r}")
    if init == "normal" and rng is None:
        raise ValueError('resize_vocabulary: init="normal" needs rng (a PRNG key or an int)')
    tied = bool(getattr(config, "tie_embeddings", False))
    embed = getattr(model, "embed", None)
    head = getattr(model, "lm_head", None)
    if not isinstance(embed, nnx.Param) or embed.shape != (config.vocab_size, embed.shape[1]):
        raise ValueError(
            f"resize_vocabulary: {type(model).__name__} needs an embed parameter of shape "
            f"[vocab_size={config.vocab_size}, embed]"
        )
    if not tied and (not isinstance(head, nnx.Param) or head.shape[1] != config.vocab_size):
        raise ValueError(
            f"resize_vocabulary: an untied {type(model).__name__} needs an lm_head parameter of "
            f"shape [embed, vocab_size={config.vocab_size}]"
        )
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    embed_key, head_key = jax.random.split(rng) if rng is not None else (None, None)
    std = float(getattr(config, "initializer_range", 0.02))

    new_config = dataclasses.replace(config, vocab_size=new_vocab_size)
    # The new model's structure, without allocating (or drawing) any parameter.
    abstract = nnx.eval_shape(lambda: models.build(new_config, nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    _, old_state = nnx.split(model)
    new_state = jax.tree.map(lambda x: x, old_state)  # a new tree of the same arrays
    new_state["embed"] = embed.replace(
        resize_rows(embed[...], new_vocab_size, init, std, embed_key)
    )
    if not tied:
        new_state["lm_head"] = head.replace(
            resize_rows(head[...].T, new_vocab_size, init, std, head_key).T
        )
    shapes = jax.tree.map(jnp.shape, abstract_state)
    got = jax.tree.map(jnp.shape, new_state)
    if shapes != got:  # a model whose other parameters depend on vocab_size
        raise ValueError(
            f"resize_vocabulary: {type(model).__name__} has parameters other than embed/lm_head "
            "whose shapes depend on vocab_size; it cannot be resized here"
        )
    return nnx.merge(graphdef, new_state)
