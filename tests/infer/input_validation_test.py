"""Bad input to generate, SamplingConfig, score and token_logprobs(_and_greedy): a named error,
nothing traced.

Each case was silently wrong or failed deep inside JAX/NumPy before: a 1-D prompt gave
``IndexError: tuple index out of range``; ids >= 2**32 wrapped into the vocabulary and float
prompts were truncated by the int32 cast; ``temperature=nan`` generated all-0 tokens; a float
``max_new_tokens``/``top_k`` raised JAX's "Shapes must be 1D sequences of concrete values";
``pad_id`` and ``stop_tokens`` were used unchecked; an empty batch raised NumPy's "zero-size array
to reduction operation". Every error names the argument, what was expected and what was given.
"""

import dataclasses
import importlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab import models
from jaxlab.infer import (
    SamplingConfig,
    generate,
    score,
    token_logprobs,
    token_logprobs_and_greedy,
)
from jaxlab.infer import decode as decode_lib
from tests.infer import tiny_models

# jaxlab.infer.score is also the name of the function it re-exports.
score_lib = importlib.import_module("jaxlab.infer.score")

VOCAB = 16
PROMPTS = np.array([[1, 2, 3], [4, 5, 0]], np.int32)


@pytest.fixture(scope="module")
def llama():
    return models.build(tiny_models.llama(VOCAB), nnx.Rngs(0))


GENERATE_CASES = {
    "1-D prompt": (
        dict(prompts=np.array([1, 2, 3])),
        ValueError,
        r"prompts must be \[batch, prompt_len\] \(2-D\), got shape \(3,\) \(for one prompt, "
        r"pass prompts\[None\]\)",
    ),
    "3-D prompts": (
        dict(prompts=np.zeros((2, 3, 1), np.int32)),
        ValueError,
        r"prompts must be \[batch, prompt_len\] \(2-D\), got shape \(2, 3, 1\)",
    ),
    "id 2**32 + 1 (wrapped to 1)": (
        dict(prompts=np.array([[1, 2**32 + 1, 3]])),
        ValueError,
        r"prompt token ids must lie in \[0, 16\) .* got prompts\[0, 1\] = 4294967297",
    ),
    "uint64 id 2**63": (
        dict(prompts=np.array([[2**63, 1]], np.uint64)),
        ValueError,
        r"prompt token ids must lie in \[0, 16\) .* got prompts\[0, 0\] = 9223372036854775808",
    ),
    "id = vocab_size": (
        dict(prompts=np.array([[1, 2, 16]])),
        ValueError,
        r"prompt token ids must lie in \[0, 16\) .* got prompts\[0, 2\] = 16",
    ),
    "negative id": (
        dict(prompts=np.array([[1, -5, 2]])),
        ValueError,
        r"got prompts\[0, 1\] = -5 \(min -5",
    ),
    "float prompts (truncated)": (
        dict(prompts=np.array([[1.7, 2.2]])),
        TypeError,
        "prompts must be integer token ids, got dtype float64",
    ),
    "jax float prompts": (
        dict(prompts=jnp.array([[1.0, 2.0]])),
        TypeError,
        "prompts must be integer token ids, got dtype float32",
    ),
    "bool prompts": (
        dict(prompts=np.ones((1, 2), bool)),
        TypeError,
        "prompts must be integer token ids, got dtype bool",
    ),
    "empty batch": (
        dict(prompts=np.zeros((0, 3), np.int32)),
        ValueError,
        r"prompts must hold at least one prompt of at least one token, got shape \(0, 3\)",
    ),
    "empty prompts": (
        dict(prompts=np.zeros((2, 0), np.int32)),
        ValueError,
        r"at least one token, got shape \(2, 0\)",
    ),
    "float max_new_tokens": (
        dict(max_new_tokens=2.0),
        TypeError,
        "max_new_tokens must be an int >= 1, got 2.0",
    ),
    "bool max_new_tokens": (
        dict(max_new_tokens=True),
        TypeError,
        "max_new_tokens must be an int >= 1, got True",
    ),
    "zero max_new_tokens": (
        dict(max_new_tokens=0),
        ValueError,
        "max_new_tokens must be an int >= 1, got 0",
    ),
    "bool num_samples": (
        dict(num_samples=True),
        TypeError,
        "num_samples must be an int >= 1, got True",
    ),
    "numpy float num_samples": (
        dict(num_samples=np.float64(2.0)),
        TypeError,
        r"num_samples must be an int >= 1, got np.float64\(2.0\)",
    ),
    "float prompt_lengths": (
        dict(prompt_lengths=[1.5, 2.0]),
        TypeError,
        r"prompt_lengths must be integers, got dtype float64: \[1.5, 2.0\]",
    ),
    "bool prompt_lengths": (
        dict(prompt_lengths=[True, True]),
        TypeError,
        "prompt_lengths must be integers, got dtype bool",
    ),
    "prompt_lengths 2**32 + 1 (wrapped to 1)": (
        dict(prompt_lengths=np.array([2**32 + 1, 2])),
        ValueError,
        r"prompt_lengths must lie in \[1, 3\] \(prompt_len\), got \[4294967297, 2\]",
    ),
    "pad_id 2**32 (wrapped to 0)": (
        dict(pad_id=2**32),
        ValueError,
        r"pad_id must fit the int32 output, \[-2147483648, 2147483647\], got 4294967296",
    ),
    "pad_id -2**31 - 1": (dict(pad_id=-(2**31) - 1), ValueError, "got -2147483649"),
    "float pad_id (truncated)": (
        dict(pad_id=0.5),
        TypeError,
        r"pad_id must be an int \(an int32 value\), got 0.5",
    ),
    "numpy bool pad_id": (
        dict(pad_id=np.True_),
        TypeError,
        r"pad_id must be an int .* got np.True_",
    ),
    "stop token out of range": (
        dict(stop_tokens=(3, 2**40)),
        ValueError,
        r"stop_tokens\[1\] must lie in \[0, 16\) .* got 1099511627776",
    ),
    "negative stop token": (
        dict(stop_tokens=[-1]),
        ValueError,
        r"stop_tokens\[0\] must lie in \[0, 16\) .* got -1",
    ),
    "float stop token": (
        dict(stop_tokens=(2.0,)),
        TypeError,
        r"stop_tokens\[0\] must be an int token id in \[0, 16\), got 2.0",
    ),
    "bare int stop_tokens": (
        dict(stop_tokens=3),
        TypeError,
        r"stop_tokens must be a sequence of int token ids such as \(3,\), got 3",
    ),
    "2-D stop_tokens": (
        dict(stop_tokens=np.array([[3]])),
        TypeError,
        r"stop_tokens must be a 1-D sequence of int token ids, got an array of shape \(1, 1\)",
    ),
    "str stop_tokens": (
        dict(stop_tokens="3"),
        TypeError,
        "stop_tokens must be a sequence of int token ids",
    ),
    "sampling not a SamplingConfig": (
        dict(sampling={"temperature": 1.0}),
        TypeError,
        r"sampling must be a jaxlab.infer.SamplingConfig or None \(greedy\), got "
        r"\{'temperature': 1.0\}",
    ),
}


