"""Depth surgery on a trained Llama-family model: Layer Parallelism and its baselines.

Every function takes a :class:`~jaxlab.models.transformer.Transformer` (Hugging Face loaded ones
included) and returns a new one of the same registered family, so the result trains, decodes
with a cache, saves and loads like any other model; the input model is left as it was.

* :func:`layer_parallel`: consecutive pairs of layers in ``[start, end)`` evaluated side by side
  ("Leveraging the true depth of LLMs"): both attentions read the same input, both MLPs the same
  intermediate, ``h = x + A_i(N_i x) + A_{i+1}(N_{i+1} x)``, ``y = h + M_i(N'_i h) +
  M_{i+1}(N'_{i+1} h)``. Folded (the default) each pair is one layer twice as wide whose norm
  scales live in its projections, which is exact, and on a tensor-parallel mesh needs one
  all-reduce per sub-block, as one ordinary layer does.
* Baselines at the same kind of depth reduction: :func:`prune_layers` (drop a contiguous run),
  :func:`angular_distances` and :func:`prune_by_angular_distance` (Gromov et al.: drop the run
  whose input and output are closest), :func:`merge_layers` (average the weights of consecutive
  pairs) and :func:`shuffle_layers` (permute a run; no depth reduction).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.models.transformer import Transformer, TransformerConfig

NORMS = ("exact", "shared")


def _checked_model(model: Any, caller: str) -> TransformerConfig:
    if not isinstance(model, Transformer):
        raise TypeError(
            f"{caller}: model must be a jaxlab Transformer (a Llama-family model), got "
            f"{type(model).__name__}"
        )
    c = model.config
    for field in ("scan_layers", "dwa", "sparse_attention", "layer_widths", "parallel_groups"):
        if getattr(c, field):
            raise ValueError(
                f"{caller}: model must be a plain sequential Llama; its config has "
                f"{field}={getattr(c, field)!r}"
            )
    return c


def _checked_range(c: TransformerConfig, start: int, end: int, caller: str, *, even: bool):
    for name, value in (("start", start), ("end", end)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{caller}: {name} must be an int, got {value!r}")
    if not 0 <= start <= end <= c.num_layers:
        raise ValueError(
            f"{caller}: need 0 <= start <= end <= num_layers={c.num_layers}, got start={start}, "
            f"end={end}"
        )
    if even and (end - start) % 2:
        raise ValueError(
            f"{caller}: end - start must be even (layers go in pairs), got start={start}, end={end}"
        )


def _params(model: Transformer) -> dict:
    """The model's parameters as nested dicts of float32 NumPy arrays (layers keyed by index)."""
    pure = nnx.state(model, nnx.Param).to_pure_dict()
    return jax.tree.map(lambda a: np.asarray(a, np.float32), pure)


def _build(config: TransformerConfig, params: dict) -> Transformer:
    """A model of ``config`` holding ``params`` (cast to its storage dtype), with the sharding
    metadata a freshly built one has."""
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    values = jax.tree.map(lambda a: jnp.asarray(a, config.storage_dtype), params)
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)


def _with_layers(model: Transformer, layers: list[dict], **changes) -> Transformer:
    params = _params(model)
    params["layers"] = dict(enumerate(layers))
    config = dataclasses.replace(model.config, num_layers=len(layers), **changes)
    return _build(config, params)


