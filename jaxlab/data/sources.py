"""Document sources: random-access sequences of ``str`` documents.

* :func:`embedded_corpus`: the running interpreter's standard-library ``.py`` sources (about
  30 MB of real text on CPython 3.11), split into domains by top-level package (single-file
  modules form the domain ``_modules``), in sorted order, with a deterministic held-out split by
  a hash of each file's relative path. Needs nothing downloaded.
* :func:`text_files`: one document per file matched by a glob.
* :func:`jsonl_documents`: one document per line of JSONL files, from a named text field.

Both split by a hash of :func:`split_key`: the path relative to the glob's fixed part (and the
record's index), so the split is the same wherever the data lies.
* TFDS array_record datasets: :mod:`jaxlab.data.tfds_text`.

Every source is a :class:`Documents` (``len`` and integer indexing), which grain's
``MapDataset.source`` accepts directly.

Text files (:func:`text_files`, :func:`embedded_corpus`) are read as Python's text mode reads
them: ``\\r\\n`` and a lone ``\\r`` become ``\\n`` (universal newlines), so a corpus with Windows
or old Mac line endings gives the same documents as ``open(path, encoding="utf-8").read()``.

Bad text is refused when a source is built, not later in the training loop: text files must be
UTF-8 (an error names the file, line, column and byte offset; the embedded corpus alone replaces
undecodable bytes with U+FFFD, since a few standard-library test files are Latin-1 or KOI8-R on
purpose), and JSONL lines must be UTF-8, valid JSON and hold text that UTF-8 can encode (a lone
surrogate such as ``"\\udcff"`` is valid JSON but no text; the error names the file, line and
field).
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from typing import Any

SPLITS = ("train", "validation")
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class Documents(Sequence[str]):
    """Base class: a named, random-access sequence of documents."""

    name: str = "documents"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} documents)"


def decode_utf8(data: bytes, where: str) -> str:
    """``data`` decoded as UTF-8 (newlines kept as they are), or a ValueError naming ``where``
    and the first bad byte's line, column and byte offset, all counted in the raw ``data``
    (lines end at ``\\n``, ``\\r\\n`` or a lone ``\\r``, as in text mode; the column counts bytes
    from the start of the line, from 1)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start]
        line = before.replace(b"\r\n", b"\n").replace(b"\r", b"\n").count(b"\n") + 1
        column = e.start - (max(before.rfind(b"\n"), before.rfind(b"\r")) + 1) + 1
        raise ValueError(
            f"{where}: not valid UTF-8: byte 0x{data[e.start]:02x} at line {line}, column "
            f"{column} (byte offset {e.start}): {e.reason}; expected UTF-8 text"
        ) from None


