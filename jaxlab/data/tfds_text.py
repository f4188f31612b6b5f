"""Local text and JSONL files as a TFDS array_record dataset, and TFDS text read by random access.

`build_text_dataset` (or the `LocalText` builder behind it) turns text files (one document per
file) and `.jsonl` files (one document per line, taken from one field) into a TFDS dataset in the
array_record format with one `text` feature and two splits, `train` and `validation`. Everything
happens offline and without TensorFlow: TFDS's `GeneratorBasedBuilder` writes array_record files
through the `array_record` package, and nothing is downloaded.

A document goes to `validation` when the first 8 bytes of the SHA-256 of its UTF-8 text, read as
a big-endian integer and divided by 2**64, fall below `validation_fraction`. The assignment
depends only on the text, so it is the same on every machine and for any order of the inputs,
and copies of one document always land in the same split (no train/validation leakage).
Alternatively `validation_inputs` names the validation files explicitly.

`tfds_text_source` opens any TFDS dataset stored as array_record (by name and `data_dir`, or by
directory) and returns a random-access sequence of `str` documents that grain can read directly
(`grain.MapDataset.source(...)`). Reading goes through the files' own metadata
(`dataset_info.json`, `features.json`) only: no dataset code is imported or executed.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder

from jaxlab.data import sources

logger = logging.getLogger(__name__)

_VERSION = "1.0.0"
_JSONL_SUFFIX = ".jsonl"
_GLOB_CHARS = re.compile(r"[*?\[]")
# TFDS writes files named `{name}-{split}.array_record-...`, so names are snake_case.
_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")
_SPLITS = ("train", "validation")


def _expand_inputs(
    argument: str, inputs: str | os.PathLike | Sequence[str | os.PathLike]
) -> list[str]:
    """Expands paths and globs into a list of absolute file paths, in the order given.

    Each glob expands to its matches in sorted order. A pattern with no match, a path that is
    not a file, or a file named twice is an error naming `argument`.
    """
    if isinstance(inputs, str | os.PathLike):
        entries = [inputs]
    elif isinstance(inputs, Sequence) and all(isinstance(e, str | os.PathLike) for e in inputs):
        entries = list(inputs)
    else:
        raise TypeError(
            f"{argument} must be a path or glob (str), or a list of them; got {inputs!r}."
        )
    if not entries:
        raise ValueError(f"{argument} must name at least one file or glob; got an empty list.")
    files: list[str] = []
    for entry in entries:
        entry = os.fspath(entry)
        if _GLOB_CHARS.search(entry):
            matches = sorted(m for m in glob.glob(entry, recursive=True) if os.path.isfile(m))
            if not matches:
                raise FileNotFoundError(f"{argument}: the glob {entry!r} matches no files.")
            files.extend(matches)
        elif os.path.isdir(entry):
            raise IsADirectoryError(
                f"{argument}: expected a file or a glob, got the directory {entry!r} "
                f"(use a glob such as {os.path.join(entry, '**', '*.txt')!r})."
            )
        elif not os.path.isfile(entry):
            raise FileNotFoundError(f"{argument}: no such file {entry!r}.")
        else:
            files.append(entry)
    absolute = [os.path.abspath(f) for f in files]
    seen: set[str] = set()
    for path in absolute:
        if path in seen:
            raise ValueError(f"{argument}: the file {path!r} is named more than once.")
        seen.add(path)
    return absolute


def _encode(text: str, path: str, where: str) -> bytes:
    """UTF-8 of a JSON string; lone surrogates (`"\\ud800"` in JSON) are an error."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{path}{where}: the text cannot be encoded as UTF-8 ({e}).") from e