def _fold_pair(a: dict, b: dict, norm: str) -> dict:
    """One layer twice as wide computing layers ``a`` and ``b`` side by side, with each layer's
    RMSNorm scales multiplied into the rows of the projections that read the norm's output."""
    g_a, g_b = a["input_norm"]["scale"], b["input_norm"]["scale"]
    attn = {}
    for name in ("q", "k", "v"):
        attn[f"{name}_proj"] = np.concatenate(
            [
                g_a[:, None, None] * a["attn"][f"{name}_proj"],
                g_b[:, None, None] * b["attn"][f"{name}_proj"],
            ],
            axis=1,
        )
        if f"{name}_bias" in a["attn"]:
            attn[f"{name}_bias"] = np.concatenate(
                [a["attn"][f"{name}_bias"], b["attn"][f"{name}_bias"]], axis=0
            )
    attn["o_proj"] = np.concatenate([a["attn"]["o_proj"], b["attn"]["o_proj"]], axis=0)
    if "o_bias" in a["attn"]:
        attn["o_bias"] = a["attn"]["o_bias"] + b["attn"]["o_bias"]

    m_a, m_b = a["post_attention_norm"]["scale"], b["post_attention_norm"]["scale"]
    width = a["mlp"]["gate_proj"].shape[1]
    if norm == "exact":
        scales = (m_a[:, None], m_b[:, None])
    else:
        # The authors' 2-GPU layout: GPU k holds the k-th half of both MLPs' columns and applies
        # its own layer's norm, so half of each MLP sees the other layer's scale.
        half = np.arange(width) < width // 2
        shared = np.where(half[None, :], m_a[:, None], m_b[:, None])
        scales = (shared, shared)
    mlp = {}
    for name in ("gate", "up"):
        mlp[f"{name}_proj"] = np.concatenate(
            [scales[0] * a["mlp"][f"{name}_proj"], scales[1] * b["mlp"][f"{name}_proj"]], axis=1
        )
        if f"{name}_bias" in a["mlp"]:
            mlp[f"{name}_bias"] = np.concatenate(
                [a["mlp"][f"{name}_bias"], b["mlp"][f"{name}_bias"]], axis=0
            )
    mlp["down_proj"] = np.concatenate([a["mlp"]["down_proj"], b["mlp"]["down_proj"]], axis=0)
    if "down_bias" in a["mlp"]:
        mlp["down_bias"] = a["mlp"]["down_bias"] + b["mlp"]["down_bias"]
    ones = np.ones_like(g_a)
    return {
        "input_norm": {"scale": ones},
        "attn": attn,
        "post_attention_norm": {"scale": ones},
        "mlp": mlp,
    }


def layer_parallel(
    model: Transformer, start: int, end: int, *, fold: bool = True, norm: str = "exact"
) -> Transformer:
    """Layers ``[start, end)`` of ``model`` evaluated in consecutive pairs, side by side.

    The pair ``(i, i+1)`` computes ``h = x + A_i(N_i x) + A_{i+1}(N_{i+1} x)``, ``y = h +
    M_i(N'_i h) + M_{i+1}(N'_{i+1} h)``, so the model has ``(end - start) / 2`` fewer sequential
    blocks and the same parameters and KV-cache bytes.

    Args:
      model: a sequential Llama-family :class:`Transformer`.
      start, end: the paired layers, ``0 <= start <= end <= num_layers``, ``end - start`` even;
        ``start == end`` returns a copy of ``model``.
      fold: True: each pair becomes one layer with 2x the query heads, kv heads and MLP width
        (``TransformerConfig.layer_widths``), its norms' scales folded into the q/k/v and
        gate/up rows (the norm scales of the new layer are 1), exact up to rounding; on a
        tensor mesh its heads and MLP columns shard as one layer's do. False: the original
        blocks are kept, parameter for parameter, and run in groups
        (``TransformerConfig.parallel_groups``), the formula as written.
      norm: ``"exact"`` (each layer's own norms) or ``"shared"``, the authors' 2-GPU
        approximation, folded only: half of each MLP's columns read the other layer's
        post-attention norm scale (both attentions keep their own).

    Returns:
      A new :class:`Transformer`; ``model`` is unchanged.
    """
    caller = "layer_parallel"
    c = _checked_model(model, caller)
    _checked_range(c, start, end, caller, even=True)
    if norm not in NORMS:
        raise ValueError(f"{caller}: norm must be one of {NORMS}, got {norm!r}")
    if norm == "shared" and not fold:
        raise ValueError(f"{caller}: norm='shared' is a folded layout; got fold=False")
    pairs = (end - start) // 2
    if pairs == 0:
        return _build(c, _params(model))
    if not fold:
        groups = (1,) * start + (2,) * pairs + (1,) * (c.num_layers - end)
        return _build(dataclasses.replace(c, parallel_groups=groups), _params(model))
    layers = _params(model)["layers"]
    new_layers = [layers[i] for i in range(start)]
    new_layers += [_fold_pair(layers[i], layers[i + 1], norm) for i in range(start, end, 2)]
    new_layers += [layers[i] for i in range(end, c.num_layers)]
    widths = (1,) * start + (2,) * pairs + (1,) * (c.num_layers - end)
    return _with_layers(model, new_layers, layer_widths=widths)


def prune_layers(model: Transformer, start: int, end: int) -> Transformer:
    """``model`` without layers ``[start, end)`` (at least one layer must remain)."""
    c = _checked_model(model, "prune_layers")
    _checked_range(c, start, end, "prune_layers", even=False)
    if end - start == c.num_layers:
        raise ValueError(
            f"prune_layers: cannot remove all {c.num_layers} layers (start={start}, end={end})"
        )
    layers = _params(model)["layers"]
    return _with_layers(model, [layers[i] for i in range(c.num_layers) if not start <= i < end])


