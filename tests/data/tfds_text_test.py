"""Tests for jaxlab.data.tfds_text: local files -> array_record TFDS dataset -> str documents.

The reference is the list of Python strings the tests write; reading back goes through TFDS's
array_record data source and grain.
"""

import collections
import json
import os
import pickle
import random

import grain
import pytest
import tensorflow_datasets as tfds

from jaxlab.data.tfds_text import LocalText, build_text_dataset, tfds_text_source

VALIDATION_FRACTION = 0.25
# Pieces that exercise UTF-8 and JSON escaping: accents, CJK, astral emoji, combining marks,
# right-to-left script, quotes, backslashes, control characters and every newline convention.
PIECES = [
    "héllo",
    "naïve café",
    "日本語のテキスト",
    "😀🚀",
    "e\u0301",
    "שלום",
    '"quoted"',
    "back\\slash",
    "tab\there",
    "\r\n",
    "\n",
    "\r",
    "\u2028",
    "\x00",
    "{}",
    "word",
    " ",
]


def random_document(rng: random.Random) -> str:
    """A seeded string of pieces and arbitrary code points (surrogates excluded: not UTF-8)."""
    parts = []
    for _ in range(rng.randint(1, 12)):
        if rng.random() < 0.8:
            parts.append(rng.choice(PIECES))
        else:
            code_point = rng.randint(1, 0x10FFFF)
            while 0xD800 <= code_point <= 0xDFFF:
                code_point = rng.randint(1, 0x10FFFF)
            parts.append(chr(code_point))
    return "".join(parts)


def write_corpus(directory, seed: int = 0):
    """Writes 6 text files and one JSONL file; returns (inputs, the documents written)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    documents = []
    for i in range(6):
        text = random_document(rng) + ("\n" if i % 2 else "")
        (directory / f"doc_{i}.txt").write_bytes(text.encode("utf-8"))
        documents.append(text)
    lines = []
    for i in range(200):
        text = random_document(rng)
        if i == 17:  # An exact copy of an earlier document: both must land in one split.
            text = documents[-1]
        documents.append(text)
        record = {"id": i, "text": text} if i % 3 else {"text": text, "meta": {"n": i}}
        lines.append(json.dumps(record, ensure_ascii=bool(i % 2)))
        if i == 50:
            lines.append("   ")  # Blank lines are skipped.
    (directory / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [str(directory / "doc_*.txt"), str(directory / "docs.jsonl")], documents


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The corpus written and built once: (inputs, documents, data_dir, dataset_dir)."""
    root = tmp_path_factory.mktemp("tfds_text")
    inputs, documents = write_corpus(root / "inputs")
    data_dir = str(root / "tfds")
    dataset_dir = build_text_dataset(
        inputs, data_dir, name="my_text", validation_fraction=VALIDATION_FRACTION
    )
    return inputs, documents, data_dir, dataset_dir


def test_build_writes_array_record_dataset(corpus):
    _, _, data_dir, dataset_dir = corpus
    assert dataset_dir == os.path.join(data_dir, "my_text", "1.0.0")
    files = sorted(os.listdir(dataset_dir))
    assert "dataset_info.json" in files and "features.json" in files
    assert any(f.startswith("my_text-train.array_record") for f in files)
    assert any(f.startswith("my_text-validation.array_record") for f in files)
    assert not os.path.exists(os.path.join(data_dir, "downloads"))
    assert sorted(os.listdir(data_dir)) == ["my_text"]


def test_round_trip_and_split_partition(corpus):
    _, documents, _, dataset_dir = corpus
    train = list(tfds_text_source(dataset_dir, "train"))
    validation = list(tfds_text_source(dataset_dir, "validation"))
    assert all(type(d) is str for d in train + validation)
    # Every document comes back exactly (bytes, newlines, non-ASCII), once per time written.
    assert collections.Counter(train + validation) == collections.Counter(documents)
    assert not set(train) & set(validation)
    # ~206 documents, p = 0.25: mean 51.5, standard deviation 6.2; allow 4 deviations.
    n = len(documents)
    mean, std = (
        n * VALIDATION_FRACTION,
        (n * VALIDATION_FRACTION * (1 - VALIDATION_FRACTION)) ** 0.5,
    )
    assert abs(len(validation) - mean) < 4 * std, (len(validation), mean)


