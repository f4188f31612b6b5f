"""Tokenizers behind one interface: bytes (the default), characters, SentencePiece and Hugging Face.

All of them encode without special tokens unless asked (`add_bos`, `add_eos`), decode a list of
ids or a 1-D integer array, skip their pad/bos/eos ids when decoding, and reject ids outside
`[0, vocab_size)`. `load_tokenizer` picks one from a string spec (None, "byte", "reasoning" or a
path).
`add_special_tokens` (or `Tokenizer.with_special_tokens`) wraps any of them with extra tokens, such
as ChatML's `<|im_start|>` and `<|im_end|>`, that each encode as one id.
The SentencePiece and Hugging Face packages are imported only when such a tokenizer is built.
"""

from __future__ import annotations

import abc
import json
import os
import re
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

    def with_special_tokens(self, tokens: Sequence[str]) -> SpecialTokensTokenizer:
        """This tokenizer with `tokens` added as special tokens; see `add_special_tokens`."""
        return add_special_tokens(self, tokens)

    def _special_piece_id(self, token: str) -> int | None:
        """The id of `token` if the vocabulary already holds it as one special piece."""
        del token
        return None

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


class CharTokenizer(Tokenizer):
    """One id per character of a fixed alphabet: pad=0, bos=1, eos=2, then ``alphabet[i]`` is
    ``i + 3``; needs no files. For synthetic tasks whose text uses a few symbols
    (:mod:`jaxlab.data.reasoning`), where a small vocabulary keeps every id trained.

    Encoding a character outside the alphabet raises a ValueError naming it and its position.
    """

    def __init__(self, alphabet: str) -> None:
        if not isinstance(alphabet, str) or not alphabet:
            raise ValueError(f"alphabet must be a non-empty str, got {alphabet!r}")
        repeated = sorted({c for c in alphabet if alphabet.count(c) > 1})
        if repeated:
            raise ValueError(f"alphabet characters repeat: {repeated}")
        self.alphabet = alphabet
        self._ids = {c: i + 3 for i, c in enumerate(alphabet)}
        super().__init__(vocab_size=len(alphabet) + 3, pad_id=0, bos_id=1, eos_id=2)

    def _encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            position = text.index(e.args[0])
            raise ValueError(
                f"text[{position}] = {e.args[0]!r} is not in this CharTokenizer's alphabet "
                f"{self.alphabet!r}"
            ) from None

    def _decode(self, ids: list[int]) -> str:
        return "".join(self.alphabet[i - 3] for i in ids)


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

    def _special_piece_id(self, token: str) -> int | None:
        token_id = self._processor.piece_to_id(token)
        if self._processor.id_to_piece(token_id) != token:  # unknown pieces map to unk
            return None
        if self._processor.is_control(token_id):
            return token_id
        from sentencepiece import sentencepiece_model_pb2  # needs protobuf; only here

        proto = sentencepiece_model_pb2.ModelProto.FromString(
            self._processor.serialized_model_proto()
        )
        user_defined = proto.pieces[token_id].type == proto.SentencePiece.USER_DEFINED
        return token_id if user_defined else None

    def _decode(self, ids: list[int]) -> str:
        return self._processor.decode(ids)


def _read_json_object(file: Path) -> tuple[str, dict[str, Any]]:
    """The text and value of a JSON file holding one object; errors name the file, the line and
    the column."""
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"{file}: not valid UTF-8: byte 0x{data[e.start]:02x} at line {line} "
            f"(byte offset {e.start}); expected UTF-8 JSON"
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{file}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return text, value


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
        text, _ = _read_json_object(file)
        try:
            self._tokenizer = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the library raises a bare Exception for every problem
            raise ValueError(
                f"{file}: not a tokenizer the Hugging Face tokenizers library can read: {e}"
            ) from e
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        if not vocab:
            raise ValueError(
                f"{file}: the vocabulary is empty (no tokens in the model or added tokens); "
                "expected a trained tokenizer.json"
            )
        super().__init__(max(vocab.values()) + 1, **self._find_special_ids(file))

    def _find_special_ids(self, file: Path) -> dict[str, int | None]:
        named: dict[str, tuple[Any, Path]] = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            config_file = file.with_name(name)
            if config_file.is_file():
                _, config = _read_json_object(config_file)
                for key in _COMMON_SPECIAL_TOKENS.keys() & config.keys():
                    named.setdefault(key, (config[key], config_file))
        ids = {}
        for key, common_names in _COMMON_SPECIAL_TOKENS.items():
            if key in named:
                value, config_file = named[key]
                token = value.get("content") if isinstance(value, dict) else value
                if token is not None and not isinstance(token, str):
                    raise ValueError(
                        f"{key} in {config_file} must be a token string, null or an object with "
                        f'a string "content", got {value!r}'
                    )
                token_id = None if token is None else self._tokenizer.token_to_id(token)
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

    def _special_piece_id(self, token: str) -> int | None:
        added = self._tokenizer.get_added_tokens_decoder()
        return next((i for i, t in added.items() if t.content == token), None)

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)


