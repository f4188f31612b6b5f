"""Tokenizers behind one interface: bytes (the default), SentencePiece and Hugging Face.

All three encode without special tokens unless asked (`add_bos`, `add_eos`), decode a list of
ids or a 1-D integer array, skip their pad/bos/eos ids when decoding, and reject ids outside
`[0, vocab_size)`. `load_tokenizer` picks one from a string spec (None, "byte" or a path).
The SentencePiece and Hugging Face packages are imported only when such a tokenizer is built.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Names tried, in order, when a tokenizer.json has no config beside it naming its special tokens.
_COMMON_SPECIAL_TOKENS = {
    "bos_token": ("<s>", "<|begin_of_text|>", "<bos>"),
    "eos_token": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"),
    "pad_token": ("<pad>", "<|pad|>"),
}


class Tokenizer(abc.ABC):
    """Text to integer ids and back.

    Subclasses set the vocabulary size and special ids in `__init__` and implement `_encode` and
    `_decode`; validation, bos/eos handling and skipping of special ids live here.
    """

    def __init__(
        self, vocab_size: int, pad_id: int | None, bos_id: int | None, eos_id: int | None
    ) -> None:
        self._vocab_size = vocab_size
        self._pad_id = pad_id
        self._bos_id = bos_id
        self._eos_id = eos_id

    @property
    def vocab_size(self) -> int:
        """Number of ids: every id this tokenizer produces or accepts lies in [0, vocab_size)."""
        return self._vocab_size

    @property
    def pad_id(self) -> int | None:
        """Padding id, or None when the tokenizer has none."""
        return self._pad_id

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None when the tokenizer has none."""
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id, or None when the tokenizer has none."""
        return self._eos_id

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Encodes one string.

        Args:
            text: the string to encode.
            add_bos: prepend `bos_id`.
            add_eos: append `eos_id`.

        Returns:
            The ids, without special tokens other than those asked for.

        Raises:
            TypeError: `text` is not a str.
            ValueError: `add_bos`/`add_eos` is set but the tokenizer has no such id.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}: {text!r:.80}")
        return self._with_bos_eos(self._encode(text), add_bos, add_eos)

    def encode_batch(
        self, texts: Iterable[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """Encodes several strings; same arguments and result per string as `encode`."""
        if isinstance(texts, str):
            raise TypeError(f"texts must be an iterable of str, not a single str: {texts!r:.80}")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
        return [self._with_bos_eos(ids, add_bos, add_eos) for ids in self._encode_batch(texts)]

    def decode(self, ids: Sequence[int] | np.ndarray | Any) -> str:
        """Decodes ids to a string, skipping the pad, bos and eos ids.

        Args:
            ids: [length] a list of ints or a 1-D integer NumPy or JAX array.

        Raises:
            TypeError: `ids` are not integers.
            ValueError: `ids` is not 1-D or holds an id outside [0, vocab_size).
        """
        array = np.asarray(ids)
        if array.size == 0:
            return ""
        if array.ndim != 1:
            raise ValueError(f"ids must be 1-D ([length]), got shape {array.shape}")
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"ids must be integers, got dtype {array.dtype}")
        bad = (array < 0) | (array >= self.vocab_size)
        if bad.any():
            position = int(np.argmax(bad))
            raise ValueError(
                f"ids[{position}] = {int(array[position])} is outside [0, {self.vocab_size}), "
                f"the range of valid ids for this {type(self).__name__}"
            )
        special = {self.pad_id, self.bos_id, self.eos_id}
        return self._decode([i for i in array.tolist() if i not in special])

    def _with_bos_eos(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos and self.bos_id is None:
            raise ValueError(f"add_bos=True but this {type(self).__name__} has no bos id")
        if add_eos and self.eos_id is None:
            raise ValueError(f"add_eos=True but this {type(self).__name__} has no eos id")
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._encode(text) for text in texts]

    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]:
        """Ids of `text` without any special tokens."""

    @abc.abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Text of ids that are in range and not pad/bos/eos."""


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then pad=256, bos=257, eos=258; needs no files.

    Decoding replaces invalid UTF-8 (for example a sequence cut inside a character) with U+FFFD.
    """

    def __init__(self) -> None:
        super().__init__(vocab_size=259, pad_id=256, bos_id=257, eos_id=258)

    def _encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file (`*.model`), such as Llama 2's `tokenizer.model`.

    The special ids come from the model; one that the model disables (-1) is None.
    """

    def __init__(self, model_file: str | os.PathLike[str]) -> None:
        import sentencepiece

        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"model_file must be a SentencePiece model file: {model_file}")
        self._processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        pad, bos, eos = (
            None if i < 0 else i
            for i in (self._processor.pad_id(), self._processor.bos_id(), self._processor.eos_id())
        )
        super().__init__(self._processor.vocab_size(), pad_id=pad, bos_id=bos, eos_id=eos)

    def _encode(self, text: str) -> list[int]:
        return self._processor.encode(text, out_type=int)

    def _decode(self, ids: list[int]) -> str:
        return self._processor.decode(ids)


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, read with the `tokenizers` package.

    The bos/eos/pad tokens are those that `tokenizer_config.json` names beside the file (keys
    `bos_token`, `eos_token`, `pad_token`; a string or a dict with "content"; null for none),
    with `special_tokens_map.json` filling keys the config lacks. A key neither file has is
    looked up by common names (`<s>`, `</s>`, `<|begin_of_text|>`, `<|endoftext|>`, `<pad>`, ...).
    The tokenizer's own post-processor is not used: bos/eos come only from `add_bos`/`add_eos`.
    `vocab_size` is one more than the largest id, added tokens included.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import tokenizers

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"path must be a tokenizer.json file or a directory holding one, got {path}"
            )
        self._tokenizer = tokenizers.Tokenizer.from_file(str(file))
        vocab_size = max(self._tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        super().__init__(vocab_size, **self._find_special_ids(file))

    def _find_special_ids(self, file: Path) -> dict[str, int | None]:
        named: dict[str, tuple[Any, Path]] = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            config_file = file.with_name(name)
            if config_file.is_file():
                config = json.loads(config_file.read_text(encoding="utf-8"))
                for key in _COMMON_SPECIAL_TOKENS.keys() & config.keys():
                    named.setdefault(key, (config[key], config_file))
        ids = {}
        for key, common_names in _COMMON_SPECIAL_TOKENS.items():
            if key in named:
                token, config_file = named[key]
                token = token.get("content") if isinstance(token, dict) else token
                token_id = None if token is None else self._tokenizer.token_to_id(str(token))
                if token is not None and token_id is None:
                    raise ValueError(
                        f"{key} in {config_file} must name a token in {file}, got {token!r}"
                    )
            else:
                found = (self._tokenizer.token_to_id(name) for name in common_names)
                token_id = next((i for i in found if i is not None), None)
            ids[key.removesuffix("_token") + "_id"] = token_id
        return ids

    def _encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)


