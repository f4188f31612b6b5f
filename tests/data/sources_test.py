"""Document sources: the embedded standard-library corpus, globs and JSONL."""

import json
import os

import pytest

from jaxlab.data import sources


def test_embedded_corpus_splits_are_disjoint_deterministic_and_complete():
    train = sources.embedded_corpus("train")
    valid = sources.embedded_corpus("validation")
    assert list(train) == list(valid) == sorted(train)
    train_paths = {p for d in train.values() for p in d.paths}
    valid_paths = {p for d in valid.values() for p in d.paths}
    assert not train_paths & valid_paths
    root = sources.stdlib_root()
    on_disk = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "__pycache__")]
        on_disk |= {os.path.join(dirpath, f) for f in filenames if f.endswith(".py")}
    assert {os.path.normpath(p) for p in train_paths | valid_paths} == {
        os.path.normpath(p) for p in on_disk
    }
    assert 0.02 < len(valid_paths) / len(on_disk) < 0.08
    assert sum(sum(d.sizes()) for d in train.values()) > 10_000_000
    assert "email" in train and "_modules" in train
    assert train["email"][0] == open(train["email"].paths[0], encoding="utf-8").read()
    assert [p for p in sources.embedded_corpus("train")["email"].paths] == train["email"].paths


def test_text_files_and_jsonl(tmp_path):
    for i in range(30):
        (tmp_path / f"{i}.txt").write_text(f"document {i} ü", encoding="utf-8")
    train = sources.text_files(str(tmp_path / "*.txt"), "train", validation_fraction=0.3)
    valid = sources.text_files(str(tmp_path / "*.txt"), "validation", validation_fraction=0.3)
    assert sorted(list(train) + list(valid)) == sorted(f"document {i} ü" for i in range(30))
    assert 0 < len(valid) < 20

    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"line {i}"}) for i in range(10)))
    docs = list(sources.jsonl_documents(str(path), "train", text_field="body",
                                        validation_fraction=0.0))  # fmt: skip
    assert docs == [f"line {i}" for i in range(10)]
    path.write_text(json.dumps({"body": "ok"}) + "\n" + json.dumps({"text": "no body"}))
    with pytest.raises(ValueError, match=r"data.jsonl:2: expected an object with a string field"):
        sources.jsonl_documents(str(path), text_field="body")


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        sources.embedded_corpus("test")
    with pytest.raises(ValueError, match="no files match"):
        sources.text_files(str(tmp_path / "*.nothing"))
