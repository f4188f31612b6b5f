"""Test-time scaling metrics against brute force and crafted cases; sampling against the model's
own probabilities."""

import itertools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab import models
from jaxlab.data.tokenizers import ByteTokenizer
from jaxlab.infer import generate
from jaxlab.infer import test_time as tts
from tests.infer import tiny_models


def brute_force_pass_at_k(n, c, k):
    """The fraction of k-subsets of n samples (c of them correct) holding a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))


def test_pass_at_k_equals_enumeration_over_all_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = brute_force_pass_at_k(n, c, k)
                assert tts.pass_at_k(n, c, k) == pytest.approx(float(expected), abs=1e-14)


def test_pass_at_k_stays_exact_for_large_n():
    n, c, k = 2000, 3, 700
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert tts.pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert tts.pass_at_k(n, 0, k) == 0.0
    assert tts.pass_at_k(n, n - k + 1, k) == 1.0


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 0, 1), "n must be an int >= 1"),
        ((4, 5, 1), "c <= n"),
        ((4, 1, 5), "k <= n"),
        ((4, 1, 0), "k must be an int >= 1"),
        ((4.0, 1, 1), "n must be an int"),
    ],
)
def test_pass_at_k_rejects_bad_counts(args, message):
    with pytest.raises(ValueError, match=message):
        tts.pass_at_k(*args)


def test_coverage_counts_missing_answers_as_wrong():
    answers = [[3, None, 5, 3], [None, None, None, None], [7, 7, 7, 7]]
    references = [5, 1, 7]
    got = tts.coverage(answers, references, 2)
    expected = [float(brute_force_pass_at_k(4, 1, 2)), 0.0, 1.0]
    np.testing.assert_allclose(got, expected, atol=1e-14)


def test_majority_vote_and_its_tie_rule():
    # 2 and 4 tie at two votes each; 4 appears first, so 4 wins.
    assert tts.majority_vote([4, 2, None, 2, 4, 9]) == 4
    assert tts.majority_vote([None, None]) is None
    assert tts.majority_vote([None, 8]) == 8
    answers = [[1, 2, 2, 1, 1], [3, 3, None, 4, 4], [None, None, None, 5, 5]]
    references = [1, 4, 5]
    # k=3: [1,2,2] -> 2 (wrong); [3,3,None] -> 3 (wrong); no answer -> wrong.
    np.testing.assert_array_equal(tts.majority_at_k(answers, references, 3), [False] * 3)
    # k=5: [1,2,2,1,1] -> 1; [3,3,None,4,4] ties 3 and 4, 3 first -> wrong; [..,5,5] -> 5.
    np.testing.assert_array_equal(tts.majority_at_k(answers, references, 5), [True, False, True])
    with pytest.raises(ValueError, match="exceeds the 5 samples"):
        tts.majority_at_k(answers, references, 6)
    with pytest.raises(ValueError, match="same number of samples"):
        tts.majority_at_k([[1], [1, 2]], [1, 1], 1)


def test_best_of_k_takes_the_best_scored_answer():
    answers = [[1, 2, None, 3], [None, None, 4, 4], [None, None, None, None]]
    scores = np.array([[0.1, 0.5, 9.0, 0.7], [5.0, 5.0, -1.0, -1.0], [0, 0, 0, 0]])
    references = [2, 4, 0]
    # k=2: problem 0 picks answer 2 (0.5 > 0.1); problem 1 has no answer yet.
    np.testing.assert_array_equal(
        tts.best_of_k(answers, scores, references, 2), [True, False, False]
    )
    # k=4: problem 0 picks 3 (0.7; the None sample is skipped despite 9.0); problem 1 picks 4.
    np.testing.assert_array_equal(
        tts.best_of_k(answers, scores, references, 4), [False, True, False]
    )
    with pytest.raises(ValueError, match="scores must be"):
        tts.best_of_k(answers, scores[:, :3], references, 2)


def test_crossover_of_linear_curves():
    # a = 0.5 flat; b rises 0.1 per second from 0 at t=1: b reaches a at t = 6.
    xa, ya = np.array([0.0, 10.0]), np.array([0.5, 0.5])
    xb = np.array([1.0, 2.0, 4.0, 8.0])
    yb = 0.1 * (xb - 1.0)
    assert tts.crossover(xa, ya, xb, yb) == pytest.approx(6.0)
    assert tts.crossover(xa, ya, xb, yb * 0.1) is None  # b never reaches a
    assert tts.crossover(xa, ya, xb, yb + 1.0) == pytest.approx(1.0)  # ahead from the start
    assert tts.crossover(xa + 20.0, ya, xb, yb) is None  # no common seconds
    with pytest.raises(ValueError, match="increasing"):
        tts.crossover(xa[::-1], ya, xb, yb)


def test_seconds_axis_and_bootstrap_interval():
    np.testing.assert_allclose(tts.seconds_axis([1, 4, 16], 0.25), [0.25, 1.0, 4.0])
    assert tts.bootstrap_interval(np.full(50, 0.3)) == pytest.approx((0.3, 0.3))
    rng = np.random.default_rng(0)
    values = (rng.random(4000) < 0.4).astype(float)
    low, high = tts.bootstrap_interval(values, seed=1)
    half = 1.96 * math.sqrt(values.mean() * (1 - values.mean()) / values.size)
    assert low < values.mean() < high
    assert high - low == pytest.approx(2 * half, rel=0.15)  # the normal-approximation width


@pytest.fixture(scope="module")
def tiny_llama():
    tokenizer = ByteTokenizer()
    model = models.build(tiny_models.llama(tokenizer.vocab_size), nnx.Rngs(3))
    return model, tokenizer


def test_samples_follow_the_models_distribution_and_are_independent(tiny_llama):
    model, tokenizer = tiny_llama
    prompt = "ab"
    n, top_k = 3000, 4
    samples = tts.draw_samples(
        model,
        tokenizer,
        [prompt],
        num_samples=n,
        extract=lambda t: t,
        max_new_tokens=1,
        temperature=1.0,
        top_k=top_k,
        stop_tokens=(),
        seed=5,
    )
    tokens = samples.tokens[0, :, 0]
    logits = np.asarray(model(jnp.asarray([tokenizer.encode(prompt)]))[0, -1], np.float64)
    top = np.argsort(logits)[::-1][:top_k]
    p = np.exp(logits[top] - logits[top].max())
    p /= p.sum()
    freq = np.array([(tokens == t).mean() for t in top])
    assert set(tokens) <= set(top)
    # Each frequency within 4 binomial standard deviations of the model's probability.
    np.testing.assert_array_less(np.abs(freq - p), 4 * np.sqrt(p * (1 - p) / n) + 1e-9)
    # Independence: adjacent samples agree as often as two independent draws would.
    agree = np.mean(tokens[1:] == tokens[:-1])
    assert abs(agree - np.sum(p**2)) < 4 * math.sqrt(np.sum(p**2) * (1 - np.sum(p**2)) / n)
    np.testing.assert_allclose(
        samples.logprobs[0], jax.nn.log_softmax(logits)[tokens], rtol=1e-5, atol=1e-5
    )


def test_samples_are_reproducible_by_seed_and_rows_stay_with_their_problems(tiny_llama):
    model, tokenizer = tiny_llama
    prompts = ["1+2=", "hello", "xyz"]

    def draw(seed, per_call, temperature=1.0):
        return tts.draw_samples(
            model,
            tokenizer,
            prompts,
            num_samples=4,
            extract=lambda t: t[:1] or None,
            max_new_tokens=5,
            temperature=temperature,
            problems_per_call=per_call,
            seed=seed,
            stop_tokens=(),
        )

    a, b, c = draw(0, 2), draw(0, 2), draw(1, 2)
    assert a.texts == b.texts and a.texts != c.texts
    assert len(a.texts) == 3 and all(len(row) == 4 for row in a.texts)
    assert a.rows_per_call == 8 and a.seconds > 0 and a.lengths.shape == (3, 4)
    # Two calls of 2 problems x 4 samples were timed, the second with a padding problem.
    assert a.rows_generated == 16 and a.seconds_per_sample == a.seconds / 16
    # Almost greedy: each problem's samples are its own greedy completion, whatever the batching.
    cold = draw(0, 2, temperature=1e-4)
    for i, prompt in enumerate(prompts):
        ids = jnp.asarray([tokenizer.encode(prompt)])
        greedy = generate(model, ids, max_new_tokens=5, stop_tokens=())
        text = tokenizer.decode([int(t) for t in greedy.tokens[0]])
        assert cold.texts[i] == [text] * 4


def test_failed_extractions_are_counted_not_guessed(tiny_llama):
    model, tokenizer = tiny_llama
    samples = tts.draw_samples(
        model,
        tokenizer,
        ["q"],
        num_samples=6,
        extract=lambda t: None,
        max_new_tokens=2,
        stop_tokens=(),
    )
    assert samples.failures == 6 and samples.answers == [[None] * 6]
    assert tts.majority_at_k(samples.answers, [samples.texts[0][0]], 6).tolist() == [False]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_samples=0), "num_samples must be an int >= 1"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(problems_per_call=0), "problems_per_call must be an int >= 1"),
    ],
)
def test_draw_samples_rejects_bad_arguments(tiny_llama, kwargs, message):
    model, tokenizer = tiny_llama
    args = dict(num_samples=2, extract=str, max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=message):
        tts.draw_samples(model, tokenizer, ["q"], **args)
