"""Document sources: the embedded standard-library corpus, globs and JSONL."""

import json
import os

import numpy as np
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


def test_split_does_not_depend_on_where_the_data_lies(tmp_path, monkeypatch):
    # The same dataset in two folders (and read through a relative pattern) splits the same way:
    # the hash sees paths relative to the pattern's fixed part, not the absolute path.
    rng = np.random.default_rng(0)
    texts = [f"record {i} {rng.integers(1_000_000)}" for i in range(200)]
    for folder in ("a", "deeper/b"):
        root = tmp_path / folder / "data"
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "part.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
        for i, t in enumerate(texts[:60]):
            (root / f"{i}.txt").write_text(t)

    def splits(pattern, read):
        return [list(read(pattern, split, validation_fraction=0.3)) for split in sources.SPLITS]

    for read, tail in ((sources.jsonl_documents, "**/*.jsonl"), (sources.text_files, "*.txt")):
        first = splits(str(tmp_path / "a/data" / tail), read)
        assert first == splits(str(tmp_path / "deeper/b/data" / tail), read)
        assert 0 < len(first[1]) < len(first[0])  # both splits used
        monkeypatch.chdir(tmp_path / "deeper")
        assert first == splits(os.path.join("b/data", tail), read)
    train, valid = splits(str(tmp_path / "a/data/sub/part.jsonl"), sources.jsonl_documents)
    assert sorted(train + valid) == sorted(texts)


def test_text_files_and_jsonl(tmp_path):
    for i in range(30):
        (tmp_path / f"{i}.txt").write_text(f"document {i} ü", encoding="utf-8")
    train = sources.text_files(str(tmp_path / "*.txt"), "train", validation_fraction=0.3)
    valid = sources.text_files(str(tmp_path / "*.txt"), "validation", validation_fraction=0.3)
    assert sorted(list(train) + list(valid)) == sorted(f"document {i} ü" for i in range(30))
    assert 0 < len(valid) < 20

    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"line {i}"}) for i in range(10)))
    docs = list(
        sources.jsonl_documents(str(path), "train", text_field="body", validation_fraction=0.0)
    )
    assert docs == [f"line {i}" for i in range(10)]
    path.write_text(json.dumps({"body": "ok"}) + "\n" + json.dumps({"text": "no body"}))
    with pytest.raises(ValueError, match=r"data.jsonl:2: expected an object with a string field"):
        sources.jsonl_documents(str(path), text_field="body")


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        sources.embedded_corpus("test")
    with pytest.raises(ValueError, match="no files match"):
        sources.text_files(str(tmp_path / "*.nothing"))


# Bad text is refused when the source is built, naming the file, line and field.


def test_malformed_jsonl_line_names_its_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    good = [json.dumps({"text": f"document {i}"}) for i in range(57)]
    path.write_text("\n".join([*good, '{"text": "unterminated', *good[:3]]) + "\n")
    for split in ("train", "validation"):
        with pytest.raises(ValueError, match=r"data.jsonl:58: not valid JSON") as error:
            sources.jsonl_documents(str(path), split)
        assert "line 1" not in str(error.value)


def test_invalid_utf8_in_jsonl_names_its_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": f"document {i}"}).encode() for i in range(4)]
    lines[2] = b'{"text": "caf\xe9"}'  # Latin-1, not UTF-8
    raw = b"\n".join(lines) + b"\n"
    path.write_bytes(raw)
    offset, column = raw.index(b"\xe9"), lines[2].index(b"\xe9") + 1
    message = rf"data.jsonl:3: not valid UTF-8: byte 0xe9 at column {column} \(byte offset {offset}"
    with pytest.raises(ValueError, match=message):
        sources.jsonl_documents(str(path))


def test_lone_surrogate_in_jsonl_is_refused_at_load(tmp_path):
    path = tmp_path / "data.jsonl"
    # Valid JSON whose string holds a lone surrogate: Python decodes it, UTF-8 cannot encode it.
    path.write_text('{"text": "fine"}\n{"other": "\\ud800", "text": "bad \\udcff"}\n')
    assert json.loads(path.read_text().splitlines()[1])["text"] == "bad \udcff"
    for split in ("train", "validation"):  # whichever split the record falls in
        message = r"data.jsonl:2: field 'text' holds a lone surrogate '\\udcff' at character 4"
        with pytest.raises(ValueError, match=message):
            sources.jsonl_documents(str(path), split)
    # Other fields are not read, so only the text field is checked.
    path.write_text('{"other": "\\ud800", "text": "fine"}\n')
    assert list(sources.jsonl_documents(str(path), validation_fraction=0.0)) == ["fine"]


