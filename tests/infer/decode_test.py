"""KV-cache decoding and generation against the full forward and transformers' generate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxlab.infer import SamplingConfig, decode_step, generate, prefill
from jaxlab.infer import decode as decode_lib
from jaxlab.interop.hf import load_hf_llama
from jaxlab.models import init_cache
from tests.hf_utils import HF_CONFIGS, make_hf_model


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def models(request, tmp_path_factory):
    hf_model = make_hf_model(request.param, seed=11)
    path = str(tmp_path_factory.mktemp(request.param))
    hf_model.save_pretrained(path)
    return hf_model, load_hf_llama(path)


def test_cached_logits_equal_full_forward_at_every_position(models):
    _, model = models
    rng = np.random.default_rng(0)
    seq_lens = np.array([9, 14, 12])
    prompt_lens = np.array([3, 7, 12])
    batch, total = len(seq_lens), seq_lens.max()
    tokens = rng.integers(1, 97, (batch, total))
    for b in range(batch):
        tokens[b, seq_lens[b] :] = 0  # padding never influences real positions

    width = prompt_lens.max()
    cache = init_cache(model.config, batch, total)
    prompt_logits, cache = prefill(model, jnp.asarray(tokens[:, :width]), cache)
    cached = np.zeros((batch, total, model.config.vocab_size), np.float32)
    for b in range(batch):
        cached[b, : prompt_lens[b]] = np.asarray(prompt_logits[b, : prompt_lens[b]])
    step = jax.jit(lambda t, p, c: decode_step(model, t, p, c))
    positions = prompt_lens.copy()
    while (positions < seq_lens).any():
        feed = tokens[np.arange(batch), np.minimum(positions, total - 1)]
        logits, cache = step(
            jnp.asarray(feed), jnp.asarray(np.minimum(positions, total - 1)), cache
        )
        for b in np.flatnonzero(positions < seq_lens):
            cached[b, positions[b]] = np.asarray(logits[b])
        positions += 1

    forward = nnx.jit(lambda model, tokens: model(tokens))
    for b in range(batch):
        full = np.asarray(forward(model, tokens[b : b + 1, : seq_lens[b]].astype(np.int32)))[0]
        np.testing.assert_allclose(cached[b, : seq_lens[b]], full, atol=1e-4)


def _hf_greedy(hf_model, prompts, new_tokens):
    with torch.no_grad():
        out = hf_model.generate(
            torch.as_tensor(prompts),
            attention_mask=torch.ones(prompts.shape, dtype=torch.long),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[:, prompts.shape[1] :].numpy()


def test_greedy_generation_matches_transformers(models):
    hf_model, model = models
    prompts = np.random.default_rng(1).integers(0, 97, (2, 8))
    ours = generate(model, jnp.asarray(prompts), max_new_tokens=32, stop_tokens=())
    np.testing.assert_array_equal(np.asarray(ours.tokens), _hf_greedy(hf_model, prompts, 32))
    np.testing.assert_array_equal(np.asarray(ours.lengths), [32, 32])


def test_batched_prompts_of_different_lengths(models):
    hf_model, model = models
    rng = np.random.default_rng(2)
    lengths = [4, 11, 7]
    prompts = np.zeros((3, 11), np.int64)
    for b, n in enumerate(lengths):
        prompts[b, :n] = rng.integers(1, 97, n)
    ours = generate(model, jnp.asarray(prompts), lengths, max_new_tokens=16, stop_tokens=())
    for b, n in enumerate(lengths):
        expected = _hf_greedy(hf_model, prompts[b : b + 1, :n], 16)[0]
        np.testing.assert_array_equal(np.asarray(ours.tokens[b]), expected)


def test_stop_tokens_end_rows_independently(models):
    hf_model, model = models
    prompts = np.random.default_rng(3).integers(0, 97, (2, 6))
    reference = _hf_greedy(hf_model, prompts, 20)
    stop = int(reference[0, 4])
    expected_len = [int(np.argmax(row == stop)) + 1 if stop in row else 20 for row in reference]
    out = generate(model, jnp.asarray(prompts), max_new_tokens=20, stop_tokens=(stop,), pad_id=-1)
    np.testing.assert_array_equal(np.asarray(out.lengths), expected_len)
    for b, n in enumerate(expected_len):
        np.testing.assert_array_equal(np.asarray(out.tokens[b, :n]), reference[b, :n])
        assert (np.asarray(out.tokens[b, n:]) == -1).all()


def test_generation_compiles_once_per_shape(models):
    _, model = models
    decode_lib._generate.clear_cache()
    rng = np.random.default_rng(4)
    for seed in range(3):
        prompts = jnp.asarray(rng.integers(0, 97, (2, 5)))
        generate(
            model,
            prompts,
            [5, 3],
            max_new_tokens=6,
            sampling=SamplingConfig(temperature=0.8, top_k=10),
            rng=jax.random.PRNGKey(seed),
        )
    assert decode_lib._generate._cache_size() == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt_lengths=[0, 3]), r"prompt_lengths must lie in \[1, 4\]"),
        (dict(prompt_lengths=[1, 5]), r"prompt_lengths must lie in \[1, 4\]"),
        (dict(prompt_lengths=[1]), r"prompt_lengths must be \[2\]"),
        (dict(max_new_tokens=200), "exceeds the model's max_seq_len=128"),
        (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1, got 0"),
        (
            dict(prompts=[[1, 2, 3, 97], [0, 0, 0, 0]]),
            r"ids must lie in \[0, 97\) .* got prompts\[0, 3\] = 97 \(min 0, max 97\)",
        ),
        (dict(prompts=[[1, 2, 3, -5], [0, 0, 0, 0]]), r"got prompts\[0, 3\] = -5 \(min -5"),
    ],
)
def test_bad_generate_arguments(models, kwargs, message):
    _, model = models
    kwargs = {"max_new_tokens": 4, **kwargs}
    prompts = jnp.asarray(kwargs.pop("prompts", np.zeros((2, 4), np.int32)))
    with pytest.raises(ValueError, match=message):
        generate(model, prompts, **kwargs)