def test_reading_is_deterministic(corpus, tmp_path):
    inputs, _, data_dir, dataset_dir = corpus
    for split in ("train", "validation"):
        first = tfds_text_source(dataset_dir, split)
        second = tfds_text_source("my_text", split, data_dir=data_dir)
        assert list(first) == list(second)
        assert [first[i] for i in reversed(range(len(first)))] == list(reversed(list(second)))
    # A second build of the same files elsewhere gives the same order and assignment.
    again = build_text_dataset(
        inputs, str(tmp_path), name="my_text", validation_fraction=VALIDATION_FRACTION
    )
    for split in ("train", "validation"):
        assert list(tfds_text_source(again, split)) == list(tfds_text_source(dataset_dir, split))


def test_source_protocol(corpus):
    _, _, _, dataset_dir = corpus
    source = tfds_text_source(os.path.dirname(dataset_dir), "validation")  # The name/ directory.
    documents = list(tfds_text_source(dataset_dir, "validation"))
    n = len(source)
    assert n == len(documents) > 0
    assert source[-1] == documents[-1] and source[0] == documents[0]
    assert source.__getitems__([2, 0, 2]) == [documents[2], documents[0], documents[2]]
    assert source[1:4] == documents[1:4]
    with pytest.raises(IndexError, match=str(n)):
        source[n]
    with pytest.raises(TypeError, match="index"):
        source["0"]


def test_grain_source_and_pickle(corpus):
    _, _, _, dataset_dir = corpus
    source = tfds_text_source(dataset_dir, "train")
    dataset = grain.MapDataset.source(source)
    assert len(dataset) == len(source)
    for i in range(0, len(source), 7):
        assert dataset[i] == source[i]
    assert list(dataset.map(len)) == [len(d) for d in source]
    restored = pickle.loads(pickle.dumps(source))
    assert list(restored) == list(source)


def test_tfds_reads_the_dataset_natively(corpus):
    _, _, data_dir, dataset_dir = corpus
    native = tfds.data_source("my_text", split="train", data_dir=data_dir, download=False)
    assert [r["text"].decode("utf-8") for r in native] == list(
        tfds_text_source(dataset_dir, "train")
    )
    assert tfds.builder_from_directory(dataset_dir).info.file_format.value == "array_record"


def test_split_slicing(corpus):
    _, _, _, dataset_dir = corpus
    train = list(tfds_text_source(dataset_dir, "train"))
    both = list(tfds_text_source(dataset_dir, "train+validation"))
    assert both[: len(train)] == train
    assert len(tfds_text_source(dataset_dir, "train[:10]")) == 10


def test_unknown_split_lists_available(corpus):
    _, _, _, dataset_dir = corpus
    with pytest.raises(ValueError, match=r"'test'.*\['train', 'validation'\]"):
        tfds_text_source(dataset_dir, "test")
    with pytest.raises(ValueError, match=r"'tset'.*\['train', 'validation'\]"):
        tfds_text_source(dataset_dir, "train+tset[:5]")


def test_unknown_text_field(corpus):
    _, _, _, dataset_dir = corpus
    with pytest.raises(ValueError, match=r"'body'.*\['text'\]"):
        tfds_text_source(dataset_dir, "train", text_field="body")


def test_missing_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        tfds_text_source("nothing_here", "train", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset_info.json"):
        tfds_text_source(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="neither an existing directory"):
        tfds_text_source(str(tmp_path / "not-there"), "train")


def test_jsonl_line_missing_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"body": "c"}\n', encoding="utf-8")
    data_dir = tmp_path / "tfds"
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: .*'text'"):
        build_text_dataset(str(path), str(data_dir))
    assert not os.path.exists(data_dir / "local_text" / "1.0.0")
    with pytest.raises(
        ValueError,
        match=r"bad\.jsonl, line 2: invalid JSON: Expecting value at "
        r"column 13",
    ) as error:
        path.write_text('{"content": "a"}\n{"content": ]}\n', encoding="utf-8")
        build_text_dataset(str(path), str(data_dir), text_field="content")
    assert "line 1" not in str(error.value)  # json's own count restarts at each line