def load_tokenizer(spec: str | os.PathLike[str] | None) -> Tokenizer:
    """Builds the tokenizer a spec names.

    Args:
        spec: None or "byte" for `ByteTokenizer`; a `*.model` file for `SentencePieceTokenizer`;
            a `*.json` file (a `tokenizer.json`) for `HFTokenizer`; a directory holding
            `tokenizer.json` (`HFTokenizer`, preferred) or `tokenizer.model` (SentencePiece).

    Raises:
        FileNotFoundError: `spec` is a path that does not exist.
        ValueError: `spec` is a file or directory that fits none of the cases above.
    """
    if spec is None or spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    expected = (
        'None, "byte", a *.model or tokenizer.json file, or a directory holding '
        "tokenizer.json or tokenizer.model"
    )
    if not path.exists():
        raise FileNotFoundError(f"tokenizer spec {str(spec)!r} does not exist; expected {expected}")
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HFTokenizer(path)
        if (path / "tokenizer.model").is_file():
            return SentencePieceTokenizer(path / "tokenizer.model")
    elif path.suffix == ".model":
        return SentencePieceTokenizer(path)
    elif path.suffix == ".json":
        return HFTokenizer(path)
    raise ValueError(f"tokenizer spec {str(spec)!r} fits no tokenizer; expected {expected}")