@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
def test_bad_generate_argument_is_named_before_tracing(llama, case):
    kwargs, error, message = GENERATE_CASES[case]
    kwargs = {"prompts": PROMPTS, "max_new_tokens": 2, **kwargs}
    prompts = kwargs.pop("prompts")
    traced = decode_lib._generate._cache_size()
    with pytest.raises(error, match=message):
        generate(llama, prompts, **kwargs)
    assert decode_lib._generate._cache_size() == traced


def test_out_of_range_default_eos_is_named():
    config = dataclasses.replace(tiny_models.llama(VOCAB), eos_token_id=(2, 99))
    model = models.build(config, nnx.Rngs(0))
    message = (
        r"stop_tokens \(default: model.config.eos_token_id=\(2, 99\)\)\[1\] must lie in "
        r"\[0, 16\) .* got 99"
    )
    with pytest.raises(ValueError, match=message):
        generate(model, PROMPTS, max_new_tokens=2)
    # An explicit stop_tokens replaces the default.
    out = generate(model, PROMPTS, max_new_tokens=2, stop_tokens=())
    assert out.tokens.shape == (2, 2)


def test_valid_numpy_scalars_and_arrays_are_accepted(llama):
    """NumPy integers are ints; a NumPy array of stop tokens is a sequence of them."""
    out = generate(
        llama,
        PROMPTS.astype(np.int64),
        np.array([3, 2], np.int64),
        max_new_tokens=np.int64(3),
        num_samples=np.int32(2),
        pad_id=np.int32(0),
        stop_tokens=jnp.array([5, 7]),
    )
    ref = generate(
        llama, PROMPTS, [3, 2], max_new_tokens=3, num_samples=2, pad_id=0, stop_tokens=(5, 7)
    )
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    assert out.tokens.shape == (4, 3)