def test_invalid_utf8_text_file_names_the_file_line_and_offset(tmp_path):
    (tmp_path / "a.txt").write_text("all good\n", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"first line\nsecond \xff\xfe line\n")
    message = r"b.txt: not valid UTF-8: byte 0xff at line 2, column 8 \(byte offset 18\)"
    with pytest.raises(ValueError, match=message):
        sources.text_files(str(tmp_path / "*.txt"), validation_fraction=0.0)
    # A file that goes bad after the source was built is named when it is read.
    (tmp_path / "b.txt").write_text("fixed\n", encoding="utf-8")
    docs = sources.text_files(str(tmp_path / "*.txt"), validation_fraction=0.0)
    assert list(docs) == ["all good\n", "fixed\n"]
    (tmp_path / "b.txt").write_bytes(b"\xc3")
    with pytest.raises(ValueError, match=r"b.txt: not valid UTF-8: byte 0xc3 at line 1, column 1"):
        docs[1]


# Newlines are read as text mode reads them (universal newlines), in every read path.

NEWLINE_FILES = {
    "crlf_cr.txt": b"a\r\nb\rc\n",
    "windows.txt": b"line one\r\nline two\r\n",
    "old_mac.txt": b"x\ry\r",
    "mixed.txt": b"\r\r\n\n\r\n\r",
    "split_pair.txt": b"ends with cr\r",
    "plain.txt": b"no carriage return\n",
}


def test_text_files_read_newlines_as_text_mode_does(tmp_path):
    for name, data in NEWLINE_FILES.items():
        (tmp_path / name).write_bytes(data)
    docs = sources.text_files(str(tmp_path / "*.txt"), validation_fraction=0.0)
    assert len(docs) == len(NEWLINE_FILES)
    for path, doc in zip(docs.paths, docs, strict=True):
        assert doc == open(path, encoding="utf-8").read(), path
        assert "\r" not in doc
    assert docs[docs.paths.index(str(tmp_path / "crlf_cr.txt"))] == "a\nb\nc\n"


def test_replace_mode_reads_newlines_as_text_mode_does(tmp_path):
    (tmp_path / "pkg").mkdir()
    contents = {
        "pkg/latin1.py": b"# caf\xe9\r\nx = 1\ry = 2\r\n",
        "pkg/crlf.py": b"a = 1\r\nb = 2\r\n",
        "solo.py": b"\r\n\xff\r",
    }
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    corpus = sources.embedded_corpus(root=str(tmp_path), validation_fraction=0.0)
    paths = [p for d in corpus.values() for p in d.paths]
    assert len(paths) == len(contents)
    for docs in corpus.values():
        for path, doc in zip(docs.paths, docs, strict=True):
            assert doc == open(path, encoding="utf-8", errors="replace").read(), path
    direct = sources.FileDocuments(paths, "direct", errors="replace")
    assert [direct[i] for i in range(len(paths))] == [
        open(p, encoding="utf-8", errors="replace").read() for p in paths
    ]


def test_embedded_corpus_files_with_carriage_returns_read_as_in_text_mode():
    checked = []
    for split in sources.SPLITS:
        for docs in sources.embedded_corpus(split).values():
            for i, path in enumerate(docs.paths):
                with open(path, "rb") as f:
                    if b"\r" not in f.read():
                        continue
                assert docs[i] == open(path, encoding="utf-8", errors="replace").read(), path
                checked.append(path)
    if not checked:  # CPython 3.11 has two (lib2to3/tests/data/crlf.py, a tokenizer test)
        pytest.skip("no standard-library file with a carriage return in this build")


@pytest.mark.parametrize(
    "data, line, column, offset",
    [
        (b"one\r\ntwo\r\nthr\xffee\r\n", 3, 4, 13),
        (b"one\rtwo\rthr\xffee\r", 3, 4, 11),
        (b"one\r\n\rthr\xffee", 3, 4, 9),
        (b"one\r\xff", 2, 1, 4),
    ],
)
def test_utf8_errors_count_lines_as_text_mode_and_bytes_in_the_file(
    tmp_path, data, line, column, offset
):
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    assert data[offset] == 0xFF
    assert (
        open(path, encoding="utf-8", errors="replace").read().split("\n")[line - 1][column - 1]
        == "\ufffd"
    )
    message = (
        rf"bad.txt: not valid UTF-8: byte 0xff at line {line}, column {column} "
        rf"\(byte offset {offset}\)"
    )
    with pytest.raises(ValueError, match=message):
        sources.text_files(str(tmp_path / "*.txt"), validation_fraction=0.0)


def test_split_key_of_a_pattern_wild_from_its_first_component():
    # "/*.jsonl": the root is "/" whatever the working directory; a relative one's is ".".
    assert sources.split_key("/data.jsonl", "/*.jsonl", 3) == "data.jsonl:3"
    assert sources.split_key("a/b.txt", "*/b.txt") == os.path.join("a", "b.txt")
