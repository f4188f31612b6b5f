"""Packing, mixing and resuming of the language-modelling pipeline."""

import json
import re

import ml_collections
import numpy as np
import pytest

from jaxlab.data import pipeline
from jaxlab.data.sources import ListDocuments
from jaxlab.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()


def _random_docs(seed, n, max_len=300, name="docs"):
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefghij \n") + ["é", "ü", "→"]
    return ListDocuments(
        ["".join(rng.choice(alphabet, rng.integers(0, max_len))) for _ in range(n)], name
    )


def test_packing_reconstructs_the_token_stream():
    docs = _random_docs(0, 40)
    stream = pipeline.PackedStream(docs, TOK, seq_len=37, shuffle=False)
    examples = [stream.next_example() for _ in range(60)]
    got = np.concatenate([e["inputs"] for e in examples] + [examples[-1]["targets"][-1:]])
    expected = np.concatenate([TOK.encode(d, add_bos=True, add_eos=True) for d in list(docs) * 3])[
        : len(got)
    ]
    np.testing.assert_array_equal(got, expected)
    for e in examples:
        np.testing.assert_array_equal(e["targets"][:-1], e["inputs"][1:])


def test_segments_positions_and_loss_mask_follow_document_boundaries():
    stream = pipeline.PackedStream(_random_docs(1, 30, max_len=40), TOK, seq_len=64, shuffle=False)
    for _ in range(20):
        e = stream.next_example()
        # A target that starts a new document (bos) is not predicted from the previous one.
        np.testing.assert_array_equal(e["loss_mask"], (e["targets"] != TOK.bos_id).astype(int))
        starts = e["inputs"] == TOK.bos_id
        # Segment ids increase exactly at document starts (after the first token).
        np.testing.assert_array_equal(np.diff(e["segment_ids"]), starts[1:].astype(int))
        # Positions restart at every new segment and count up otherwise.
        new_segment = np.concatenate([[True], np.diff(e["segment_ids"]) > 0])
        expected = np.zeros(64, int)
        for t in range(1, 64):
            expected[t] = 0 if new_segment[t] else expected[t - 1] + 1
        np.testing.assert_array_equal(e["positions"], expected)


def _shares(iterator, num_tokens):
    counts = np.zeros(len(iterator.streams))
    seen = 0
    while seen < num_tokens:
        batch = next(iterator)
        for source in range(len(counts)):
            counts[source] += (batch["domain"] == source).sum()
        seen += batch["domain"].size
    return counts / counts.sum()


def test_mixture_token_shares_before_and_after_a_weight_change():
    streams = [
        pipeline.PackedStream(_random_docs(s, 50, max_len=50 + 400 * s), TOK, seq_len=128, seed=s)
        for s in range(3)
    ]
    iterator = pipeline.DataIterator(streams, batch_size=8, weights=[5, 3, 2])
    np.testing.assert_allclose(_shares(iterator, 100_000), [0.5, 0.3, 0.2], atol=0.01)
    iterator.set_weights([0.1, 0.1, 0.8])
    np.testing.assert_allclose(_shares(iterator, 100_000), [0.1, 0.1, 0.8], atol=0.01)


def test_resume_from_state_gives_the_same_batches():
    def make():
        streams = [
            pipeline.PackedStream(_random_docs(s, 20), TOK, seq_len=50, seed=s) for s in range(2)
        ]
        return pipeline.DataIterator(streams, batch_size=4, weights=[0.7, 0.3])

    a = make()
    for _ in range(7):
        next(a)
    a.set_weights([0.4, 0.6])
    next(a)
    state = a.get_state()
    expected = [next(a) for _ in range(5)]
    b = make()
    b.set_state(state)
    for want in expected:
        got = next(b)
        for key in pipeline.EXAMPLE_KEYS:
            np.testing.assert_array_equal(got[key], want[key])


def test_shuffle_is_deterministic_and_reshuffles_each_epoch():
    docs = ListDocuments([f"doc {i}" for i in range(10)], "numbers")

    def first_tokens(seed):
        stream = pipeline.PackedStream(docs, TOK, seq_len=7, seed=seed)
        return np.concatenate([stream.next_example()["inputs"] for _ in range(40)])

    np.testing.assert_array_equal(first_tokens(3), first_tokens(3))
    assert not np.array_equal(first_tokens(3), first_tokens(4))
    text = TOK.decode(first_tokens(3))
    epochs = [text[i * 50 : (i + 1) * 50] for i in range(2)]  # 10 docs x 5 chars per epoch
    assert sorted(epochs[0].split("doc ")) == sorted(epochs[1].split("doc "))
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("weights", [[1, -1], [0, 0], [1, float("nan")], [1, 2, 3]])
def test_bad_weights_are_named(weights):
    streams = [pipeline.PackedStream(_random_docs(s, 5), TOK, seq_len=8) for s in range(2)]
    with pytest.raises(ValueError, match="mixture weights must be 2 finite non-negative"):
        pipeline.DataIterator(streams, batch_size=2, weights=weights)


def test_embedded_components_and_natural_weights():
    config = ml_collections.ConfigDict(
        dict(
            sources=("embedded:json", "embedded:email"),
            weights=(),
            text_field="text",
            validation_fraction=0.05,
            tfds_data_dir="",
            seed=0,
        )
    )
    comps = pipeline.build_components(config)
    assert [c.name for c in comps] == ["json", "email"]
    weights = pipeline.mixture_weights(config, comps)
    sizes = [sum(len(doc.encode()) for doc in c.train) for c in comps]
    np.testing.assert_allclose(
        np.array(weights) / sum(weights), np.array(sizes) / sum(sizes), rtol=0.02
    )
    # The whole corpus as one component reads its few non-UTF-8 test files as the domains do.
    (whole,) = pipeline.resolve_source("embedded")
    assert whole.train.errors == "replace" and comps[0].train.errors == "replace"
    with pytest.raises(ValueError, match="kind must be one of"):
        pipeline.resolve_source("s3:bucket")
    with pytest.raises(ValueError, match="unknown domains"):
        pipeline.resolve_source("embedded:no_such_package")


