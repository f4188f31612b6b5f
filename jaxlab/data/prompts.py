"""Prompt/answer finetuning data: templates, answer-only loss masks, padded or packed batches.

Records. JSONL files (one object per line) or in-memory mappings, with the prompt and the answer
in configurable fields (``prompt_field="question"``, ``answer_field="answer"``) and optionally a
per-record system message (``system_field``) or one fixed ``system`` string for every record.
A file in another released layout is read by a registered reader (``record_format=NAME``,
:data:`RECORD_FORMATS`) into mappings with ``prompt`` and ``answer`` fields: e.g. MedQA's,
MedMCQA's and PubMedQA's train files in MEDITRON's finetuning prompt
(:mod:`jaxlab.eval.medical.finetuning` registers them).

Templates (``template=``):

* ``"none"``: ``[bos] prompt answer [eos]``; the prompt and answer strings are used as they are
  (put any separator in the data). The answer span is the answer's tokens and eos.
* ``"chatml"``: ``[bos] <|im_start|>system\\n{system}<|im_end|>\\n`` (only with a system
  message) ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`` is the prompt;
  ``{answer}<|im_end|>`` is the answer span: the answer and its closing ``<|im_end|>``, at which
  generation stops, so the model must learn to emit it. No eos by default.
* ``"meditron"``: MEDITRON's finetuning format (epfLLM Megatron-LLM
  ``tools/preprocess_instruct_data.py``): each message is
  ``<|im_start|>{role}\\n{text}<|im_end|>\\n`` with roles ``system`` (optional), ``question``
  and ``answer``, each message tokenized on its own; the answer span is the whole answer message
  (header, answer, ``<|im_end|>`` and the final newline), as their role mask gives it. No bos or
  eos by default (their SentencePiece ``tokenize`` adds none).

The ChatML templates need ``<|im_start|>`` and ``<|im_end|>`` to encode as one id each:
``add_special_tokens(tokenizer, CHATML_TOKENS)`` (:mod:`jaxlab.data.tokenizers`), then grow the
model with :func:`jaxlab.models.resize.resize_vocabulary`.

Tokenization. The prompt part and the answer part are encoded separately and concatenated, so the
boundary between them is exact (encoding the joined string could merge tokens across it). With a
SentencePiece model each separately encoded part starts with its dummy-prefix space (``"▁"``),
as Megatron-LLM's per-message encoding does; :func:`encode_prompt` gives the prompt ids a model
continues from at inference, the same as in training.

Loss mask. An example of ``L`` tokens ``t`` gives inputs ``t[:-1]`` and targets ``t[1:]``, and
``loss_mask[i] = 1`` exactly when target ``t[i + 1]`` is an answer token: the train step's
``sum(CE * loss_mask)`` is then the answer-only loss. An example therefore needs at least one
prompt token before its answer (bos or a non-empty prompt), else its first answer token could not
be predicted.

Layouts (``layout=``), each ``{inputs, targets, loss_mask, segment_ids, positions, domain}`` as
``[batch, seq_len]`` int32, the format of :mod:`jaxlab.data.pipeline`:

* ``"padded"``: one example per row, right-padded (MEDITRON pads, it does not pack). An example
  of ``L`` tokens fills ``L - 1`` positions, so it fits when ``L <= seq_len + 1``.
* ``"packed"``: whole examples placed one after another while they fit in ``seq_len + 1`` tokens
  (greedy, in the shuffled order; an example that does not fit starts the next row). Each gets
  its own segment id (1, 2, ...) and positions from 0; segments never attend to each other
  (the model masks by ``segment_ids``) and no loss crosses a boundary.

Padding uses the tokenizer's pad id (0 if it has none), segment id 0, positions from 0 and loss
mask 0. ``domain`` is all 0 (one source).

Too-long examples (``too_long=``): ``"error"`` (default) raises, naming the record;
``"truncate"`` cuts the end of the answer (the closing token included) so the example fits, and
raises if not even one answer token fits after the prompt; ``"skip"`` leaves the record out.

State. :class:`PromptAnswerIterator` is deterministic for a seed; ``get_state()`` is a small
JSON-able dict (the index of the next example in the shuffled, repeated order) and ``set_state``
resumes at exactly the next batch.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from jaxlab.data import sources
from jaxlab.data.pipeline import EXAMPLE_KEYS
from jaxlab.data.tokenizers import Tokenizer
from jaxlab.registry import Registry

TEMPLATES = ("none", "chatml", "meditron")
LAYOUTS = ("padded", "packed")
TOO_LONG = ("error", "truncate", "skip")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
SPLITS = (None, "train", "validation")
# name -> reader(path) -> a list of mappings with "prompt" and "answer" (and optionally "system")
# fields: files in a layout of their own, read by load_records(record_format=NAME) or a qa:
# source's format=NAME. Registered by the code that knows the layout (the data layer imports
# nothing above it).
RECORD_FORMATS: Registry = Registry("record format", field="record_format (a qa: source's format=)")


@dataclasses.dataclass(frozen=True)
class Record:
    """One prompt/answer pair.

    Attributes:
      prompt: the prompt (question) text.
      answer: the answer text.
      system: the system message, or None.
      where: where it came from, for error messages (``path:line`` or ``records[i]``).
    """

    prompt: str
    answer: str
    system: str | None = None
    where: str = "record"


# --------------------------------------------------------------------------------------------
# Records.


def _field(record: Any, field: str, role: str, where: str) -> str:
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        raise ValueError(
            f"{where}: record has no field {field!r} ({role}); its fields are {sorted(record)}"
        )
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(
            f"{where}: field {field!r} ({role}) must be a string, got {type(value).__name__}"
        )
    return sources.check_text(value, where, field)


def _record(
    raw: Any,
    where: str,
    prompt_field: str,
    answer_field: str,
    system_field: str | None,
    system: str | None,
) -> Record:
    prompt = _field(raw, prompt_field, "prompt_field", where)
    answer = _field(raw, answer_field, "answer_field", where)
    if system_field is not None:
        system = _field(raw, system_field, "system_field", where)
    return Record(prompt, answer, system, where)


def load_records(
    path_or_records: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    *,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    system_field: str | None = None,
    system: str | None = None,
    split: str | None = None,
    validation_fraction: float = 0.05,
    record_format: str | None = None,
) -> list[Record]:
    """Reads prompt/answer records.

    Args:
      path_or_records: a JSONL file path or glob (``**`` allowed; files in sorted order, blank
        lines skipped), or a sequence of mappings.
      prompt_field: the field holding the prompt.
      answer_field: the field holding the answer.
      system_field: a field holding each record's system message (overrides ``system``).
      system: one system message for every record.
      split: None keeps every record; ``"train"`` / ``"validation"`` keep those that a hash of
        the record's :func:`jaxlab.data.sources.split_key` (the file's path relative to the
        pattern's fixed part, and the record's index in it) or of ``records[i]`` assigns to
        that split, so a moved dataset splits the same way.
      validation_fraction: the held-out share for ``split``.
      record_format: None (JSONL records), or the name of a reader in :data:`RECORD_FORMATS`
        that turns the file ``path_or_records`` into records (split keys: ``records[i]``).

    Raises:
      ValueError: no file matches, a line is not UTF-8 or not a JSON object, a field is missing,
        not a string or holds a lone surrogate (text UTF-8 cannot encode) (the message names the
        file and line, or the record index, and the field), or the split is unknown. Every
        record is checked, whichever split it falls in.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if system is not None:
        if not isinstance(system, str):
            raise TypeError(f"system must be a string or None, got {type(system).__name__}")
        sources.check_text(system, "load_records: system")
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if record_format is not None:
        if not isinstance(path_or_records, str | os.PathLike):
            raise TypeError(
                f"record_format={record_format!r} reads a file: path_or_records must be a path, "
                f"got {type(path_or_records).__name__}"
            )
        path_or_records = RECORD_FORMATS.get(record_format)(os.fspath(path_or_records))
    fields = dict(
        prompt_field=prompt_field,
        answer_field=answer_field,
        system_field=system_field,
        system=system,
    )

    def keep(key: str) -> bool:
        return split is None or (
            sources.is_validation(key, validation_fraction) == (split == "validation")
        )

    records = []
    if isinstance(path_or_records, str | os.PathLike):
        pattern = os.fspath(path_or_records)
        paths = sorted(p for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))
        if not paths:
            raise ValueError(f"load_records: no files match {pattern!r}")
        for path in paths:
            for index, (where, raw) in enumerate(sources.jsonl_lines(path)):
                record = _record(raw, where, **fields)
                if keep(sources.split_key(path, pattern, index)):
                    records.append(record)
        return records
    if isinstance(path_or_records, Mapping) or not isinstance(path_or_records, Sequence):
        raise TypeError(
            "path_or_records must be a JSONL path or glob, or a sequence of mappings, got "
            f"{type(path_or_records).__name__}"
        )
    for i, raw in enumerate(path_or_records):
        record = _record(raw, f"records[{i}]", **fields)
        if keep(f"records[{i}]"):
            records.append(record)
    return records


