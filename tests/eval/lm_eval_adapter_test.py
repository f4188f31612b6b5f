"""The lm-eval adapter against float64 NumPy references over the model's full-forward logits,
against jaxlab's native scorer, and through ``lm_eval.simple_evaluate`` on a local task."""

import json
import string

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from jaxlab import models  # noqa: E402
from jaxlab.data.tokenizers import ByteTokenizer, CharTokenizer, Tokenizer  # noqa: E402
from jaxlab.eval.lm_eval_adapter import JaxlabLM  # noqa: E402
from jaxlab.eval.medical import runner  # noqa: E402
from jaxlab.interop.hf import save_hf_llama  # noqa: E402
from jaxlab.train.pretrained import save_model_source  # noqa: E402
from tests.infer import tiny_models  # noqa: E402

# Every id but pad/bos/eos (0, 1, 2) is a character, so greedy outputs are text.
TEXT = string.ascii_letters + string.digits + " .?:"
TOKENIZER = CharTokenizer(TEXT + "\n")
MAX_LEN = tiny_models.COMMON["max_seq_len"]  # 64


@pytest.fixture(scope="module")
def model():
    return models.build(tiny_models.llama(TOKENIZER.vocab_size), nnx.Rngs(3))


def _requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


_FORWARD = nnx.jit(lambda model, tokens: model(tokens))


def _log_softmax(model, ids):
    """[len(ids), vocab] float64 log-softmax of the model's logits over ``ids`` (one row, run
    padded to MAX_LEN so that every call has one shape: the model is causal)."""
    padded = np.zeros((1, MAX_LEN), np.int32)
    padded[0, : len(ids)] = ids
    logits = np.asarray(_FORWARD(model, jnp.asarray(padded)), np.float64)[0, : len(ids)]
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _scored(model, ids, n):
    """(float64 log-probability, all argmax) of the last ``n`` of ``ids``, fed whole."""
    lsm = _log_softmax(model, ids)
    positions = range(len(ids) - n, len(ids))
    logprob = sum(lsm[t - 1, ids[t]] for t in positions)
    return logprob, all(lsm[t - 1].argmax() == ids[t] for t in positions)


def _greedy_ids(model, ids, steps, stop=None):
    """Greedy continuation of ``ids`` by repeated full forward passes (stops after ``stop``)."""
    out = []
    for _ in range(steps):
        token = int(_log_softmax(model, ids + out)[-1].argmax())
        out.append(token)
        if token == stop:
            break
    return out


def _text(rng, n):
    return "".join(rng.choice(list(TEXT), n))


def _greedy_pairs(model, rng, count):
    """(context, continuation) pairs whose 3-character continuation is the model's greedy."""
    pairs = []
    while len(pairs) < count:
        context = _text(rng, int(rng.integers(3, 15)))
        ids = _greedy_ids(model, [TOKENIZER.bos_id, *TOKENIZER.encode(context)], 3)
        if min(ids) >= 3:  # characters, not pad/bos/eos
            pairs.append((context, TOKENIZER.decode(ids)))
    return pairs


def test_loglikelihood_is_float64_log_softmax_in_request_order(model):
    rng = np.random.default_rng(0)
    pairs = [(_text(rng, int(rng.integers(0, 20))), _text(rng, int(rng.integers(1, 7))))]
    pairs += [(_text(rng, int(rng.integers(1, 20))), _text(rng, int(rng.integers(1, 7))))]
    pairs += _greedy_pairs(model, rng, 2)
    pairs += [("", "Hello"), (_text(rng, 30), _text(rng, 2)), (_text(rng, 3), _text(rng, 9))]
    pairs += [(_text(rng, 90), "four")]  # 96 tokens: the context is cut from the left
    # batches of 3, longest first: the requests are reordered inside
    got = JaxlabLM(model, TOKENIZER, batch_size=3).loglikelihood(_requests("loglikelihood", pairs))
    expected = []
    for context, continuation in pairs:
        scored = TOKENIZER.encode(continuation)
        ids = ([TOKENIZER.bos_id] + TOKENIZER.encode(context) + scored)[-MAX_LEN:]
        expected.append(_scored(model, ids, len(scored)))
    np.testing.assert_allclose([g[0] for g in got], [e[0] for e in expected], rtol=1e-5, atol=1e-4)
    assert [g[1] for g in got] == [bool(e[1]) for e in expected]
    assert [g[1] for g in got].count(True) == 2  # the greedy pairs, and only them
    assert all(isinstance(g[0], float) and isinstance(g[1], bool) for g in got)


def test_loglikelihood_equals_the_native_scorer(model):
    rng = np.random.default_rng(1)
    contexts = [_text(rng, 12) + "\nAnswer:", _text(rng, 25) + "?"]
    labels = [["A", "B", "C"], ["yes", "no"]]
    native = runner.label_logprobs(model, TOKENIZER, contexts, labels, batch_size=4, add_bos=True)
    pairs = [(c, " " + name) for c, names in zip(contexts, labels, strict=True) for name in names]
    got = JaxlabLM(model, TOKENIZER, batch_size=2).loglikelihood(_requests("loglikelihood", pairs))
    np.testing.assert_allclose([g[0] for g in got], np.concatenate(native), rtol=1e-5, atol=1e-5)