SAMPLING_CASES = {
    "nan temperature": (
        dict(temperature=float("nan")),
        ValueError,
        r"temperature must be finite and >= 0 \(0 = greedy\), got nan",
    ),
    "inf temperature": (
        dict(temperature=float("inf")),
        ValueError,
        "temperature must be finite and >= 0 .* got inf",
    ),
    "negative temperature": (
        dict(temperature=-1.0),
        ValueError,
        "temperature must be finite and >= 0 .* got -1.0",
    ),
    "str temperature": (
        dict(temperature="0.7"),
        TypeError,
        r"temperature must be a real number >= 0 \(0 = greedy\), got '0.7'",
    ),
    "bool temperature": (
        dict(temperature=True),
        TypeError,
        "temperature must be a real number >= 0 .* got True",
    ),
    "array temperature": (
        dict(temperature=jnp.array(0.5)),
        TypeError,
        "temperature must be a real number >= 0 .* got Array",
    ),
    "float top_k": (
        dict(temperature=1.0, top_k=2.0),
        TypeError,
        "top_k must be an int >= 1 or None, got 2.0",
    ),
    "zero top_k": (dict(top_k=0), ValueError, "top_k must be an int >= 1 or None, got 0"),
    "negative top_k": (dict(top_k=-3), ValueError, "top_k must be an int >= 1 or None, got -3"),
    "bool top_k": (dict(top_k=True), TypeError, "top_k must be an int >= 1 or None, got True"),
    "zero top_p": (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\] or None, got 0.0"),
    "top_p above 1": (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\] or None, got 1.5"),
    "nan top_p": (dict(top_p=float("nan")), ValueError, r"top_p must be in \(0, 1\] .* got nan"),
    "str top_p": (
        dict(top_p="0.9"),
        TypeError,
        r"top_p must be a real number in \(0, 1\] or None, got '0.9'",
    ),
}


@pytest.mark.parametrize("case", sorted(SAMPLING_CASES))
def test_bad_sampling_config_is_named(case):
    kwargs, error, message = SAMPLING_CASES[case]
    with pytest.raises(error, match=message):
        SamplingConfig(**kwargs)


def test_numpy_sampling_scalars_become_python_scalars():
    """So the config hashes and compares as the static jit argument it is."""
    config = SamplingConfig(temperature=np.float32(0.5), top_k=np.int64(3), top_p=np.float64(0.25))
    assert config == SamplingConfig(temperature=0.5, top_k=3, top_p=0.25)
    assert hash(config) == hash(SamplingConfig(temperature=0.5, top_k=3, top_p=0.25))
    assert type(config.temperature) is float and type(config.top_k) is int
    assert SamplingConfig(temperature=1).temperature == 1.0


SCORE_CASES = {
    "float tokens": (
        np.array([[1.0, 2.0, 3.0]]),
        TypeError,
        "tokens must be integer ids, got dtype float64",
    ),
    "bool tokens": (np.ones((1, 3), bool), TypeError, "tokens must be integer ids, got dtype bool"),
    "id 2**32 + 1": (
        np.array([[1, 2**32 + 1, 3]]),
        ValueError,
        r"token ids must lie in \[0, 16\) .* got tokens\[0, 1\] = 4294967297",
    ),
    "uint64 id 2**63": (
        np.array([[1, 2**63]], np.uint64),
        ValueError,
        r"token ids must lie in .* got tokens\[0, 1\] = 9223372036854775808",
    ),
    "empty batch": (
        np.zeros((0, 3), np.int32),
        ValueError,
        r"tokens must hold at least one row, got shape \(0, 3\)",
    ),
    "1-D tokens": (
        np.array([1, 2, 3]),
        ValueError,
        r"tokens must be \[batch, seq\] \(2-D\), got shape \(3,\) \(for one sequence",
    ),
}


@pytest.mark.parametrize("fn", ["score", "token_logprobs", "token_logprobs_and_greedy"])
@pytest.mark.parametrize("case", sorted(SCORE_CASES))
def test_bad_score_tokens_are_named_before_tracing(llama, fn, case):
    tokens, error, message = SCORE_CASES[case]
    call = {
        "score": score,
        "token_logprobs": token_logprobs,
        "token_logprobs_and_greedy": token_logprobs_and_greedy,
    }[fn]
    jitted = {
        "score": score_lib._score,
        "token_logprobs": score_lib._token_logprobs,
        "token_logprobs_and_greedy": score_lib._token_logprobs_and_greedy,
    }[fn]
    traced = jitted._cache_size()
    with pytest.raises(error, match=f"{fn}: {message}"):
        call(llama, tokens)
    assert jitted._cache_size() == traced


def test_pad_id_outside_the_vocabulary_is_a_valid_sentinel(llama):
    out = generate(llama, PROMPTS, max_new_tokens=6, stop_tokens=tuple(range(VOCAB)), pad_id=-1)
    tokens = np.asarray(out.tokens)
    assert (np.asarray(out.lengths) == 1).all()  # every token stops its row
    assert (tokens[:, 1:] == -1).all() and ((0 <= tokens[:, 0]) & (tokens[:, 0] < VOCAB)).all()