def test_jsonl_line_endings_and_encoding_errors(tmp_path):
    path = tmp_path / "crlf.jsonl"
    # CRLF line ends, a bare CR as JSON whitespace inside an object, and a U+2028 in a string.
    path.write_bytes(b'{"text": "a\\r\\nb"}\r\n{"text":\r"c\xe2\x80\xa8d"}\r\n\r\n')
    dataset_dir = build_text_dataset(str(path), str(tmp_path / "tfds"), validation_fraction=0.0)
    assert sorted(tfds_text_source(dataset_dir, "train")) == ["a\r\nb", "c\u2028d"]
    bad = tmp_path / "surrogate.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "\\ud800"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"surrogate\.jsonl, line 2: .*UTF-8"):
        build_text_dataset(str(bad), str(tmp_path / "tfds2"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("first\ncafé".encode("latin-1"))
    message = r"latin1\.txt: not valid UTF-8: byte 0xe9 at line 2, column 4 \(byte offset 9\)"
    with pytest.raises(ValueError, match=message):
        build_text_dataset(str(latin1), str(tmp_path / "tfds3"))


def test_explicit_validation_files(tmp_path):
    rng = random.Random(1)
    train_docs = [random_document(rng) for _ in range(5)]
    validation_docs = [random_document(rng) for _ in range(3)]
    for i, doc in enumerate(train_docs):
        (tmp_path / f"train_{i}.txt").write_text(doc, encoding="utf-8", newline="")
    (tmp_path / "held_out.jsonl").write_text(
        "".join(json.dumps({"body": d}) + "\n" for d in validation_docs), encoding="utf-8"
    )
    dataset_dir = build_text_dataset(
        str(tmp_path / "train_*.txt"),
        str(tmp_path / "tfds"),
        text_field="body",
        validation_inputs=[str(tmp_path / "held_out.jsonl")],
    )
    train = tfds_text_source(dataset_dir, "train")
    validation = tfds_text_source(dataset_dir, "validation")
    assert sorted(train) == sorted(train_docs)
    assert sorted(validation) == sorted(validation_docs)


def test_zero_fraction_writes_train_only(tmp_path):
    (tmp_path / "a.txt").write_text("only", encoding="utf-8")
    dataset_dir = build_text_dataset(
        str(tmp_path / "a.txt"), str(tmp_path / "tfds"), validation_fraction=0.0
    )
    assert list(tfds_text_source(dataset_dir, "train")) == ["only"]
    with pytest.raises(ValueError, match=r"available splits: \['train'\]"):
        tfds_text_source(dataset_dir, "validation")


def test_existing_dataset_needs_overwrite(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n', encoding="utf-8")
    data_dir = str(tmp_path / "tfds")
    build_text_dataset(str(path), data_dir, validation_fraction=0.0)
    path.write_text('{"text": "three"}\n', encoding="utf-8")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_text_dataset(str(path), data_dir, validation_fraction=0.0)
    dataset_dir = build_text_dataset(str(path), data_dir, validation_fraction=0.0, overwrite=True)
    assert list(tfds_text_source(dataset_dir, "train")) == ["three"]


def test_bad_arguments(tmp_path):
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(ValueError, match=r"validation_fraction must be in \[0, 1\); got 1.0"):
        build_text_dataset(str(tmp_path / "a.txt"), data_dir, validation_fraction=1.0)
    with pytest.raises(FileNotFoundError, match=r"inputs: the glob .*\*\.md"):
        build_text_dataset(str(tmp_path / "*.md"), data_dir)
    with pytest.raises(IsADirectoryError, match="inputs"):
        build_text_dataset(str(tmp_path), data_dir)
    with pytest.raises(ValueError, match="name must match"):
        build_text_dataset(str(tmp_path / "a.txt"), data_dir, name="My-Data")
    with pytest.raises(ValueError, match="'validation' split would be empty"):
        build_text_dataset(str(tmp_path / "a.txt"), data_dir, validation_fraction=1e-9)


def test_builder_is_not_registered():
    assert "local_text" not in tfds.list_builders(with_community_datasets=False)
    assert issubclass(LocalText, tfds.core.GeneratorBasedBuilder)
