"""Per-process batches: each process builds only its own rows of the global batch."""

import json

import ml_collections
import numpy as np
import pytest

from jaxlab.data import pipeline
from jaxlab.data.sources import ListDocuments
from jaxlab.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()


class DocIdTokenizer:
    """Encodes document ``"i:..."`` as ``len(text)`` copies of id ``i + 1``, so every token of a
    batch names its document; records the documents it encodes."""

    def __init__(self):
        self.encoded: list[int] = []

    def encode(self, text, *, add_bos=False, add_eos=False):
        del add_bos, add_eos  # every token names the document, so none is added
        doc = int(text.partition(":")[0])
        self.encoded.append(doc)
        return [doc + 1] * len(text)


def _numbered_docs(seed, n, name="numbered"):
    rng = np.random.default_rng(seed)
    return ListDocuments([f"{i}:" + "x" * int(rng.integers(0, 60)) for i in range(n)], name)


def _docs_in(batches):
    """The documents whose tokens the batches hold (``DocIdTokenizer`` ids)."""
    ids = np.concatenate([np.concatenate([b["inputs"], b["targets"]]).ravel() for b in batches])
    return set((np.unique(ids) - 1).tolist())


def _random_docs(seed, n, max_len=300):
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefghij \n") + ["é", "ü", "→"]
    return ListDocuments(
        ["".join(rng.choice(alphabet, rng.integers(0, max_len))) for _ in range(n)], f"d{seed}"
    )


def _mixture(weights, batch_size=8, lanes=8, one_window=False, tokenizer=TOK, **process):
    streams = [
        pipeline.PackedStream(
            _random_docs(s, 25 + 10 * s, 40 + 300 * s),
            tokenizer,
            seq_len=24,
            seed=s,
            lanes=lanes,
            one_window_per_document=one_window,
        )
        for s in range(len(weights))
    ]
    return pipeline.DataIterator(streams, batch_size, weights=weights, **process)


def _assert_batches_equal(got, want):
    assert got.keys() == want.keys()
    for key in pipeline.EXAMPLE_KEYS:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _concat(parts):
    return {k: np.concatenate([p[k] for p in parts]) for k in pipeline.EXAMPLE_KEYS}


def _numbered_mixture(num_sources, tokenizers, process_index, process_count, batch_size=8):
    streams = [
        pipeline.PackedStream(
            _numbered_docs(s, 400, f"s{s}"), tokenizers[s], seq_len=16, seed=s, lanes=batch_size
        )
        for s in range(num_sources)
    ]
    return pipeline.DataIterator(
        streams, batch_size, process_index=process_index, process_count=process_count
    )


@pytest.mark.parametrize("num_sources", [1, 2])
def test_each_process_tokenizes_only_the_documents_of_its_own_rows(num_sources):
    # One source, or two at equal weights: a lane stays on the same rows from batch to batch.
    def run(process_index, process_count):
        tokenizers = [DocIdTokenizer() for _ in range(num_sources)]
        iterator = _numbered_mixture(num_sources, tokenizers, process_index, process_count)
        return [next(iterator) for _ in range(6)], tokenizers

    whole, whole_tokenizers = run(0, 1)
    parts = [run(p, 2) for p in range(2)]
    for step, want in enumerate(whole):
        _assert_batches_equal(_concat([batches[step] for batches, _ in parts]), want)
    for source in range(num_sources):
        touched = [set(tokenizers[source].encoded) for _, tokenizers in parts]
        for (batches, _), mine in zip(parts, touched, strict=True):
            rows = [{k: v[b["domain"][:, 0] == source] for k, v in b.items()} for b in batches]
            assert mine == _docs_in(rows)
        assert not touched[0] & touched[1]
        assert touched[0] | touched[1] == set(whole_tokenizers[source].encoded)
        assert len(touched[0]) < 0.6 * len(whole_tokenizers[source].encoded)


