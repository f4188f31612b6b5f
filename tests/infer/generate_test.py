"""generate: log-probabilities, num_samples from one prefill, stop strings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from jaxlab import models
from jaxlab.data.tokenizers import Tokenizer
from jaxlab.infer import SamplingConfig, generate
from jaxlab.infer import decode as decode_lib
from tests.infer import tiny_models

VOCAB = 16
CONFIGS = {
    "llama": tiny_models.llama(VOCAB),
    "hybrid mamba1": tiny_models.mamba(VOCAB, hybrid=True),
    "mamba2": tiny_models.mamba(VOCAB, "mamba2"),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return models.build(CONFIGS[request.param], nnx.Rngs(2))


@pytest.fixture(scope="module")
def llama():
    return models.build(CONFIGS["llama"], nnx.Rngs(3))


def _log_softmax64(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _padded_prompts(rng, lengths):
    prompts = np.zeros((len(lengths), max(lengths)), np.int32)
    for b, n in enumerate(lengths):
        prompts[b, :n] = rng.integers(0, VOCAB, n)
    return prompts


def test_logprobs_equal_teacher_forced_float64_recomputation(model):
    """Raw and sampling log-probs of each generated token, recomputed from the full forward over
    prompt + generated tokens (float64 log-softmax; top-k/temperature applied in NumPy)."""
    rng = np.random.default_rng(0)
    lengths = [5, 9, 3]
    prompts = _padded_prompts(rng, lengths)
    n, new = 2, 10
    sampling = SamplingConfig(temperature=0.7, top_k=6)
    out = generate(
        model,
        prompts,
        lengths,
        max_new_tokens=new,
        sampling=sampling,
        rng=jax.random.PRNGKey(4),
        stop_tokens=(3,),
        num_samples=n,
    )
    tokens, out_lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    assert tokens.shape == out.logprobs.shape == out.sampling_logprobs.shape == (3 * n, new)
    assert out.logprobs.dtype == out.sampling_logprobs.dtype == jnp.float32
    # prompt + generated tokens per row, right-padded (causal models: padding changes nothing).
    sequences = np.zeros((3 * n, max(lengths) + new), np.int32)
    for r in range(3 * n):
        b = r // n
        row = np.concatenate([prompts[b, : lengths[b]], tokens[r, : out_lengths[r]]])
        sequences[r, : len(row)] = row
    all_logits = np.asarray(model(jnp.asarray(sequences)), np.float64)
    stopped = 0
    for r in range(3 * n):
        b, length = r // n, int(out_lengths[r])
        generated = tokens[r, :length]
        stopped += length < new
        at = all_logits[r, lengths[b] - 1 : lengths[b] - 1 + length]  # each token's predictor
        raw = _log_softmax64(at)[np.arange(length), generated]
        scaled = at / sampling.temperature
        kth = np.sort(scaled, axis=-1)[:, -sampling.top_k][:, None]
        filtered = np.where(scaled >= kth, scaled, -np.inf)
        drawn = _log_softmax64(filtered)[np.arange(length), generated]
        np.testing.assert_allclose(np.asarray(out.logprobs[r, :length]), raw, atol=2e-4)
        np.testing.assert_allclose(np.asarray(out.sampling_logprobs[r, :length]), drawn, atol=2e-4)
        assert (np.asarray(out.logprobs[r, length:]) == 0).all()
        assert (np.asarray(out.sampling_logprobs[r, length:]) == 0).all()
    assert stopped > 0  # the stop token ended some rows early


def test_greedy_sampling_logprobs_are_zero_and_raw_logprobs_are_the_max(llama):
    prompts = np.random.default_rng(1).integers(0, VOCAB, (2, 6))
    out = generate(llama, prompts, max_new_tokens=5, stop_tokens=())
    np.testing.assert_array_equal(np.asarray(out.sampling_logprobs), 0.0)
    sequence = np.concatenate([prompts, np.asarray(out.tokens)], axis=1)
    logsoftmax = _log_softmax64(llama(jnp.asarray(sequence)))[:, 5:-1]
    np.testing.assert_allclose(np.asarray(out.logprobs), logsoftmax.max(axis=-1), atol=2e-4)


def test_num_samples_share_one_prefill_and_keep_greedy_rows(model, monkeypatch):
    """One prefill of [batch, prompt_len] at trace time; greedy copies equal the greedy rows
    (the copied caches and recurrent states continue exactly)."""
    shapes = []
    original = decode_lib.prefill

    def counting_prefill(model, tokens, *args, **kwargs):
        shapes.append(tokens.shape)
        return original(model, tokens, *args, **kwargs)

    monkeypatch.setattr(decode_lib, "prefill", counting_prefill)
    decode_lib._generate.clear_cache()
    rng = np.random.default_rng(2)
    lengths = [7, 4, 6]
    prompts = _padded_prompts(rng, lengths)
    out = generate(model, prompts, lengths, max_new_tokens=6, stop_tokens=(), num_samples=5)
    assert shapes == [(3, 7)]
    assert out.tokens.shape == (15, 6) and out.lengths.shape == (15,)
    single = generate(model, prompts, lengths, max_new_tokens=6, stop_tokens=())
    assert single.tokens.shape == (3, 6)
    np.testing.assert_array_equal(
        np.asarray(out.tokens), np.repeat(np.asarray(single.tokens), 5, axis=0)
    )
    decode_lib._generate.clear_cache()


def test_num_samples_first_tokens_follow_the_model_softmax_independently(llama):
    """n=4000 samples per prompt at temperature 1: chi-square goodness of fit of the first token
    against the float64 softmax of the full forward, and the rate of equal tokens in disjoint
    pairs of copies against sum p^2 (copies that were not independent would agree more often).
    Each check fails with probability < 1e-6 for a correct sampler."""
    n, delta = 4000, 1e-6
    rng = np.random.default_rng(3)
    prompts = rng.integers(0, VOCAB, (2, 7))
    out = generate(
        llama,
        prompts,
        max_new_tokens=1,
        sampling=SamplingConfig(temperature=1.0),
        rng=jax.random.PRNGKey(11),
        stop_tokens=(),
        num_samples=n,
    )
    first = np.asarray(out.tokens[:, 0]).reshape(2, n)
    probs = np.exp(_log_softmax64(llama(jnp.asarray(prompts)))[:, -1])
    threshold = stats.chi2.isf(delta, VOCAB - 1)
    for b in range(2):
        assert probs[b].min() * n > 5  # the chi-square approximation holds
        counts = np.bincount(first[b], minlength=VOCAB)
        chi2 = np.sum((counts - n * probs[b]) ** 2 / (n * probs[b]))
        assert chi2 < threshold, (b, chi2, threshold)
        # Hoeffding over n/2 disjoint pairs (2k, 2k+1) of copies of one prompt.
        equal = np.mean(first[b, 0::2] == first[b, 1::2])
        bound = np.sqrt(np.log(2 / delta) / (2 * (n // 2)))
        assert abs(equal - np.sum(probs[b] ** 2)) < bound, (b, equal, np.sum(probs[b] ** 2))
    # The two prompts' softmaxes differ, so the test would see samples from the wrong prompt.
    assert 0.5 * np.abs(probs[0] - probs[1]).sum() > 0.1


def test_sampled_copies_of_a_prompt_differ(llama):
    prompts = np.random.default_rng(4).integers(0, VOCAB, (2, 5))
    out = generate(
        llama,
        prompts,
        max_new_tokens=12,
        sampling=SamplingConfig(temperature=1.0),
        stop_tokens=(),
        num_samples=6,
    )
    rows = {tuple(row) for row in np.asarray(out.tokens).tolist()}
    assert len(rows) == 12  # 12 distinct sequences of 12 tokens (a collision is ~1e-10 likely)


class PieceTokenizer(Tokenizer):
    """Ids are multi-character pieces, so stop strings can start or end inside a token."""

    PIECES = (
        "a",
        "b",
        "\n",
        "\n\n",
        "a\n",
        "\nb",
        "c",
        "ab",
        "ba",
        "x",
        "\n\nc",
        "yy",
        "b\n",
        "z",
        "q",
        "<e>",
    )

    def __init__(self):
        super().__init__(vocab_size=len(self.PIECES), pad_id=None, bos_id=None, eos_id=15)

    def _encode(self, text):
        ids = []
        while text:
            best = max(
                (i for i, p in enumerate(self.PIECES) if text.startswith(p)),
                key=lambda i: len(self.PIECES[i]),
            )
            ids.append(best)
            text = text[len(self.PIECES[best]) :]
        return ids

    def _decode(self, ids):
        return "".join(self.PIECES[i] for i in ids)


def _reference_cut(pieces, stop_strings):
    """Tokens kept: the first k whose concatenated pieces reach the end of the earliest stop
    string occurrence (by character offsets), or all of them."""
    text = "".join(pieces)
    ends = [text.find(s) + len(s) for s in stop_strings if s in text]
    if not ends:
        return len(pieces)
    offsets = np.cumsum([len(p) for p in pieces])
    return int(np.argmax(offsets >= min(ends))) + 1


def test_stop_strings_truncate_exactly(llama):
    tokenizer = PieceTokenizer()
    stop_strings = ("\n\n", "bb")
    prompts = np.random.default_rng(5).integers(0, VOCAB, (4, 5))
    kwargs = dict(
        max_new_tokens=20,
        sampling=SamplingConfig(temperature=1.0),
        rng=jax.random.PRNGKey(7),
        stop_tokens=(tokenizer.eos_id,),
        pad_id=-1,
        num_samples=4,
    )
    full = generate(llama, prompts, **kwargs)
    cut = generate(llama, prompts, stop_strings=stop_strings, tokenizer=tokenizer, **kwargs)
    truncated = 0
    for r in range(16):
        length = int(full.lengths[r])
        ids = np.asarray(full.tokens[r, :length]).tolist()
        pieces = ["" if i == tokenizer.eos_id else tokenizer.PIECES[i] for i in ids]
        k = _reference_cut(pieces, stop_strings)
        truncated += k < length
        assert int(cut.lengths[r]) == k
        np.testing.assert_array_equal(np.asarray(cut.tokens[r, :k]), ids[:k])
        assert (np.asarray(cut.tokens[r, k:]) == -1).all()
        np.testing.assert_array_equal(
            np.asarray(cut.logprobs[r, :k]), np.asarray(full.logprobs[r, :k])
        )
        assert (np.asarray(cut.logprobs[r, k:]) == 0).all()
        assert (np.asarray(cut.sampling_logprobs[r, k:]) == 0).all()
        text = tokenizer.decode(np.asarray(cut.tokens[r, :k]))
        if k < length:  # the kept text contains a stop string, one token less does not
            assert any(s in text for s in stop_strings)
            shorter = tokenizer.decode(np.asarray(cut.tokens[r, : k - 1]))
            assert not any(s in shorter for s in stop_strings)
    assert 0 < truncated < 16, truncated  # both kinds of rows were seen


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(num_samples=0), ValueError, "num_samples must be an int >= 1, got 0"),
        (dict(num_samples=2.0), TypeError, "num_samples must be an int >= 1, got 2.0"),
        (dict(stop_strings="\n"), TypeError, "stop_strings must be a sequence of strings"),
        (dict(stop_strings=("",)), ValueError, r"stop_strings\[0\] must be a non-empty str"),
        (dict(stop_strings=("\n",)), ValueError, "need a tokenizer .* got tokenizer=None"),
    ],
)
def test_bad_generate_arguments_are_named(llama, kwargs, error, message):
    with pytest.raises(error, match=message):
        generate(llama, np.zeros((2, 3), np.int32), max_new_tokens=2, **kwargs)


def test_generate_in_batches_equals_one_generate_per_prompt(llama):
    """Prompts of different lengths in padded, filled-up batches with a budget per call give
    what each prompt gives alone (unpadded, batch of one), stop tokens included."""
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (3, 7, 1, 5, 6)]
    budgets = [4, 6, 3]  # calls of 2, 2 and 1 prompts
    stop = (int(rng.integers(0, VOCAB)),)
    outputs = decode_lib.generate_in_batches(
        llama, prompts, batch_size=2, max_new_tokens=budgets, width=9, stop_tokens=stop
    )
    assert len(outputs) == len(prompts)
    for i, prompt in enumerate(prompts):
        alone = generate(
            llama, np.asarray([prompt]), max_new_tokens=budgets[i // 2], stop_tokens=stop
        )
        expected = np.asarray(alone.tokens)[0, : int(alone.lengths[0])]
        np.testing.assert_array_equal(outputs[i], expected)
    one_budget = decode_lib.generate_in_batches(llama, prompts, batch_size=4, max_new_tokens=3)
    assert [len(o) for o in one_budget] == [3] * len(prompts)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
        (dict(max_new_tokens=(2, 2)), r"one per call \(3 calls of 2 prompts\), got 2 budgets"),
        (dict(width=4), r"width must hold the longest prompt \(5 tokens\), got 4"),
    ],
)
def test_generate_in_batches_names_a_bad_argument(llama, kwargs, message):
    prompts = [[1, 2], [3], [4, 5, 6, 7, 8], [1], [2]]
    arguments = {"batch_size": 2, "max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        decode_lib.generate_in_batches(llama, prompts, **arguments)