# --------------------------------------------------------------------------------------------
# Templates and tokenization.


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")


def segments(
    prompt: str, answer: str | None, *, template: str, system: str | None = None
) -> list[tuple[str, bool]]:
    """The texts an example is made of, each encoded on its own, with whether it is answer.

    With ``answer=None`` only the prompt segments: the text a model continues to generate an
    answer (``"".join`` of their texts; add bos as for training).
    """
    _check_template(template)
    if template == "none":
        parts = [(prompt, False)]
        return parts if answer is None else [*parts, (answer, True)]
    start, end = CHATML_TOKENS
    if template == "chatml":
        text = f"{start}system\n{system}{end}\n" if system is not None else ""
        text += f"{start}user\n{prompt}{end}\n{start}assistant\n"
        return [(text, False)] if answer is None else [(text, False), (f"{answer}{end}", True)]
    # meditron: one message per role, tokenized separately (Megatron-LLM's Encoder.encode).
    parts = [(f"{start}system\n{system}{end}\n", False)] if system is not None else []
    parts.append((f"{start}question\n{prompt}{end}\n", False))
    if answer is None:  # their inference prompt opens the answer message
        return [*parts, (f"{start}answer\n", False)]
    return [*parts, (f"{start}answer\n{answer}{end}\n", True)]