@pytest.mark.parametrize("process_count", [2, 4])
@pytest.mark.parametrize("one_window", [False, True])
@pytest.mark.parametrize(
    "weights, lanes", [([5, 3, 2], 8), ([0.7, 0.3], 3), ([1, 1, 1], 16), ([0.2, 0.8], 8)]
)
def test_processes_rows_concatenated_are_the_one_process_batch(
    weights, lanes, one_window, process_count
):
    whole = _mixture(weights, lanes=lanes, one_window=one_window)
    parts = [
        _mixture(
            weights,
            lanes=lanes,
            one_window=one_window,
            process_index=p,
            process_count=process_count,
        )
        for p in range(process_count)
    ]
    for step in range(30):
        if step == 11:  # token shares change while running (as DoGE / DoReMi do)
            for iterator in [whole, *parts]:
                iterator.set_weights(weights[::-1])
        want = next(whole)
        got = [next(p) for p in parts]
        assert all(len(g["inputs"]) == 8 // process_count for g in got)
        _assert_batches_equal(_concat(got), want)


def test_global_batch_rows_keep_the_same_rows():
    whole = pipeline.GlobalBatchRows(_mixture([5, 3, 2]), pipeline.process_rows(8, 1, 2))
    mine = _mixture([5, 3, 2], process_index=1, process_count=2)
    for _ in range(5):
        _assert_batches_equal(next(mine), next(whole))


def test_resume_of_each_process_gives_the_same_next_batches():
    weights = [5, 3, 2]  # lanes move between the processes' rows
    parts = [_mixture(weights, process_index=p, process_count=2) for p in range(2)]
    for step in range(9):
        if step == 4:
            for iterator in parts:
                iterator.set_weights([0.2, 0.3, 0.5])
        for iterator in parts:
            next(iterator)
    states = [iterator.get_state() for iterator in parts]
    expected = [[next(iterator) for _ in range(6)] for iterator in parts]
    merged = pipeline.merge_states(states)
    # Its own state, the merged state, or another process's state (exact, only slower).
    for p in range(2):
        for state in (states[p], merged, states[1 - p]):
            resumed = _mixture(weights, process_index=p, process_count=2)
            resumed.set_state(state)
            for want in expected[p]:
                _assert_batches_equal(next(resumed), want)


def test_resumed_processes_read_only_their_rows_from_the_merged_state():
    def iterators(tokenizers):
        return [_numbered_mixture(1, [tokenizers[p]], p, 2) for p in range(2)]

    first = iterators([DocIdTokenizer(), DocIdTokenizer()])
    for _ in range(5):
        for iterator in first:
            next(iterator)
    merged = pipeline.merge_states([iterator.get_state() for iterator in first])
    tokenizers = [DocIdTokenizer(), DocIdTokenizer()]
    resumed = iterators(tokenizers)
    for iterator in resumed:
        iterator.set_state(merged)
    for p in range(2):
        batches = [next(resumed[p]) for _ in range(4)]
        for want, got in zip([next(first[p]) for _ in range(4)], batches, strict=True):
            _assert_batches_equal(got, want)
        assert set(tokenizers[p].encoded) == _docs_in(batches)


def test_a_state_saved_before_processes_resumes():
    iterator = _mixture([0.7, 0.3])
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    expected = next(iterator)
    for stream in state["streams"]:  # the format saved before per-process batches
        assert stream.pop("pending") == [0] * 8
    resumed = _mixture([0.7, 0.3])
    resumed.set_state(state)
    _assert_batches_equal(next(resumed), expected)


def test_merge_states_refuses_states_of_different_steps():
    parts = [_mixture([1, 1], process_index=p, process_count=2) for p in range(2)]
    next(parts[0])
    with pytest.raises(ValueError, match="state 1 is not at the same step"):
        pipeline.merge_states([p.get_state() for p in parts])
    with pytest.raises(ValueError, match="at least one state"):
        pipeline.merge_states([])


def test_prefetch_gives_the_same_batches_states_and_weight_changes():
    bare, ahead = _mixture([5, 3, 2]), pipeline.prefetch(_mixture([5, 3, 2]), buffer_size=3)
    try:
        for step in range(12):
            if step == 5:
                bare.set_weights([1, 0, 1])
                ahead.set_state(pipeline.with_weights(ahead.get_state(), [1, 0, 1]))
            _assert_batches_equal(next(ahead), next(bare))
            assert ahead.get_state() == bare.get_state()
    finally:
        ahead.close()
    with pytest.raises(ValueError, match="mixture weights must be 3"):
        pipeline.with_weights(bare.get_state(), [1, 2])


@pytest.mark.parametrize(
    "batch_size, process_index, process_count, message",
    [
        (6, 0, 4, "batch_size must be divisible by process_count=4, got 6"),
        (8, 2, 2, r"process_index must be in \[0, process_count=2\), got 2"),
        (8, -1, 2, r"process_index must be in \[0, process_count=2\), got -1"),
        (8, 0, 0, "process_count must be >= 1, got 0"),
    ],
)
def test_bad_process_arguments_are_named(batch_size, process_index, process_count, message):
    with pytest.raises(ValueError, match=message):
        _mixture(
            [1], batch_size=batch_size, process_index=process_index, process_count=process_count
        )


def test_train_iterator_gives_each_process_its_rows(tmp_path):
    records = tmp_path / "qa.jsonl"
    with open(records, "w") as f:
        for i in range(40):
            f.write(json.dumps({"question": f"{i} + {i} = ?", "answer": str(2 * i)}) + "\n")
    for spec in ("embedded:json", f"qa:{records}?prompt=question&answer=answer"):
        config = ml_collections.ConfigDict(
            dict(
                sources=(spec,),
                weights=(),
                text_field="text",
                validation_fraction=0.1,
                tfds_data_dir="",
                seed=0,
                lanes=0,
            )
        )

        def batches(process_index, process_count, config=config):
            iterator = pipeline.train_iterator(
                config,
                TOK,
                seq_len=32,
                batch_size=8,
                process_index=process_index,
                process_count=process_count,
            )
            return [next(iterator) for _ in range(3)]

        whole = batches(0, 1)
        parts = [batches(p, 2) for p in range(2)]
        for step, want in enumerate(whole):
            _assert_batches_equal(_concat([part[step] for part in parts]), want)


def test_a_state_with_other_lanes_is_named():
    state = _mixture([1], lanes=3).get_state()
    with pytest.raises(ValueError, match="state has 3 cursors and 3 pending counts, the stream 8"):
        _mixture([1], lanes=8).set_state(state)