def test_tfds_and_jsonl_sources_feed_the_pipeline(tmp_path):
    from jaxlab.data.tfds_text import build_text_dataset

    texts = [f"record {i}: " + "é" * (i % 7) for i in range(60)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in texts), encoding="utf-8")
    dataset_dir = build_text_dataset(str(jsonl), str(tmp_path / "tfds"), validation_fraction=0.2)
    config = ml_collections.ConfigDict(
        dict(
            sources=(f"tfds:{dataset_dir}", f"jsonl:{jsonl}"),
            weights=(0.5, 0.5),
            text_field="text",
            validation_fraction=0.2,
            tfds_data_dir="",
            seed=0,
        )
    )
    comps = pipeline.build_components(config)
    assert sorted(list(comps[0].train) + list(comps[0].validation)) == sorted(texts)
    assert sorted(list(comps[1].train) + list(comps[1].validation)) == sorted(texts)
    batch = next(pipeline.train_iterator(config, TOK, seq_len=16, batch_size=4, components=comps))
    assert sorted(set(batch["domain"][:, 0].tolist())) == [0, 1]
    text = TOK.decode(batch["inputs"].ravel())
    assert "record" in text


def test_eval_stream_takes_one_window_per_document():
    docs = _random_docs(5, 30, max_len=400)
    stream = pipeline.PackedStream(
        docs, TOK, seq_len=16, shuffle=False, one_window_per_document=True
    )
    seen = []
    for _ in range(10):
        e = stream.next_example()
        assert e["inputs"][0] == TOK.bos_id
        seen.append(TOK.decode(e["inputs"]))
    # Each window starts a new document: long documents are not continued.
    expected_start = 0
    for text in seen:
        doc = docs[expected_start]
        assert text.startswith(doc[: min(len(doc), 5)])
        consumed = len(TOK.encode(doc, add_bos=True, add_eos=True))
        expected_start += 1
        while consumed < 17:
            consumed += len(TOK.encode(docs[expected_start], add_bos=True, add_eos=True))
            expected_start += 1


def test_lanes_pack_interleaved_documents_side_by_side():
    docs = _random_docs(6, 24)
    stream = pipeline.PackedStream(docs, TOK, seq_len=20, shuffle=False, lanes=3)
    examples = [stream.next_example() for _ in range(45)]
    for lane in range(3):
        mine = examples[lane::3]
        got = np.concatenate([e["inputs"] for e in mine] + [mine[-1]["targets"][-1:]])
        lane_docs = [docs[i] for i in range(lane, 24, 3)] * 2
        expected = np.concatenate([TOK.encode(d, add_bos=True, add_eos=True) for d in lane_docs])
        np.testing.assert_array_equal(got, expected[: len(got)])
    state = stream.get_state()
    again = pipeline.PackedStream(docs, TOK, seq_len=20, shuffle=False, lanes=3)
    again.set_state(state)
    np.testing.assert_array_equal(again.next_example()["inputs"], stream.next_example()["inputs"])


def test_a_source_whose_files_are_all_empty_is_named(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("")
    (tmp_path / "docs.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    (tmp_path / "full.txt").write_text("some text\n")
    cases = [
        (f"text:{tmp_path}/[0-9].txt", "its 3 files are all empty"),
        (f"jsonl:{tmp_path}/docs.jsonl", "its 2 documents are all empty"),
    ]
    for spec, what in cases:
        config = ml_collections.ConfigDict(
            dict(
                sources=(spec, f"text:{tmp_path}/full.txt"),
                weights=(),
                text_field="text",
                validation_fraction=0.0,
                tfds_data_dir="",
                seed=0,
            )
        )
        message = rf"source '{re.escape(spec)}' has no text to train on: {what}"
        with pytest.raises(ValueError, match=message) as error:
            pipeline.build_components(config)
        assert "mixture weights" not in str(error.value)
        # Natural weights of components built by hand name the empty component too.
        comps = [pipeline.Component(spec.partition(":")[2], ListDocuments(["", ""], "x"), ())]
        with pytest.raises(ValueError, match=r"natural mixture weights.*'.*'\] are all 0"):
            pipeline.mixture_weights(config, comps)


def test_named_sources(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(20)))
    (named,) = pipeline.resolve_source(f"guidelines=jsonl:{path}", validation_fraction=0.2)
    (plain,) = pipeline.resolve_source(f"jsonl:{path}", validation_fraction=0.2)
    assert named.name == "guidelines" and plain.name == str(path)
    assert list(named.train) == list(plain.train)
    assert list(named.validation) == list(plain.validation)
    with pytest.raises(ValueError, match=r"a name needs a spec of one component.*gives \d+"):
        pipeline.resolve_source("stdlib=embedded:*")
    # Not a name: '=' inside a path, or a kind that takes no name.
    with pytest.raises(ValueError, match="kind must be one of"):
        pipeline.resolve_source("a b=jsonl:x")
    with pytest.raises(ValueError, match="kind must be one of"):
        pipeline.resolve_source("x=qa:records.jsonl")
