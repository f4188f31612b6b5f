"""score / token_logprobs against a float64 NumPy log-softmax of the model's full logits."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab import models
from jaxlab.infer import score, token_logprobs, token_logprobs_and_greedy
from tests.infer import tiny_models

VOCAB = 37
CONFIGS = {
    "llama": tiny_models.llama(VOCAB),
    "mamba1": tiny_models.mamba(VOCAB),
    "hybrid mamba2": tiny_models.mamba(VOCAB, "mamba2", hybrid=True),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return models.build(CONFIGS[request.param], nnx.Rngs(1))


# The model's full forward, jitted (one compile per shape instead of one per operation).
_forward = nnx.jit(lambda model, tokens: model(tokens))


def _reference_logprobs(model, tokens):
    """[batch, seq] float64: log-softmax of the full logits (NumPy) gathered at the next token."""
    logits = np.asarray(_forward(model, np.asarray(tokens, np.int32)), np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logsoftmax = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    out = np.zeros(tokens.shape, np.float64)
    for b in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            out[b, t] = logsoftmax[b, t - 1, tokens[b, t]]
    return out


def test_score_is_the_masked_sum_of_float64_log_softmax(model):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (4, 13))
    mask = rng.integers(0, 2, (4, 13))
    mask[0] = 0  # a row with nothing scored sums to 0
    reference = _reference_logprobs(model, tokens)
    expected = (reference * mask)[:, 1:].sum(axis=1)
    got = score(model, tokens, mask)
    assert got.shape == (4,) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-4)
    assert float(got[0]) == 0.0
    # A bool mask and the default mask (every token after the first).
    np.testing.assert_allclose(
        np.asarray(score(model, tokens, mask.astype(bool))), expected, rtol=1e-5, atol=1e-4
    )
    np.testing.assert_allclose(
        np.asarray(score(model, tokens)), reference.sum(axis=1), rtol=1e-5, atol=1e-4
    )
    # mask[:, 0] is ignored: the first token has no prefix.
    np.testing.assert_allclose(
        np.asarray(score(model, tokens, np.ones_like(mask))),
        reference.sum(axis=1),
        rtol=1e-5,
        atol=1e-4,
    )


def test_token_logprobs_are_float64_log_softmax(model):
    tokens = np.random.default_rng(1).integers(0, VOCAB, (3, 10))
    got = token_logprobs(model, tokens)
    assert got.shape == (3, 10) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), _reference_logprobs(model, tokens), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(got[:, 0]), 0.0)


def test_greedy_flags_are_the_float64_argmax(model):
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, VOCAB, (3, 10))
    # About half of the tokens, left to right, become the argmax after their prefix; the rest
    # stay random (and are almost never the argmax).
    # (The model is causal: the logits at t - 1 of the whole row are those of the prefix.)
    for t in np.flatnonzero(rng.integers(0, 2, tokens.shape[1])[1:]) + 1:
        logits = np.asarray(_forward(model, jnp.asarray(tokens)), np.float64)
        tokens[:, t] = logits[:, t - 1].argmax(-1)
    logits = np.asarray(_forward(model, jnp.asarray(tokens)), np.float64)
    expected = np.zeros(tokens.shape, bool)
    expected[:, 1:] = logits.argmax(-1)[:, :-1] == tokens[:, 1:]
    assert 0 < expected.sum() < expected[:, 1:].size
    logprobs, greedy = token_logprobs_and_greedy(model, tokens)
    assert greedy.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(greedy), expected)
    np.testing.assert_allclose(np.asarray(logprobs), _reference_logprobs(model, tokens), atol=1e-4)


def test_right_padded_rows_score_as_their_unpadded_selves(model):
    """Multiple-choice style: context + answer, mask = answer tokens, random padding after."""
    rng = np.random.default_rng(2)
    rows = [(4, 3), (7, 5), (2, 1)]  # (context length, answer length)
    width = max(c + a for c, a in rows) + 3
    tokens = rng.integers(0, VOCAB, (len(rows), width))  # the padding is random ids too
    mask = np.zeros_like(tokens)
    expected = []
    for b, (c, a) in enumerate(rows):
        mask[b, c : c + a] = 1
        alone = _reference_logprobs(model, tokens[b : b + 1, : c + a])[0]
        expected.append(alone[c : c + a].sum())
    np.testing.assert_allclose(
        np.asarray(score(model, tokens, mask)), expected, rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize(
    "tokens, mask, error, message",
    [
        (np.zeros((2, 3, 1), int), None, ValueError, r"tokens must be \[batch, seq\] \(2-D\)"),
        (np.zeros((2, 3), np.float32), None, TypeError, "tokens must be integer ids, got dtype"),
        (np.zeros((2, 1), int), None, ValueError, "must have seq >= 2"),
        (np.full((2, 3), VOCAB), None, ValueError, rf"ids must lie in \[0, {VOCAB}\) .* = {VOCAB}"),
        (np.zeros((2, 65), int), None, ValueError, "seq=65, more than the model's max_seq_len=64"),
        (np.zeros((2, 3), int), np.ones((2, 4)), ValueError, r"mask must have the tokens' shape"),
        (np.zeros((2, 3), int), np.full((2, 3), "a"), TypeError, "mask must be bool or 0/1"),
        (np.zeros((2, 3), int), [[1, 0, 0], [0, 2, 1]], ValueError, r"got mask\[1, 1\] = 2"),
    ],
)
def test_bad_score_arguments_are_named(tokens, mask, error, message):
    model = models.build(CONFIGS["llama"], nnx.Rngs(0))
    with pytest.raises(error, match=message):
        score(model, tokens, mask)


def test_bad_token_logprobs_arguments_are_named():
    model = models.build(CONFIGS["llama"], nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"token_logprobs: token ids must lie in \[0, 37\)"):
        token_logprobs(model, np.array([[0, -1]]))