def _read_documents(path: str, text_field: str) -> Iterator[tuple[int, bytes]]:
    """Yields `(line_number, utf8_text)` for each document of one input file.

    A `.jsonl` file gives one document per non-blank line (lines end at `\n` only; numbers
    from 1), taken from the string field `text_field`; any other file is one document (line
    number 0), its whole content, which must be UTF-8, kept byte for byte.
    """
    if not path.endswith(_JSONL_SUFFIX):
        with open(path, "rb") as f:
            data = f.read()
        sources.decode_utf8(data, path)  # raises naming the line, column and byte offset
        yield 0, data
        return
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            where = f", line {line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}{where}: expected UTF-8 ({e}).") from e
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:  # its line/column count restarts at this line
                raise ValueError(
                    f"{path}{where}: invalid JSON: {e.msg} at column {e.colno}; expected one "
                    "JSON object per line."
                ) from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}{where}: expected a JSON object, got {type(record).__name__}."
                )
            if text_field not in record:
                raise ValueError(
                    f"{path}{where}: the JSON object has no field {text_field!r} "
                    f"(text_field={text_field!r}); its fields are {sorted(record)}."
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}{where}: field {text_field!r} must be a string, "
                    f"got {type(text).__name__}."
                )
            yield line_number, _encode(text, path, where)