def universal_newlines(text: str) -> str:
    """``text`` with ``\\r\\n`` and then each lone ``\\r`` turned into ``\\n``, as Python's text
    mode (``newline=None``) reads a file."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def check_text(text: str, where: str, field: str | None = None) -> str:
    """``text`` if UTF-8 can encode it, else a ValueError naming ``where`` and ``field`` (a
    record's field; None when ``where`` names the value itself, e.g. an argument).

    Only lone surrogates (``"\\ud800"`` .. ``"\\udfff"`` in JSON) fail: JSON and Python
    accept them, but they are no text, and any tokenizer fails on them later.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        what = where if field is None else f"{where}: field {field!r}"
        raise ValueError(
            f"{what} holds a lone surrogate {ascii(text[e.start])} at "
            f"character {e.start}, which is not text and cannot be encoded as UTF-8; expected "
            f"valid Unicode (a surrogate pair, or the character itself)"
        ) from None
    return text


class FileDocuments(Documents):
    """Documents read lazily from files, one per file.

    Args:
      paths: the files.
      name: the source's name.
      errors: ``"strict"``: a file that is not UTF-8 raises a ValueError naming it, the line,
        column and byte offset (counted in the file's bytes); ``"replace"``: undecodable bytes
        become U+FFFD.

    Either way newlines are normalised as in text mode (``\\r\\n`` and lone ``\\r`` become
    ``\\n``), after decoding.
    """

    def __init__(self, paths: Sequence[str], name: str, errors: str = "strict"):
        if errors not in ("strict", "replace"):
            raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
        self.paths = list(paths)
        self.name = name
        self.errors = errors

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return FileDocuments(self.paths[index], self.name, self.errors)
        path = self.paths[index]
        with open(path, "rb") as f:
            data = f.read()
        if self.errors == "replace":
            return universal_newlines(data.decode("utf-8", errors="replace"))
        return universal_newlines(decode_utf8(data, path))

    def check(self) -> None:
        """Reads every file once; raises as indexing would (strict: on the first non-UTF-8)."""
        if self.errors == "strict":
            for i in range(len(self)):
                self[i]

    def sizes(self) -> list[int]:
        """Bytes per document, without reading the files."""
        return [os.path.getsize(p) for p in self.paths]


class ListDocuments(Documents):
    """Documents held in memory."""

    def __init__(self, texts: Sequence[str], name: str):
        self.texts = list(texts)
        self.name = name

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ListDocuments(self.texts[index], self.name)
        return self.texts[index]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def is_validation(key: str, validation_fraction: float) -> bool:
    """Whether the document or record named ``key`` is held out: a hash of the key, so the
    split is the same in every run and every process."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction


def split_key(path: str, pattern: str, record: int | None = None) -> str:
    """The key :func:`is_validation` hashes for ``path`` (and its ``record``-th JSONL record,
    blank lines not counted) matched by the glob
    ``pattern``: the path relative to the directory above the pattern's first wildcard, so a
    dataset moved or copied elsewhere keeps its split."""
    parts = os.path.normpath(pattern).split(os.sep)
    wild = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), None)
    root = os.path.dirname(pattern) if wild is None else os.sep.join(parts[:wild])
    if not root:  # "/*.jsonl" keeps its root "/"; a relative pattern's is the working directory
        root = os.sep if os.path.isabs(pattern) else os.curdir
    key = os.path.relpath(path, root)
    return key if record is None else f"{key}:{record}"


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def embedded_corpus(
    split: str = "train",
    *,
    domains: Sequence[str] | None = None,
    validation_fraction: float = 0.05,
    root: str | None = None,
) -> dict[str, FileDocuments]:
    """The standard-library corpus as ``{domain: documents}``, domains sorted by name.

    Both splits have the same domains; a small domain may have no held-out file.

    Args:
      split: ``"train"`` or ``"validation"``.
      domains: keep only these domains (each must exist); default all.
      validation_fraction: share of files held out, chosen by a hash of the relative path.
      root: the library directory to read; default this interpreter's standard library.
    """
    _check_split(split)
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    root = root or stdlib_root()
    by_domain: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        rel_dir = os.path.relpath(dirpath, root)
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            rel = os.path.normpath(os.path.join(rel_dir, filename))
            domain = "_modules" if rel_dir == "." else rel.split(os.sep)[0]
            files = by_domain.setdefault(domain, [])  # every domain exists in both splits
            if is_validation(rel, validation_fraction) == (split == "validation"):
                files.append(os.path.join(root, rel))
    if not by_domain:
        raise ValueError(f"embedded_corpus: no .py files under {root!r}")
    if domains is not None:
        unknown = sorted(set(domains) - set(by_domain))
        if unknown:
            raise ValueError(
                f"embedded_corpus: unknown domains {unknown}; available: {sorted(by_domain)}"
            )
        by_domain = {d: by_domain[d] for d in domains}
    # A few standard-library test files are deliberately not UTF-8: their bytes become U+FFFD.
    return {
        d: FileDocuments(sorted(paths), d, errors="replace")
        for d, paths in sorted(by_domain.items())
    }


def text_files(
    pattern: str, split: str = "train", *, validation_fraction: float = 0.05
) -> FileDocuments:
    """Files matching ``pattern`` (recursive ``**`` allowed), one document each.

    Every file of the split is read once here, so a file that is not UTF-8 raises now (naming
    the file, line, column and byte offset) rather than when training reaches it.
    """
    _check_split(split)
    paths = sorted(p for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise ValueError(f"text_files: no files match {pattern!r}")
    fraction, held_out = validation_fraction, split == "validation"
    keep = [p for p in paths if is_validation(split_key(p, pattern), fraction) == held_out]
    documents = FileDocuments(keep, name=pattern)
    documents.check()
    return documents


def jsonl_lines(path: str) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for each non-blank line of a JSONL file, ``where = "path:line"``.

    Lines end at ``\\n`` and are numbered from 1. A line that is not UTF-8 or not JSON raises a
    ValueError naming the file and line (and, for UTF-8, the byte offset in the file).
    """
    offset = 0
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, 1):
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{where}: not valid UTF-8: byte 0x{raw[e.start]:02x} at column "
                    f"{e.start + 1} (byte offset {offset + e.start} of the file): {e.reason}; "
                    "expected UTF-8 JSON lines"
                ) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:  # its own line/column count within this line only
                raise ValueError(
                    f"{where}: not valid JSON: {e.msg} at column {e.colno}; expected one JSON "
                    f"object per line, got {line.strip()[:80]!r}"
                ) from None
            yield where, record


def jsonl_documents(
    pattern: str,
    split: str = "train",
    *,
    text_field: str = "text",
    validation_fraction: float = 0.05,
) -> ListDocuments:
    """Lines of JSONL files matching ``pattern``; each line's ``text_field`` is a document.

    Every line of every file is checked (both splits): a line that is not UTF-8 or not JSON, or
    whose text field is missing, not a string or holds a lone surrogate, raises a ValueError
    naming the file, line and field.
    """
    _check_split(split)
    paths = sorted(globlib.glob(pattern, recursive=True))
    if not paths:
        raise ValueError(f"jsonl_documents: no files match {pattern!r}")
    texts = []
    for path in paths:
        for index, (where, record) in enumerate(jsonl_lines(path)):
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{where}: expected an object with a string field {text_field!r}")
            text = check_text(record[text_field], where, text_field)
            key = split_key(path, pattern, index)
            if is_validation(key, validation_fraction) == (split == "validation"):
                texts.append(text)
    return ListDocuments(texts, name=pattern)