def _flags(tokenizer: Tokenizer, template: str, add_bos: bool | None, add_eos: bool | None):
    if add_bos is None:
        add_bos = template != "meditron" and tokenizer.bos_id is not None
    if add_eos is None:
        add_eos = template == "none" and tokenizer.eos_id is not None
    if add_bos and tokenizer.bos_id is None:
        raise ValueError(f"add_bos=True but this {type(tokenizer).__name__} has no bos id")
    if add_eos and tokenizer.eos_id is None:
        raise ValueError(f"add_eos=True but this {type(tokenizer).__name__} has no eos id")
    return add_bos, add_eos


def check_template_tokens(tokenizer: Tokenizer, template: str) -> None:
    """Raises unless each ChatML marker the template uses encodes as one id."""
    _check_template(template)
    if template == "none":
        return
    for token in CHATML_TOKENS:
        ids = tokenizer.encode(token)
        if len(ids) != 1:
            raise ValueError(
                f"template {template!r} needs {token!r} to encode as one id, but this "
                f"{type(tokenizer).__name__} gives {len(ids)} ids: add it with "
                f"jaxlab.data.tokenizers.add_special_tokens(tokenizer, {CHATML_TOKENS})"
            )


def encode_example(
    record: Record,
    tokenizer: Tokenizer,
    *,
    template: str = "none",
    add_bos: bool | None = None,
    add_eos: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of one record and which of them are answer tokens.

    Args:
      record: the prompt/answer pair.
      tokenizer: the tokenizer (with the ChatML tokens added for the ChatML templates).
      template: one of ``TEMPLATES``.
      add_bos: prepend bos (a prompt token); None: yes if the tokenizer has one, except for
        ``"meditron"``.
      add_eos: append eos (an answer token); None: yes for ``"none"`` if the tokenizer has one.

    Returns:
      ``(tokens [L] int32, is_answer [L] bool)``; answer tokens come after all prompt tokens.
    """
    add_bos, add_eos = _flags(tokenizer, template, add_bos, add_eos)
    ids: list[int] = [tokenizer.bos_id] if add_bos else []
    answer: list[bool] = [False] if add_bos else []
    for text, is_answer in segments(
        record.prompt, record.answer, template=template, system=record.system
    ):
        piece = tokenizer.encode(text)
        ids += piece
        answer += [is_answer] * len(piece)
    if add_eos:
        ids.append(tokenizer.eos_id)
        answer.append(True)
    return np.asarray(ids, np.int32), np.asarray(answer, bool)


def encode_prompt(
    prompt: str,
    tokenizer: Tokenizer,
    *,
    template: str = "none",
    system: str | None = None,
    add_bos: bool | None = None,
) -> list[int]:
    """The ids a model continues to generate an answer: the prompt part of :func:`encode_example`
    (for ``"meditron"`` followed by the answer message's header, as MEDITRON's evaluation
    prompt ends)."""
    add_bos, _ = _flags(tokenizer, template, add_bos, False)
    ids = [tokenizer.bos_id] if add_bos else []
    for text, _ in segments(prompt, None, template=template, system=system):
        ids += tokenizer.encode(text)
    return ids


# --------------------------------------------------------------------------------------------
# Batches.


class PromptAnswerIterator:
    """Batches ``{key: [batch_size, seq_len]}`` of prompt/answer examples (module docstring).

    Examples are read in a shuffled order that is fresh every epoch (``shuffle``, ``seed``) and
    repeat forever (``repeat=True``), or once in record order (evaluation). Without ``repeat``,
    the last batch is filled with empty rows (all padding, loss mask 0) and the next call raises
    ``StopIteration``.
    """

    def __init__(
        self,
        records: Sequence[Record],
        tokenizer: Tokenizer,
        seq_len: int,
        batch_size: int,
        *,
        template: str = "none",
        layout: str = "padded",
        seed: int = 0,
        shuffle: bool = True,
        repeat: bool = True,
        too_long: str = "error",
        add_bos: bool | None = None,
        add_eos: bool | None = None,
    ):
        if len(records) == 0:
            raise ValueError("PromptAnswerIterator: no records")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"PromptAnswerIterator: seq_len must be >= 1, got {seq_len!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"PromptAnswerIterator: batch_size must be >= 1, got {batch_size!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if too_long not in TOO_LONG:
            raise ValueError(f"too_long must be one of {TOO_LONG}, got {too_long!r}")
        check_template_tokens(tokenizer, template)
        _flags(tokenizer, template, add_bos, add_eos)  # fail now, not at the first batch
        self.num_records = len(records)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.layout = layout
        self.repeat = repeat
        self.too_long = too_long
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        dataset = grain.MapDataset.source(list(records))
        if shuffle:
            dataset = dataset.shuffle(seed=seed)
        if repeat:
            dataset = dataset.repeat()
        encode = dict(tokenizer=tokenizer, template=template, add_bos=add_bos, add_eos=add_eos)
        self._examples = dataset.map(lambda r: (r.where, *encode_example(r, **encode)))
        self.next_example = 0  # index into the (shuffled, repeated) order
        self._cache: tuple[int, Any] | None = None  # the example read ahead by packing
        self._placed = False  # whether any example was placed in a row yet

    def _example(self, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Example ``k`` fitted to a row (``too_long``), or None when it is skipped."""
        if self._cache is not None and self._cache[0] == k:
            return self._cache[1]
        where, tokens, answer = self._examples[k]
        window = self.seq_len + 1
        if not answer.any():
            raise ValueError(
                f"{where}: the example has no answer token (an empty answer and no "
                "closing token); nothing to learn from it"
            )
        first = int(np.argmax(answer))
        if first == 0:
            raise ValueError(
                f"{where}: the example starts with its answer, so no position predicts the first "
                "answer token: give a non-empty prompt or a tokenizer with a bos id"
            )
        fitted: tuple[np.ndarray, np.ndarray] | None = (tokens, answer)
        if len(tokens) > window:
            described = (
                f"{where}: the example has {len(tokens)} tokens ({first} prompt + "
                f"{len(tokens) - first} answer)"
            )
            if self.too_long == "skip":
                fitted = None
            elif self.too_long == "truncate" and first < window:
                fitted = (tokens[:window], answer[:window])
            elif self.too_long == "truncate":
                raise ValueError(
                    f"{described}; with seq_len={self.seq_len} even the prompt does not fit "
                    f"with one answer token (needs seq_len >= {first})"
                )
            else:
                raise ValueError(
                    f"{described}, more than seq_len + 1 = {window}; raise seq_len (>= "
                    f"{len(tokens) - 1}) or pass too_long='truncate' or 'skip'"
                )
        self._cache = (k, fitted)
        return fitted

    def _has(self, k: int) -> bool:
        return self.repeat or k < self.num_records

    def _next_row(self) -> dict[str, np.ndarray] | None:
        window = self.seq_len + 1
        tokens = np.full(window, self.pad_id, np.int32)
        segment_ids = np.zeros(window, np.int32)
        positions = np.zeros(window, np.int32)
        answer = np.zeros(window, bool)
        filled = segment = skipped = 0
        while self._has(self.next_example):
            example = self._example(self.next_example)
            if example is None:  # too_long="skip"
                skipped += 1
                if skipped > self.num_records:
                    raise ValueError(
                        f"PromptAnswerIterator: every record is longer than "
                        f"seq_len + 1 = {window} tokens"
                    )
                self.next_example += 1
                continue
            ids, is_answer = example
            n = len(ids)
            if filled + n > window:
                break
            segment += 1
            tokens[filled : filled + n] = ids
            segment_ids[filled : filled + n] = segment
            positions[filled : filled + n] = np.arange(n)
            answer[filled : filled + n] = is_answer
            filled += n
            self.next_example += 1
            self._placed = True
            if self.layout == "padded":
                break
        if segment == 0:
            return None
        positions[filled:] = np.arange(window - filled)
        same = (segment_ids[:-1] == segment_ids[1:]) & (segment_ids[:-1] > 0)
        return dict(
            inputs=tokens[:-1],
            targets=tokens[1:],
            loss_mask=(same & answer[1:]).astype(np.int32),
            segment_ids=segment_ids[:-1],
            positions=positions[:-1],
            domain=np.zeros(self.seq_len, np.int32),
        )

    def _empty_row(self) -> dict[str, np.ndarray]:
        row = {k: np.zeros(self.seq_len, np.int32) for k in EXAMPLE_KEYS}
        row["inputs"][:] = row["targets"][:] = self.pad_id
        row["positions"][:] = np.arange(self.seq_len)
        return row

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        for _ in range(self.batch_size):
            row = self._next_row()
            if row is None:
                if not rows:
                    if self.next_example == self.num_records and not self._placed:
                        raise ValueError(
                            f"PromptAnswerIterator: every record is longer than "
                            f"seq_len + 1 = {self.seq_len + 1} tokens"
                        )
                    raise StopIteration
                row = self._empty_row()
            rows.append(row)
        return {k: np.stack([r[k] for r in rows]) for k in EXAMPLE_KEYS}

    def get_state(self) -> dict[str, Any]:
        return {"next_example": self.next_example, "num_records": self.num_records}

    def set_state(self, state: dict[str, Any]) -> None:
        if int(state["num_records"]) != self.num_records:
            raise ValueError(
                f"PromptAnswerIterator.set_state: the state is for {state['num_records']} "
                f"records, this iterator has {self.num_records}"
            )
        self.next_example = int(state["next_example"])


def prompt_answer_batches(
    path_or_records: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    *,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    system_field: str | None = None,
    system: str | None = None,
    template: str = "none",
    layout: str = "padded",
    seed: int = 0,
    split: str | None = None,
    validation_fraction: float = 0.05,
    record_format: str | None = None,
    too_long: str = "error",
    add_bos: bool | None = None,
    add_eos: bool | None = None,
) -> PromptAnswerIterator:
    """Training batches: shuffled (fresh every epoch), repeating, checkpointable.

    Arguments as :func:`load_records` (which records), :func:`encode_example` (``template``,
    ``add_bos``, ``add_eos``) and :class:`PromptAnswerIterator` (``layout``, ``seed``,
    ``too_long``). Returns an iterator with ``get_state`` / ``set_state``.
    """
    records = load_records(
        path_or_records,
        prompt_field=prompt_field,
        answer_field=answer_field,
        system_field=system_field,
        system=system,
        split=split,
        validation_fraction=validation_fraction,
        record_format=record_format,
    )
    return PromptAnswerIterator(
        records,
        tokenizer,
        seq_len,
        batch_size,
        template=template,
        layout=layout,
        seed=seed,
        too_long=too_long,
        add_bos=add_bos,
        add_eos=add_eos,
    )


def prompt_answer_eval_batches(
    path_or_records: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    *,
    num_batches: int | None = None,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    system_field: str | None = None,
    system: str | None = None,
    template: str = "none",
    layout: str = "padded",
    split: str | None = None,
    validation_fraction: float = 0.05,
    record_format: str | None = None,
    too_long: str = "error",
    add_bos: bool | None = None,
    add_eos: bool | None = None,
) -> list[dict[str, np.ndarray]]:
    """Held-out batches: every record once, in file order; the last batch is filled with empty
    rows (loss mask 0). ``num_batches`` keeps only the first that many. Other arguments as
    :func:`prompt_answer_batches`."""
    records = load_records(
        path_or_records,
        prompt_field=prompt_field,
        answer_field=answer_field,
        system_field=system_field,
        system=system,
        split=split,
        validation_fraction=validation_fraction,
        record_format=record_format,
    )
    iterator = PromptAnswerIterator(
        records,
        tokenizer,
        seq_len,
        batch_size,
        template=template,
        layout=layout,
        shuffle=False,
        repeat=False,
        too_long=too_long,
        add_bos=add_bos,
        add_eos=add_eos,
    )
    batches = []
    for batch in iterator:
        if num_batches is not None and len(batches) >= num_batches:
            break
        batches.append(batch)
    return batches


# --------------------------------------------------------------------------------------------
# A spec string, as config.data.sources names sources.

_SPEC_KEYS = {
    "prompt": "prompt_field",
    "answer": "answer_field",
    "system_field": "system_field",
    "system": "system",
    "template": "template",
    "layout": "layout",
    "too_long": "too_long",
    "format": "record_format",
}


def parse_qa_spec(spec: str) -> dict[str, str]:
    """``qa:PATH?prompt=question&answer=answer&template=chatml&layout=packed`` -> the keyword
    arguments of :func:`prompt_answer_batches` / :func:`prompt_answer_eval_batches`
    (``path_or_records`` and the named options; values are URL-decoded).

    Keys: ``prompt``, ``answer`` (the fields), ``system_field``, ``system`` (a fixed message),
    ``template``, ``layout``, ``too_long``, ``format`` (a :data:`RECORD_FORMATS` reader of the
    file at PATH, e.g. ``qa:train.jsonl?format=medqa&template=meditron``).
    """
    kind, _, rest = spec.partition(":")
    if kind != "qa" or not rest:
        raise ValueError(f"prompt/answer source {spec!r} must look like 'qa:PATH?prompt=...'")
    path, _, query = rest.partition("?")
    if not path:
        raise ValueError(f"prompt/answer source {spec!r}: the path is empty")
    kwargs: dict[str, str] = {"path_or_records": path}
    for key, value in urllib.parse.parse_qsl(
        query, keep_blank_values=True, strict_parsing=bool(query)
    ):
        if key not in _SPEC_KEYS:
            raise ValueError(
                f"prompt/answer source {spec!r}: unknown key {key!r}; known: {sorted(_SPEC_KEYS)}"
            )
        kwargs[_SPEC_KEYS[key]] = value
    return kwargs