def _hash_fraction(text: bytes) -> float:
    """Maps a document to [0, 1) by its SHA-256: the split assignment."""
    digest = hashlib.sha256(text).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class LocalText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder: local text and JSONL files -> array_record dataset with a `text` feature.

    The builder is not added to TFDS's registry (importing this module changes no global state);
    the dataset it writes is read back from its files by `tfds.builder_from_directory`,
    `tfds.data_source(name, data_dir=...)` or `tfds_text_source`.

    Example:
        builder = LocalText("corpus/*.jsonl", data_dir="/tmp/tfds", validation_fraction=0.05)
        builder.download_and_prepare()
        source = builder.as_data_source("train")  # records {"text": bytes}
    """

    VERSION = tfds.core.Version(_VERSION)
    RELEASE_NOTES = {_VERSION: "Local text and JSONL files, split by a hash of the text."}
    # TFDS looks for download checksums (`checksums.tsv`) beside the builder's module through
    # `code_path`; this builder downloads nothing, so it has none. Without this, TFDS 4.9.10's
    # `code_path` fails for a builder inside an installed package: it needs the
    # `importlib_resources` backport, which TFDS only requires on Python < 3.9.
    code_path = None

    def __init__(
        self,
        inputs: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        data_dir: str | os.PathLike,
        name: str = "local_text",
        text_field: str = "text",
        validation_fraction: float = 0.01,
        validation_inputs: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    ) -> None:
        """Names the inputs; nothing is read before `download_and_prepare`.

        Args:
            inputs: a path or glob (`**` recursive), or a list of them. Files ending in `.jsonl`
                hold one JSON object per line; any other file is one UTF-8 document.
            data_dir: root directory; the dataset goes to `data_dir/name/1.0.0`.
            name: dataset name, snake_case (`[a-z][a-z0-9_]*`).
            text_field: the field of each JSONL object that holds the document.
            validation_fraction: in [0, 1): the expected share of documents assigned to
                `validation` by their hash. 0 writes only a `train` split. Not used when
                `validation_inputs` is given.
            validation_inputs: files or globs that form the `validation` split; all of `inputs`
                then go to `train`.
        """
        if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
            raise ValueError(f"name must match [a-z][a-z0-9_]* (snake_case); got {name!r}.")
        if not isinstance(text_field, str) or not text_field:
            raise ValueError(f"text_field must be a non-empty string; got {text_field!r}.")
        if isinstance(validation_fraction, bool) or not isinstance(
            validation_fraction, int | float
        ):
            raise TypeError(
                f"validation_fraction must be a number in [0, 1); got {validation_fraction!r}."
            )
        if not 0.0 <= validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1); got {validation_fraction!r}.")
        if data_dir is None:
            raise ValueError("data_dir must name the directory to write the dataset into.")
        self._inputs = _expand_inputs("inputs", inputs)
        self._validation_inputs = (
            None
            if validation_inputs is None
            else _expand_inputs("validation_inputs", validation_inputs)
        )
        if self._validation_inputs is not None:
            shared = sorted(set(self._inputs) & set(self._validation_inputs))
            if shared:
                raise ValueError(
                    f"inputs and validation_inputs must not share files; both name {shared[:5]}."
                )
        self._text_field = text_field
        self._validation_fraction = float(validation_fraction)
        # `name` is a class attribute in TFDS; an instance attribute lets one class write
        # datasets under any name without registering a class per name.
        self.name = name
        super().__init__(data_dir=os.fspath(data_dir), file_format="array_record")
        # DatasetBuilder pickles as `_original_state` and unpickles by calling `__init__` on it.
        self._original_state = dict(
            inputs=self._inputs,
            data_dir=os.fspath(data_dir),
            name=name,
            text_field=text_field,
            validation_fraction=validation_fraction,
            validation_inputs=self._validation_inputs,
        )

    def _info(self) -> tfds.core.DatasetInfo:
        # `DatasetInfo` directly, not `dataset_info_from_configs`, which reads metadata files
        # from the directory of this module.
        if self._validation_inputs is None:
            how = f"validation: documents whose SHA-256 fraction < {self._validation_fraction}"
        else:
            how = f"validation: {len(self._validation_inputs)} separate files"
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                f"Documents from {len(self._inputs)} local text/JSONL files "
                f"(JSONL field {self._text_field!r}); {how}."
            ),
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        )

    def _documents(self, split: str) -> Iterator[tuple[str, bytes]]:
        """Yields `(key, utf8_text)` for the documents of `split` in input order."""
        if self._validation_inputs is not None:
            files = self._inputs if split == "train" else self._validation_inputs
            for file_index, path in enumerate(files):
                for line_number, text in _read_documents(path, self._text_field):
                    yield f"{split[0]}{file_index:06d}-{line_number:09d}", text
            return
        for file_index, path in enumerate(self._inputs):
            for line_number, text in _read_documents(path, self._text_field):
                in_validation = _hash_fraction(text) < self._validation_fraction
                if in_validation == (split == "validation"):
                    yield f"{file_index:06d}-{line_number:09d}", text

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, Any]]]:
        del dl_manager  # Nothing is downloaded.
        # One pass first: it raises on bad input before any file is written and counts the
        # splits, since TFDS cannot write an empty split.
        counts = {split: 0 for split in _SPLITS}
        if self._validation_inputs is None:
            for path in self._inputs:
                for _, text in _read_documents(path, self._text_field):
                    in_validation = _hash_fraction(text) < self._validation_fraction
                    counts["validation" if in_validation else "train"] += 1
        else:
            for split in _SPLITS:
                counts[split] = sum(1 for _ in self._documents(split))
        total = sum(counts.values())
        if total == 0:
            raise ValueError(f"inputs hold no documents (files: {self._inputs[:5]}...).")
        for split in _SPLITS:
            if counts[split] == 0 and not (
                split == "validation" and self._validation_fraction == 0.0
            ):
                hint = (
                    f"the {'inputs' if split == 'train' else 'validation_inputs'} hold no documents"
                    if self._validation_inputs is not None
                    else f"{total} documents with validation_fraction="
                    f"{self._validation_fraction}; change validation_fraction or pass "
                    "validation_inputs"
                )
                raise ValueError(f"The {split!r} split would be empty: {hint}.")
        return {split: self._generate_examples(split) for split in _SPLITS if counts[split] > 0}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        for key, text in self._documents(split):
            yield key, {"text": text}

    # TFDS prints these two messages to stdout; a library logs them instead.
    def _log_download_bytes(self) -> None:
        logger.info("Preparing dataset %s in %s", self.name, self.data_dir)

    def _log_download_done(self) -> None:
        logger.info("Dataset %s prepared in %s", self.name, self.data_dir)


def build_text_dataset(
    inputs: str | list[str],
    data_dir: str,
    *,
    name: str = "local_text",
    text_field: str = "text",
    validation_fraction: float = 0.01,
    validation_inputs: str | list[str] | None = None,
    overwrite: bool = False,
) -> str:
    """Writes local text/JSONL files as an array_record TFDS dataset, offline.

    Args:
        inputs: a path or glob (`**` recursive), or a list of them. Files ending in `.jsonl` hold
            one JSON object per line (blank lines skipped) with the document in `text_field`;
            any other file is one UTF-8 document, kept byte for byte.
        data_dir: root directory of TFDS datasets; the dataset goes to `data_dir/name/1.0.0`.
        name: dataset name, snake_case.
        text_field: the JSONL field holding the document; a line without it is an error naming
            the file and line.
        validation_fraction: in [0, 1): expected share of documents in `validation`, assigned by
            a hash of the text (deterministic). 0 writes only `train`. Not used when
            `validation_inputs` is given.
        validation_inputs: files or globs forming the `validation` split instead; all of `inputs`
            then go to `train`.
        overwrite: replace an existing dataset at that place; otherwise that is an error.

    Returns:
        The dataset directory (`data_dir/name/1.0.0`), readable by `tfds_text_source`,
        `tfds.builder_from_directory` and `tfds.data_source(name, data_dir=data_dir)`.
    """
    builder = LocalText(
        inputs,
        data_dir=data_dir,
        name=name,
        text_field=text_field,
        validation_fraction=validation_fraction,
        validation_inputs=validation_inputs,
    )
    # Checked here because TFDS would silently reuse whatever the directory holds.
    if os.path.exists(builder.data_dir) and not overwrite:
        raise FileExistsError(
            f"A dataset already exists at {os.fspath(builder.data_dir)!r}; pass overwrite=True "
            "to replace it, or choose another name or data_dir."
        )
    mode = (
        tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
        if overwrite
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    config = tfds.download.DownloadConfig(try_download_gcs=False, download_mode=mode)
    # TFDS makes a download directory even when nothing is downloaded; keep it out of data_dir.
    with tempfile.TemporaryDirectory(prefix="jaxlab_tfds_") as download_dir:
        builder.download_and_prepare(download_dir=download_dir, download_config=config)
    return os.fspath(builder.data_dir)


class TFDSTextSource(Sequence[str]):
    """Random-access documents (`str`) of one split of an array_record TFDS dataset.

    Supports `len()`, integer indexing (negative too) and batched reads; picklable, so grain can
    use it in worker processes: `grain.MapDataset.source(source)`.
    """

    def __init__(self, data_source: Any, text_field: str, description: str) -> None:
        self._data_source = data_source
        self._text_field = text_field
        self._description = description

    def __len__(self) -> int:
        return len(self._data_source)

    def _index(self, index: Any) -> int:
        if isinstance(index, bool | np.bool_) or not hasattr(index, "__index__"):
            raise TypeError(f"index must be an integer; got {index!r}.")
        i = index.__index__()
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for {n} documents ({self._description}).")
        return i + n if i < 0 else i

    def _decode(self, record: Any) -> str:
        value = record[self._text_field]
        if isinstance(value, np.ndarray) and value.shape == ():
            value = value.item()
        if isinstance(value, bytes):
            return value.decode("utf-8")
        if isinstance(value, str):
            return value
        raise TypeError(
            f"feature {self._text_field!r} of {self._description} holds "
            f"{type(value).__name__}, expected text."
        )

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.__getitems__(range(*index.indices(len(self))))
        return self._decode(self._data_source[self._index(index)])

    def __getitems__(self, indices: Sequence[int]) -> list[str]:
        """Reads several documents in one batched array_record read."""
        keys = [self._index(i) for i in indices]
        if not keys:
            return []
        return [self._decode(r) for r in self._data_source.__getitems__(keys)]

    # grain's name for batched reads (`SupportsBatchedReadRandomAccessDataSource`).
    _getitems = __getitems__

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"TFDSTextSource({self._description}, {len(self)} documents)"


def _split_names(split: str) -> list[str]:
    """Base split names of a TFDS split expression (`'train[:10%]+validation'`)."""
    return [part.split("[", 1)[0].strip() for part in split.split("+")]


def tfds_text_source(
    name_or_dir: str,
    split: str,
    *,
    data_dir: str | None = None,
    text_field: str = "text",
) -> TFDSTextSource:
    """Opens one split of an array_record TFDS dataset as a sequence of `str` documents.

    Args:
        name_or_dir: a dataset directory (the one holding `dataset_info.json`, such as the
            return value of `build_text_dataset`, or its parent holding version directories,
            the latest of which is used), or a TFDS name (`name`, `name/config`, `name:1.0.0`)
            looked up under `data_dir`. With `data_dir` given it is always a name.
        split: a split of the dataset, TFDS slicing allowed (`'train'`, `'train[:90%]'`,
            `'train+validation'`).
        data_dir: root of TFDS datasets for a name; None means TFDS's default
            (`~/tensorflow_datasets` or `$TFDS_DATA_DIR`).
        text_field: the feature holding the text; a scalar `Text` or string feature.

    Returns:
        A `TFDSTextSource`: `len()` documents, `source[i]` is a `str`; the order is the one TFDS
        wrote (deterministic).
    """
    if not isinstance(name_or_dir, str | os.PathLike) or not os.fspath(name_or_dir):
        raise ValueError(f"name_or_dir must be a dataset name or directory; got {name_or_dir!r}.")
    name_or_dir = os.fspath(name_or_dir)
    if data_dir is None and os.path.isdir(name_or_dir):
        directory = name_or_dir
        if not os.path.isfile(os.path.join(directory, "dataset_info.json")):
            versions = []
            for entry in os.listdir(directory):
                candidate = os.path.join(directory, entry)
                if tfds.core.Version.is_valid(entry) and os.path.isfile(
                    os.path.join(candidate, "dataset_info.json")
                ):
                    versions.append(tfds.core.Version(entry))
            if not versions:
                raise FileNotFoundError(
                    f"name_or_dir {directory!r} is not a TFDS dataset directory: it has no "
                    "dataset_info.json and no version directory (such as 1.0.0/) holding one."
                )
            directory = os.path.join(directory, str(max(versions)))
        where = directory
        try:
            builder = tfds.builder_from_directory(directory)
        except Exception as e:
            raise FileNotFoundError(f"Could not open the TFDS dataset in {directory!r}: {e}") from e
    else:
        where = f"{name_or_dir!r} under data_dir={data_dir!r}"
        if data_dir is not None and not os.path.isdir(data_dir):
            raise FileNotFoundError(f"data_dir {data_dir!r} is not a directory.")
        try:
            # Reads the dataset's own files; never imports dataset code or downloads.
            builder = read_only_builder.builder_from_files(name_or_dir, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise FileNotFoundError(
                f"No prepared TFDS dataset {name_or_dir!r} found under data_dir={data_dir!r} "
                f"(searched {tfds.core.utils.file_utils.list_data_dirs(data_dir)}). Build one with "
                "build_text_dataset, or pass the dataset directory as name_or_dir."
            ) from e
        except ValueError as e:
            reason = str(e).splitlines()[0]
            raise FileNotFoundError(
                f"name_or_dir {name_or_dir!r} is neither an existing directory nor a prepared "
                f"TFDS dataset name (dataset[/config][:version]) under data_dir={data_dir!r}: "
                f"{reason}"
            ) from e
    available = sorted(builder.info.splits.keys())
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a split name such as 'train'; got {split!r}.")
    unknown = [s for s in _split_names(split) if s not in available and s != "all"]
    if unknown:
        raise ValueError(
            f"split {split!r}: unknown split {unknown[0]!r} for the dataset {where}; "
            f"available splits: {available}."
        )
    features = builder.info.features
    if text_field not in features:
        raise ValueError(
            f"text_field {text_field!r} is not a feature of the dataset {where}; "
            f"its features are {sorted(features.keys())}."
        )
    feature = features[text_field]
    shape, dtype = getattr(feature, "shape", None), getattr(feature, "np_dtype", None)
    if not (shape == () and isinstance(dtype, np.dtype) and dtype == np.dtype(object)):
        raise ValueError(
            f"text_field {text_field!r} of the dataset {where} must be a scalar text feature; "
            f"it is {type(feature).__name__} with shape {shape} and dtype {dtype}."
        )
    try:
        data_source = builder.as_data_source(split)
    except NotImplementedError as e:
        raise ValueError(
            f"The dataset {where} is stored as {builder.info.file_format}, which has no random "
            "access; prepare it with file_format='array_record'."
        ) from e
    return TFDSTextSource(
        data_source, text_field, f"{builder.info.full_name} split {split!r} in {builder.data_dir}"
    )
