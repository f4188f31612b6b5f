"""Packed, mixed, checkpointable language-modelling batches.

Flow: document sources -> grain ``MapDataset`` (shuffled, repeated, tokenized lazily) ->
concatenate-then-split packing per source -> weighted mixture of sources -> global batches.

Packing. Each source's documents (bos + text + eos) are concatenated in shuffled order and cut
into windows of ``seq_len + 1`` tokens that advance by ``seq_len``, so no token is dropped and
every position has a target. Within a window, each document fragment gets its own segment id
(1, 2, ...) and positions restart at 0; ``loss_mask`` is 0 where the target belongs to another
document, so neither attention nor loss crosses a document boundary.

Mixture. Every packed example holds exactly ``seq_len`` tokens, so a source's share of
*examples* equals its share of *tokens*: token-share weights are used as example rates as they
are, with no conversion by mean document length (which a document-level mixture would need).
Sources are interleaved by smooth weighted round robin (each step adds the weights to per-source
credits and takes the source with the largest credit), so after ``n`` examples every source's
count stays within a few examples of ``n * weight``: shares have no sampling noise at any
horizon.
Weights can be changed while running (:meth:`DataIterator.set_weights`; DoGE needs this).

Prompt/answer data. A source ``qa:PATH?prompt=FIELD&answer=FIELD&template=chatml&layout=padded``
(:mod:`jaxlab.data.prompts`) gives finetuning batches whose loss mask covers only answer tokens;
it is the run's only source. ``config.data.special_tokens`` (e.g. ChatML's ``<|im_start|>``,
``<|im_end|>``) are added to the tokenizer, each encoding as one new id.

State. ``get_state()`` returns a small JSON-able dict (per-source cursors: document index and
offset per lane; the credits and weights); ``set_state`` resumes at exactly the next example.

Processes. Every process computes the same global batch (cheap for text) and the train loop places
only its addressable rows on its devices, so results do not depend on the number of processes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jaxlab.data import sources
from jaxlab.data.tokenizers import Tokenizer, add_special_tokens, load_tokenizer

EXAMPLE_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions", "domain")


class PackedStream:
    """Concatenate-then-split packing of one document source (see the module docstring).

    With ``lanes > 1`` the stream keeps that many independent cursors and takes examples from
    them in turn: lane ``j`` reads documents ``j, j + lanes, j + 2 * lanes, ...`` of the shuffled
    order. A batch of ``lanes`` consecutive examples then spans ``lanes`` different documents
    instead of the few consecutive windows of one long document.
    """

    def __init__(
        self,
        documents: Sequence[str],
        tokenizer: Tokenizer,
        seq_len: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        lanes: int = 1,
        one_window_per_document: bool = False,
    ):
        if len(documents) == 0:
            raise ValueError(f"PackedStream: source {getattr(documents, 'name', '')!r} is empty")
        if seq_len < 1:
            raise ValueError(f"PackedStream: seq_len must be >= 1, got {seq_len}")
        if lanes < 1:
            raise ValueError(f"PackedStream: lanes must be >= 1, got {lanes}")
        dataset = grain.MapDataset.source(documents)
        if shuffle:
            dataset = dataset.shuffle(seed=seed)  # a fresh permutation every epoch
        self._documents = dataset.repeat().map(
            lambda text: np.asarray(tokenizer.encode(text, add_bos=True, add_eos=True), np.int32)
        )
        self.seq_len = seq_len
        self.lanes = lanes
        # Evaluation sets take one window per document, so a few batches span many documents.
        self.one_window_per_document = one_window_per_document
        # Per lane: (k, offset) = the next token is at ``offset`` in the lane's k-th document.
        self.cursors = [(0, 0)] * lanes
        self.next_lane = 0
        self._recent: dict[int, np.ndarray] = {}  # documents of the current window

    def _tokens(self, lane: int, k: int) -> np.ndarray:
        index = lane + self.lanes * k
        if index not in self._recent:
            if len(self._recent) >= 16 + self.lanes:
                self._recent.pop(next(iter(self._recent)))
            self._recent[index] = self._documents[index]
        return self._recent[index]

    def next_example(self) -> dict[str, np.ndarray]:
        lane = self.next_lane
        self.next_lane = (lane + 1) % self.lanes
        window = self.seq_len + 1
        tokens = np.empty(window, np.int32)
        segments = np.empty(window, np.int32)
        positions = np.empty(window, np.int32)
        (k, offset), filled, segment = self.cursors[lane], 0, 1
        while filled < window:
            piece = self._tokens(lane, k)[offset : offset + window - filled]
            n = len(piece)
            tokens[filled : filled + n] = piece
            segments[filled : filled + n] = segment
            positions[filled : filled + n] = np.arange(n)
            filled += n
            if filled < window:
                k, offset, segment = k + 1, 0, segment + 1
        if self.one_window_per_document:
            self.cursors[lane] = (k + 1, 0)
            return self._example(tokens, segments, positions)
        # Advance by seq_len: the window's last token starts the lane's next example.
        advance, (k, offset) = self.seq_len, self.cursors[lane]
        while advance > 0:
            left = len(self._tokens(lane, k)) - offset
            if advance < left:
                offset += advance
                advance = 0
            else:
                advance -= left
                k, offset = k + 1, 0
        self.cursors[lane] = (k, offset)
        return self._example(tokens, segments, positions)

    @staticmethod
    def _example(tokens, segments, positions) -> dict[str, np.ndarray]:
        return dict(
            inputs=tokens[:-1],
            targets=tokens[1:],
            loss_mask=(segments[:-1] == segments[1:]).astype(np.int32),
            segment_ids=segments[:-1],
            positions=positions[:-1],
        )

    def get_state(self) -> dict[str, Any]:
        return {"next_lane": self.next_lane, "cursors": [list(c) for c in self.cursors]}

    def set_state(self, state: dict[str, Any]) -> None:
        if len(state["cursors"]) != self.lanes:
            raise ValueError(
                f"PackedStream.set_state: state has {len(state['cursors'])} lanes, the stream "
                f"{self.lanes}"
            )
        self.next_lane = int(state["next_lane"])
        self.cursors = [(int(k), int(offset)) for k, offset in state["cursors"]]


def _check_weights(weights: Sequence[float], num_sources: int) -> np.ndarray:
    w = np.asarray(weights, np.float64)
    if w.shape != (num_sources,) or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(
            f"mixture weights must be {num_sources} finite non-negative numbers with a positive "
            f"sum, got {list(weights)}"
        )
    return w / w.sum()


class DataIterator:
    """Global batches ``{key: [batch, seq_len]}`` from a weighted mixture of packed streams.

    Examples carry ``domain``: the index of the source they came from.
    """

    def __init__(
        self,
        streams: Sequence[PackedStream],
        batch_size: int,
        weights: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"DataIterator: batch_size must be >= 1, got {batch_size}")
        self.streams = list(streams)
        self.batch_size = batch_size
        self.names = list(names) if names is not None else [str(i) for i in range(len(streams))]
        self.weights = _check_weights(
            [1.0] * len(streams) if weights is None else weights, len(streams)
        )
        self.credits = np.zeros(len(streams))

    def set_weights(self, weights: Sequence[float]) -> None:
        """New token shares (normalised); the interleaving restarts from them."""
        self.weights = _check_weights(weights, len(self.streams))
        self.credits = np.zeros(len(self.streams))

    def _next_source(self) -> int:
        self.credits += self.weights
        source = int(np.argmax(self.credits))
        self.credits[source] -= 1.0
        return source

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        examples = []
        for _ in range(self.batch_size):
            source = self._next_source()
            example = self.streams[source].next_example()
            example["domain"] = np.full_like(example["inputs"], source)
            examples.append(example)
        return {k: np.stack([e[k] for e in examples]) for k in EXAMPLE_KEYS}

    def get_state(self) -> dict[str, Any]:
        return {
            "streams": [s.get_state() for s in self.streams],
            "credits": self.credits.tolist(),
            "weights": self.weights.tolist(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if len(state["streams"]) != len(self.streams):
            raise ValueError(
                f"DataIterator.set_state: state has {len(state['streams'])} sources, "
                f"the pipeline {len(self.streams)}"
            )
        for stream, s in zip(self.streams, state["streams"], strict=True):
            stream.set_state(s)
        self.credits = np.asarray(state["credits"], np.float64)
        self.weights = np.asarray(state["weights"], np.float64)


# --------------------------------------------------------------------------------------------
# From a config: sources named by spec strings.

SOURCE_KINDS = ("embedded", "text", "jsonl", "tfds", "qa")


@dataclasses.dataclass(frozen=True)
class Component:
    """One mixture component: its name and its train/validation documents."""

    name: str
    train: Sequence[str]
    validation: Sequence[str]


def resolve_source(
    spec: str,
    *,
    text_field: str = "text",
    validation_fraction: float = 0.05,
    tfds_data_dir: str | None = None,
) -> list[Component]:
    """Components named by ``spec``.

    Specs: ``embedded`` (the whole standard-library corpus as one component),
    ``embedded:DOMAIN`` (one domain), ``embedded:*`` (every domain, one component each),
    ``text:GLOB``, ``jsonl:GLOB``, ``tfds:NAME_OR_DIR``; ``qa:PATH?...`` (prompt/answer records,
    batched by :func:`train_iterator` and :func:`eval_batches` from :mod:`jaxlab.data.prompts`:
    its component only names the source).
    """
    kind, _, arg = spec.partition(":")
    if kind not in SOURCE_KINDS:
        raise ValueError(f"data source {spec!r}: kind must be one of {SOURCE_KINDS}")
    if kind == "qa":
        from jaxlab.data import prompts  # imported here: prompts imports this module

        return [Component(prompts.parse_qa_spec(spec)["path_or_records"], (), ())]
    vf = dict(validation_fraction=validation_fraction)
    if kind == "embedded":
        domains = None if arg in ("", "*") else [arg]
        train = sources.embedded_corpus("train", domains=domains, **vf)
        valid = sources.embedded_corpus("validation", domains=domains, **vf)
        if arg == "*":
            return [Component(d, train[d], valid[d]) for d in train]
        if arg == "":
            return [Component("embedded", _concat(train.values()), _concat(valid.values()))]
        return [Component(arg, train[arg], valid[arg])]
    if not arg:
        raise ValueError(f"data source {spec!r}: needs an argument, as in '{kind}:PATH'")
    if kind == "text":
        return [
            Component(
                arg,
                sources.text_files(arg, "train", **vf),
                sources.text_files(arg, "validation", **vf),
            )
        ]
    if kind == "jsonl":

        def read(split):
            return sources.jsonl_documents(arg, split, text_field=text_field, **vf)

        return [Component(arg, read("train"), read("validation"))]
    from jaxlab.data import tfds_text  # imported here: TFDS is slow to import

    def read(split):
        return tfds_text.tfds_text_source(arg, split, data_dir=tfds_data_dir, text_field=text_field)

    try:
        validation = read("validation")
    except ValueError:  # a dataset built without a held-out split
        validation = sources.ListDocuments([], f"{arg} (no validation split)")
    return [Component(arg, read("train"), validation)]


def _concat(parts) -> sources.Documents:
    parts = list(parts)
    files = all(isinstance(p, sources.FileDocuments) for p in parts)
    if files and len({p.errors for p in parts}) == 1:  # keeps how undecodable bytes are handled
        paths = [path for p in parts for path in p.paths]
        return sources.FileDocuments(paths, "embedded", errors=parts[0].errors)
    return sources.ListDocuments([doc for p in parts for doc in p], "concat")


def _size(documents: Sequence[str]) -> int:
    if isinstance(documents, sources.FileDocuments):
        return sum(documents.sizes())
    return sum(len(d) for d in documents)


def _check_has_text(spec: str, component: Component) -> None:
    """Raises when a file or JSONL source's training documents hold no text at all (TFDS
    datasets are not read through here: sizing them would read every record)."""
    train = component.train
    if not isinstance(train, sources.FileDocuments | sources.ListDocuments) or not len(train):
        return
    if _size(train) == 0:
        kind = "file" if isinstance(train, sources.FileDocuments) else "document"
        what = (
            f"its {kind} is empty" if len(train) == 1 else f"its {len(train)} {kind}s are all empty"
        )
        raise ValueError(
            f"config.data.sources: source {spec!r} has no text to train on: {what} (component "
            f"{component.name!r}, training split); expected files or records with text"
        )


def build_components(data_config) -> list[Component]:
    comps: list[Component] = []
    for spec in data_config.sources:
        resolved = resolve_source(
            spec,
            text_field=data_config.text_field,
            validation_fraction=data_config.validation_fraction,
            tfds_data_dir=data_config.tfds_data_dir or None,
        )
        for component in resolved:
            _check_has_text(spec, component)
        comps += resolved
    names = [c.name for c in comps]
    if len(set(names)) != len(names):
        raise ValueError(f"config.data.sources: components repeat: {names}")
    return comps


def mixture_weights(data_config, components: Sequence[Component]) -> list[float]:
    """``config.data.weights`` (token shares); or the ``average`` weights by domain name in the
    JSON file ``config.data.weights_file`` (written by a DoGE / DoReMi run; its OOD targets may
    be components with weight 0, e.g. to evaluate on them); or natural proportions by size when
    neither is given."""
    weights_file = data_config.get("weights_file", "")
    if weights_file:
        if data_config.weights:
            raise ValueError("config.data: give weights or weights_file, not both")
        with open(weights_file) as f:
            record = json.load(f)
        by_name = dict(zip(record["domains"], record["average"], strict=True))
        by_name.update({name: 0.0 for name in record.get("targets", [])})  # scored, not trained
        names = [c.name for c in components]
        missing = sorted(set(record["domains"]) - set(names))
        unknown = sorted(set(names) - set(by_name))
        if missing or unknown:
            raise ValueError(
                f"config.data.weights_file {weights_file!r} weights domains "
                f"{record['domains']} (targets {record.get('targets', [])}), but "
                f"the components are {names}: missing {missing}, "
                f"unknown {unknown}"
            )
        return [float(by_name[n]) for n in names]
    if not data_config.weights:
        sizes = [float(_size(c.train)) for c in components]
        if not sum(sizes):
            raise ValueError(
                f"config.data: natural mixture weights (the size of each component's training "
                f"text) of components {[c.name for c in components]} are all 0: their "
                "documents are empty; give sources with text"
            )
        return sizes
    if len(data_config.weights) != len(components):
        raise ValueError(
            f"config.data.weights has {len(data_config.weights)} entries for "
            f"{len(components)} components {[c.name for c in components]}"
        )
    return [float(w) for w in data_config.weights]


def make_tokenizer(data_config) -> Tokenizer:
    """``config.data.tokenizer`` with ``config.data.special_tokens`` added (one new id each)."""
    tokenizer = load_tokenizer(data_config.tokenizer or None)
    special = tuple(data_config.get("special_tokens", ()) or ())
    return add_special_tokens(tokenizer, special) if special else tokenizer


def _qa_options(data_config) -> dict[str, Any] | None:
    """The :func:`jaxlab.data.prompts.prompt_answer_batches` options of a ``qa:`` source."""
    from jaxlab.data import prompts  # imported here: prompts imports this module

    specs = list(data_config.sources)
    qa = [spec for spec in specs if spec.startswith("qa:")]
    if not qa:
        return None
    if len(specs) > 1:
        raise ValueError(
            f"config.data.sources: a prompt/answer source ('qa:...') must be the "
            f"only source, got {specs}"
        )
    return dict(prompts.parse_qa_spec(qa[0]), validation_fraction=data_config.validation_fraction)


def train_iterator(
    data_config,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    components: Sequence[Component] | None = None,
    weights: Sequence[float] | None = None,
) -> DataIterator:
    """The training batches described by ``config.data`` (``weights`` overrides its mixture).

    Each source packs ``config.data.lanes`` documents side by side (0 = ``batch_size``). A
    ``qa:`` source gives answer-only prompt/answer batches of its ``train`` split instead.
    """
    qa = _qa_options(data_config)
    if qa is not None:
        from jaxlab.data import prompts

        try:
            return prompts.prompt_answer_batches(
                tokenizer=tokenizer,
                seq_len=seq_len,
                batch_size=batch_size,
                seed=data_config.seed,
                split="train",
                **qa,
            )
        except ValueError as e:
            raise ValueError(
                f"config.data.sources {list(data_config.sources)}: training records: {e}"
            ) from e
    components = build_components(data_config) if components is None else components
    lanes = data_config.get("lanes", 0) or batch_size
    streams = [
        PackedStream(c.train, tokenizer, seq_len, seed=data_config.seed + i, lanes=lanes)
        for i, c in enumerate(components)
    ]
    return DataIterator(
        streams,
        batch_size,
        weights=mixture_weights(data_config, components) if weights is None else weights,
        names=[c.name for c in components],
    )


def eval_batches(
    data_config,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    components: Sequence[Component] | None = None,
) -> list[dict[str, np.ndarray]]:
    """A fixed list of held-out batches: one window from each of the components' validation
    documents, in a fixed shuffled order (documents repeat only if there are too few). A ``qa:``
    source gives its ``validation`` split's records, in order."""
    qa = _qa_options(data_config)
    if qa is not None:
        from jaxlab.data import prompts

        try:
            return prompts.prompt_answer_eval_batches(
                tokenizer=tokenizer,
                seq_len=seq_len,
                batch_size=batch_size,
                num_batches=num_batches,
                split="validation",
                **qa,
            )
        except ValueError as e:
            raise ValueError(
                f"config.data.sources {list(data_config.sources)} with "
                f"config.data.validation_fraction="
                f"{data_config.validation_fraction}: held-out records: {e}"
            ) from e
    components = build_components(data_config) if components is None else components
    valid = [c.validation for c in components if len(c.validation)]
    if not valid:
        raise ValueError("eval_batches: no component has validation documents")
    stream = PackedStream(
        _concat(valid), tokenizer, seq_len, seed=data_config.seed, one_window_per_document=True
    )
    iterator = DataIterator([stream], batch_size)
    return [next(iterator) for _ in range(num_batches)]