def test_loglikelihood_rejects_what_cannot_be_scored(model):
    lm = JaxlabLM(model, TOKENIZER)
    with pytest.raises(ValueError, match=r"request 0: its continuation has 64 tokens; at most 63"):
        lm.loglikelihood(_requests("loglikelihood", [("a", "b" * 64)]))
    with pytest.raises(ValueError, match=r"request 1: the continuation '' encodes to no tokens"):
        lm.loglikelihood(_requests("loglikelihood", [("a", "b"), ("a", "")]))

    class NoSpecialIds(Tokenizer):
        def __init__(self):
            super().__init__(TOKENIZER.vocab_size, pad_id=None, bos_id=None, eos_id=None)

        def _encode(self, text):
            return TOKENIZER.encode(text)

        def _decode(self, ids):
            return TOKENIZER.decode(ids)

    bare = JaxlabLM(model, NoSpecialIds())
    with pytest.raises(ValueError, match="neither a bos nor an eos id"):
        bare.loglikelihood(_requests("loglikelihood", [("", "abc")]))
    assert bare.loglikelihood(_requests("loglikelihood", [("ab", "c")]))[0][0] < 0
    with pytest.raises(ValueError, match="add_bos=True but the tokenizer"):
        JaxlabLM(model, NoSpecialIds(), add_bos=True)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        JaxlabLM(model, TOKENIZER, batch_size=0)


def test_loglikelihood_rolling_is_the_float64_sum_over_disjoint_windows(model):
    rng = np.random.default_rng(2)
    texts = ["", _text(rng, 10), _text(rng, 63), _text(rng, 64), _text(rng, 150)]
    lm = JaxlabLM(model, TOKENIZER, batch_size=2)
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
    expected = []
    for text in texts:
        # Positions 1.. of bos + text, in chunks of MAX_LEN - 1 from the start; each chunk is
        # scored by one pass over the MAX_LEN tokens that end with it (all there are, first).
        ids = [TOKENIZER.bos_id, *TOKENIZER.encode(text)]
        total = 0.0
        for start in range(1, len(ids), MAX_LEN - 1):
            end = min(start + MAX_LEN - 1, len(ids))
            total += _scored(model, ids[max(0, end - MAX_LEN) : end], end - start)[0]
        expected.append(total)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    assert got[0] == 0.0
    # a text that fits one window scores as a continuation of the empty context
    single = lm.loglikelihood(_requests("loglikelihood", [("", texts[2])]))[0][0]
    np.testing.assert_allclose(got[2], single, rtol=1e-6)


def test_generate_until_is_greedy_text_cut_at_the_first_stop_string(model):
    rng = np.random.default_rng(3)
    contexts = [_text(rng, n) for n in (5, 17, 9, 30, 100)]
    reference = []
    for context, steps in zip(contexts, (10, 10, 6, 10, 8), strict=True):
        ids = ([TOKENIZER.bos_id] + TOKENIZER.encode(context))[-(MAX_LEN - steps) :]
        reference.append(TOKENIZER.decode(_greedy_ids(model, ids, steps, TOKENIZER.eos_id)))
    assert len(reference[0]) >= 6 and len(reference[3]) >= 3
    stops = [reference[0][4:6], reference[3][2:3]]
    kwargs = [
        {"until": [stops[0], "\n\n"], "max_gen_toks": 10},
        {"until": ["\n\n"], "max_gen_toks": 10, "do_sample": False, "temperature": 0.0},
        {"until": "\n\n", "max_new_tokens": 6, "top_p": 0.9},
        {"until": [stops[1]], "max_gen_toks": 10},
        {"until": [], "max_gen_toks": 8},  # 100 characters: the context is cut from the left
    ]
    lm = JaxlabLM(model, TOKENIZER, batch_size=2)
    got = lm.generate_until(_requests("generate_until", list(zip(contexts, kwargs, strict=True))))
    expected = list(reference)
    for i, stop in ((0, stops[0]), (3, stops[1])):
        expected[i] = reference[i][: reference[i].index(stop)]
    assert got == expected
    assert expected[0] != reference[0] and expected[3] != reference[3]


@pytest.mark.parametrize(
    "gen_kwargs, message",
    [
        ({"until": [], "do_sample": True, "temperature": 0.7}, "only greedy decoding"),
        ({"until": [], "temperature": 0.7}, "only greedy decoding"),
        ({"until": [], "num_beams": 4}, "beam search is not supported"),
        ({"until": [], "repetition_penalty": 1.2}, r"unsupported generation kwargs \['repetition"),
        ({"until": [], "max_gen_toks": 64}, "max_gen_toks=64 leaves no room"),
    ],
)
def test_generate_until_rejects_what_it_does_not_do(model, gen_kwargs, message):
    with pytest.raises(ValueError, match=message):
        JaxlabLM(model, TOKENIZER).generate_until(_requests("generate_until", [("ab", gen_kwargs)]))