class SpecialTokensTokenizer(Tokenizer):
    """A tokenizer with added special tokens, each encoded as one id.

    Made by `add_special_tokens`. Text is first split on the special tokens (longest first, so a
    token that contains another wins); the pieces between them are encoded by the base tokenizer
    one by one, as Hugging Face does for added tokens, so a SentencePiece model starts each piece
    afresh (with its dummy prefix). A token the base vocabulary already holds as one special
    piece (a SentencePiece control or user-defined piece, a Hugging Face added token) keeps that
    id; every other token gets the next free id after the base vocabulary, in the order given:
    `vocab_size`, `vocab_size + 1`, ... of the base. Decoding maps the ids back to the token
    strings; pad/bos/eos are those of the base and are skipped as usual.

    Attributes:
      base: the wrapped tokenizer.
      special_tokens: {token: id} for the added tokens, in the order they were added.
    """

    def __init__(self, base: Tokenizer, special_tokens: dict[str, int]) -> None:
        self.base = base
        self.special_tokens = dict(special_tokens)
        self._strings = {i: t for t, i in self.special_tokens.items()}
        vocab_size = max([base.vocab_size, *(i + 1 for i in self._strings)])
        super().__init__(vocab_size, pad_id=base.pad_id, bos_id=base.bos_id, eos_id=base.eos_id)
        by_length = sorted(self.special_tokens, key=len, reverse=True)
        self._pattern = re.compile("(" + "|".join(map(re.escape, by_length)) + ")")

    def token_id(self, token: str) -> int:
        """The id of one added special token."""
        if token not in self.special_tokens:
            raise KeyError(
                f"token {token!r} is not one of the added special tokens "
                f"{list(self.special_tokens)}"
            )
        return self.special_tokens[token]

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, piece in enumerate(self._pattern.split(text)):
            if i % 2:  # the split keeps the separators at odd indices
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self.base.encode(piece))
        return ids

    def _decode(self, ids: list[int]) -> str:
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._strings:
                if run:
                    parts.append(self.base.decode(run))
                    run = []
                parts.append(self._strings[i])
            else:
                run.append(i)
        if run:
            parts.append(self.base.decode(run))
        return "".join(parts)


def add_special_tokens(tokenizer: Tokenizer, tokens: Sequence[str]) -> SpecialTokensTokenizer:
    """`tokenizer` with `tokens` added as special tokens that each encode as one id.

    See `SpecialTokensTokenizer` for the ids and how text is split. Adding to a tokenizer that
    already has added tokens keeps their ids and appends the new ones; a token added before is
    kept as it is. The model's vocabulary must then grow to the new `vocab_size`
    (`jaxlab.models.resize.resize_vocabulary`).

    Args:
      tokenizer: any `Tokenizer` (byte, SentencePiece, Hugging Face or one with added tokens).
      tokens: non-empty, distinct strings, e.g. `("<|im_start|>", "<|im_end|>")`.

    Raises:
      TypeError: `tokens` is a single str, or holds a non-str.
      ValueError: a token is empty or repeated.
    """
    if isinstance(tokens, str):
        raise TypeError(f"tokens must be a sequence of str, not a single str: {tokens!r}")
    tokens = list(tokens)
    for i, token in enumerate(tokens):
        if not isinstance(token, str) or not token:
            raise (ValueError if isinstance(token, str) else TypeError)(
                f"tokens[{i}] must be a non-empty str, got {token!r}"
            )
    repeated = sorted({t for t in tokens if tokens.count(t) > 1})
    if repeated:
        raise ValueError(f"tokens repeat: {repeated}")
    if isinstance(tokenizer, SpecialTokensTokenizer):
        base, special = tokenizer.base, dict(tokenizer.special_tokens)
        next_id = tokenizer.vocab_size
    else:
        base, special, next_id = tokenizer, {}, tokenizer.vocab_size
    for token in tokens:
        if token in special:
            continue
        existing = base._special_piece_id(token)
        if existing is not None:
            special[token] = existing
        else:
            special[token], next_id = next_id, next_id + 1
    return SpecialTokensTokenizer(base, special)


def load_tokenizer(spec: str | os.PathLike[str] | None) -> Tokenizer:
    """Builds the tokenizer a spec names.

    Args:
        spec: None or "byte" for `ByteTokenizer`; "reasoning" for the `CharTokenizer` of
            `jaxlab.data.reasoning`'s arithmetic task; a `*.model` file for
            `SentencePieceTokenizer`;
            a `*.json` file (a `tokenizer.json`) for `HFTokenizer`; a directory holding
            `tokenizer.json` (`HFTokenizer`, preferred) or `tokenizer.model` (SentencePiece).

    Raises:
        FileNotFoundError: `spec` is a path that does not exist.
        ValueError: `spec` is a file or directory that fits none of the cases above.
    """
    if spec is None or spec == "byte":
        return ByteTokenizer()
    if spec == "reasoning":
        from jaxlab.data import reasoning  # imported here: it imports this module

        return reasoning.tokenizer()
    path = Path(spec)
    expected = (
        'None, "byte", "reasoning", a *.model or tokenizer.json file, or a directory holding '
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
