"""Document sources: random-access sequences of ``str`` documents.

* :func:`embedded_corpus`: the running interpreter's standard-library ``.py`` sources (about
  30 MB of real text on CPython 3.11), split into domains by top-level package (single-file
  modules form the domain ``_modules``), in sorted order, with a deterministic held-out split by
  a hash of each file's relative path. Needs nothing downloaded.
* :func:`text_files`: one document per file matched by a glob.
* :func:`jsonl_documents`: one document per line of JSONL files, from a named text field.
* TFDS array_record datasets: :mod:`jaxlab.data.tfds_text`.

Every source is a :class:`Documents` (``len`` and integer indexing), which grain's
``MapDataset.source`` accepts directly.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import sysconfig
from collections.abc import Sequence

SPLITS = ("train", "validation")
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class Documents(Sequence[str]):
    """Base class: a named, random-access sequence of documents."""

    name: str = "documents"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} documents)"


class FileDocuments(Documents):
    """Documents read lazily from files (UTF-8; undecodable bytes become U+FFFD)."""

    def __init__(self, paths: Sequence[str], name: str):
        self.paths = list(paths)
        self.name = name

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return FileDocuments(self.paths[index], self.name)
        with open(self.paths[index], encoding="utf-8", errors="replace") as f:
            return f.read()

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


def _is_validation(key: str, validation_fraction: float) -> bool:
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction


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
            if _is_validation(rel, validation_fraction) == (split == "validation"):
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
    return {d: FileDocuments(sorted(paths), d) for d, paths in sorted(by_domain.items())}


def text_files(
    pattern: str, split: str = "train", *, validation_fraction: float = 0.05
) -> FileDocuments:
    """Files matching ``pattern`` (recursive ``**`` allowed), one document each."""
    _check_split(split)
    paths = sorted(p for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise ValueError(f"text_files: no files match {pattern!r}")
    keep = [p for p in paths if _is_validation(p, validation_fraction) == (split == "validation")]
    return FileDocuments(keep, name=pattern)


def jsonl_documents(
    pattern: str,
    split: str = "train",
    *,
    text_field: str = "text",
    validation_fraction: float = 0.05,
) -> ListDocuments:
    """Lines of JSONL files matching ``pattern``; each line's ``text_field`` is a document."""
    _check_split(split)
    paths = sorted(globlib.glob(pattern, recursive=True))
    if not paths:
        raise ValueError(f"jsonl_documents: no files match {pattern!r}")
    texts = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ValueError(
                        f"{path}:{line_number}: expected an object with a string field "
                        f"{text_field!r}"
                    )
                key = f"{path}:{line_number}"
                if _is_validation(key, validation_fraction) == (split == "validation"):
                    texts.append(record[text_field])
    return ListDocuments(texts, name=pattern)