def test_simple_evaluate_on_a_local_multiple_choice_task(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rng = np.random.default_rng(4)
    lm = JaxlabLM(model, TOKENIZER, batch_size=4)
    docs = [
        {"question": _text(rng, 12) + "?", "choices": [_text(rng, n) for n in (2, 3, 1)]}
        for _ in range(6)
    ]
    # the adapter's choice for the first four documents, another one for the last two
    for i, doc in enumerate(docs):
        pairs = [(doc["question"], " " + choice) for choice in doc["choices"]]
        scores = [s for s, _ in lm.loglikelihood(_requests("loglikelihood", pairs))]
        doc["answer"] = (int(np.argmax(scores)) + (i >= 4)) % 3
    with open(tmp_path / "docs.jsonl", "w") as f:
        f.writelines(json.dumps(doc) + "\n" for doc in docs)
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: jaxlab_tiny_mc\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files: {{test: {tmp_path / 'docs.jsonl'}}}\n"
        f"  cache_dir: {tmp_path / 'datasets_cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
    )
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=["jaxlab_tiny_mc"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        random_seed=None,
        numpy_random_seed=None,
        torch_random_seed=None,
        fewshot_random_seed=None,
    )
    assert results["results"]["jaxlab_tiny_mc"]["acc,none"] == pytest.approx(4 / 6)


def test_model_sources_through_the_registry(tmp_path):
    """``hf:`` and ``run:`` sources load the same model; a run brings its config's tokenizer."""
    model = models.build(tiny_models.llama(ByteTokenizer().vocab_size), nnx.Rngs(4))
    save_hf_llama(model, str(tmp_path / "hf"))
    save_model_source(str(tmp_path / "run"), model)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"data": {"tokenizer": "byte"}}))
    save_model_source(str(tmp_path / "bare_run"), model)
    requests = _requests("loglikelihood", [("ab", "cd"), ("", "xyz")])
    expected = JaxlabLM(model, ByteTokenizer()).loglikelihood(requests)
    registered = lm_eval.api.registry.get_model("jaxlab")
    assert registered is JaxlabLM
    arg_string = f"model=hf:{tmp_path / 'hf'},tokenizer=byte,batch_size=2"
    # What lm-eval's command line adds: a string batch size and device="cuda:0".
    cli_extras = {"batch_size": "2", "max_batch_size": None, "device": "cuda:0"}
    for lm in (
        registered.create_from_arg_string(arg_string),
        registered.create_from_arg_obj({"model": f"run:{tmp_path / 'run'}"}, {"batch_size": 1}),
        registered.create_from_arg_string(f"model=hf:{tmp_path / 'hf'},tokenizer=byte", cli_extras),
    ):
        assert isinstance(lm.tokenizer, ByteTokenizer)
        got = lm.loglikelihood(requests)
        np.testing.assert_allclose([g[0] for g in got], [e[0] for e in expected], rtol=1e-6)
    with pytest.raises(ValueError, match="has no config.json naming its data.tokenizer"):
        JaxlabLM(f"run:{tmp_path / 'bare_run'}")
    with pytest.raises(TypeError, match="None only with a model source string"):
        JaxlabLM(model)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 'auto'"):
        JaxlabLM(f"hf:{tmp_path / 'missing'}", batch_size="auto")  # before loading anything


def test_a_hybrid_mamba_model_through_the_same_adapter():
    """Nothing in the adapter is Llama-specific: a Mamba-2 + attention hybrid scores and
    generates as its float64 references say."""
    model = models.build(
        tiny_models.mamba(TOKENIZER.vocab_size, "mamba2", hybrid=True), nnx.Rngs(5)
    )
    rng = np.random.default_rng(5)
    pairs = [(_text(rng, 7), _text(rng, 3)), ("", _text(rng, 4)), (_text(rng, 70), "ok")]
    lm = JaxlabLM(model, TOKENIZER, batch_size=2)
    got = lm.loglikelihood(_requests("loglikelihood", pairs))
    expected = []
    for context, continuation in pairs:
        scored = TOKENIZER.encode(continuation)
        ids = ([TOKENIZER.bos_id] + TOKENIZER.encode(context) + scored)[-MAX_LEN:]
        expected.append(_scored(model, ids, len(scored)))
    np.testing.assert_allclose([g[0] for g in got], [e[0] for e in expected], rtol=1e-5, atol=1e-4)
    assert [g[1] for g in got] == [bool(e[1]) for e in expected]
    reference = ""
    while len(reference) < 4:  # a context whose greedy text is more than pad/bos/eos
        context = _text(rng, 11)
        ids = [TOKENIZER.bos_id, *TOKENIZER.encode(context)]
        reference = TOKENIZER.decode(_greedy_ids(model, ids, 8, TOKENIZER.eos_id))
    request = (context, {"until": ["\n\n"], "max_gen_toks": 8})
    assert lm.generate_until(_requests("generate_until", [request])) == [reference]