def merge_layers(model: Transformer, start: int, end: int) -> Transformer:
    """Consecutive pairs in ``[start, end)`` replaced by one layer each whose every parameter
    (norm scales included) is the mean of the pair's: ``(end - start) / 2`` fewer layers."""
    c = _checked_model(model, "merge_layers")
    _checked_range(c, start, end, "merge_layers", even=True)
    layers = _params(model)["layers"]
    merged = [
        jax.tree.map(lambda p, q: (p + q) / 2, layers[i], layers[i + 1])
        for i in range(start, end, 2)
    ]
    rest = [layers[i] for i in range(end, c.num_layers)]
    return _with_layers(model, [layers[i] for i in range(start)] + merged + rest)


def shuffle_layers(model: Transformer, start: int, end: int, *, seed: int = 0) -> Transformer:
    """Layers ``[start, end)`` of ``model`` in the order :func:`shuffled_order` draws from
    ``seed``; the depth is unchanged."""
    c = _checked_model(model, "shuffle_layers")
    _checked_range(c, start, end, "shuffle_layers", even=False)
    layers = _params(model)["layers"]
    return _with_layers(model, [layers[i] for i in shuffled_order(c.num_layers, start, end, seed)])


def shuffled_order(num_layers: int, start: int, end: int, seed: int = 0) -> list[int]:
    """The layer order of :func:`shuffle_layers`: indices outside ``[start, end)`` stay, those
    inside are a uniformly drawn derangement (no layer keeps its place) when there are >= 2."""
    rng = np.random.default_rng(seed)
    run = list(range(start, end))
    if len(run) >= 2:
        while True:  # redraw until no layer stays put (about e tries on average)
            perm = [int(p) for p in rng.permutation(run)]
            if all(p != i for p, i in zip(perm, run, strict=True)):
                run = perm
                break
    return list(range(start)) + run + list(range(end, num_layers))


def angular_distances(model: Transformer, tokens: jax.Array, n: int, *, lengths=None) -> np.ndarray:
    """Gromov et al.'s angular distance between the input of layer ``l`` and of layer ``l + n``
    (the residual stream after ``l + n`` layers), ``arccos(cos_sim) / pi`` at each row's last
    token, averaged over the rows, for every ``l`` in ``0 .. num_layers - n``.

    Args:
      model: a sequential Llama-family :class:`Transformer`.
      tokens: ``[batch, seq]`` int token ids.
      n: how many consecutive layers a run spans, ``1 <= n <= num_layers``.
      lengths: optional ``[batch]`` number of real tokens per row (right padding); default all.

    Returns:
      ``[num_layers - n + 1]`` float64 distances in ``[0, 1]``; the smallest marks the run of
      ``n`` layers that changes its input least.
    """
    c = _checked_model(model, "angular_distances")
    if not isinstance(n, int) or not 1 <= n <= c.num_layers:
        raise ValueError(
            f"angular_distances: n must be an int in [1, num_layers={c.num_layers}], got {n!r}"
        )
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"angular_distances: tokens must be [batch, seq], got {tokens.shape}")
    batch, seq = tokens.shape
    last = np.full(batch, seq - 1) if lengths is None else np.asarray(lengths) - 1
    if last.shape != (batch,) or np.any(last < 0) or np.any(last >= seq):
        raise ValueError(
            f"angular_distances: lengths must be [batch={batch}] ints in [1, seq={seq}], got "
            f"{lengths!r}"
        )
    _, hidden = model(tokens, return_hidden=True)
    states = np.stack([np.asarray(h, np.float64)[np.arange(batch), last] for h in hidden.residuals])
    unit = states / np.linalg.norm(states, axis=-1, keepdims=True)
    cosine = np.clip(np.sum(unit[:-n] * unit[n:], axis=-1), -1.0, 1.0)  # [L - n + 1, batch]
    return np.mean(np.arccos(cosine) / np.pi, axis=-1)


def prune_by_angular_distance(
    model: Transformer, tokens: jax.Array, n: int, *, lengths=None
) -> tuple[Transformer, int]:
    """Drops the ``n`` consecutive layers whose input and output are closest in angular distance
    on ``tokens`` (Gromov et al.'s choice); returns the pruned model and the run's start."""
    start = int(np.argmin(angular_distances(model, tokens, n, lengths=lengths)))
    return prune_layers(model, start, start + n), start
