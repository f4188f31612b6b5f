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
it is the run's only source. So is ``reasoning:train=1-6&test=8&...``
(:mod:`jaxlab.data.reasoning`), the seeded arithmetic task as prompt/answer batches: its
``train`` split to train on, its ``test`` split held out. ``config.data.special_tokens``
(e.g. ChatML's ``<|im_start|>``, ``<|im_end|>``) are added to the tokenizer, each encoding as one
new id.

State. ``get_state()`` returns a small JSON-able dict (per-source cursors: document index and
offset per lane, and the examples a process skipped since; the credits and weights);
``set_state`` resumes at exactly the next example.

Processes. With ``process_count > 1`` each process gets its contiguous block of rows of the
global batch (:func:`process_rows`). Every process follows the whole mixture schedule (a few
additions per row) and builds only its own rows; the other rows' lanes only count the examples
they pass over. Each lane is a grain slice of its source (``documents[j::lanes]``), so a process
reads and tokenizes only the documents of the lanes it builds from. With one source (or any
mixture whose lanes stay on the same rows) that is exactly its own rows' documents; when a
mixture's schedule moves a lane to another process's rows, the process taking it over reads the
documents it passed over once, for their lengths. The processes' rows, concatenated in process
order, are the one-process batch, for any number of processes. :func:`merge_states` joins the
processes' states into one from which every process resumes without reading again.

Grain. Sources, shuffling, repetition, lazy tokenization and the per-lane slices are grain's
``MapDataset``. Grain's packers are not used: ``ConcatThenSplitIterDataset`` cuts windows of
``seq_len`` that do not overlap (ours are ``seq_len + 1`` tokens advancing by ``seq_len``, so the
last position of a window has its target) and passes full-length documents ahead of the buffer;
``FirstFitPackIterDataset`` / ``BestFitPackIterDataset`` keep documents whole and pad. Both
would change every batch, and neither has lanes or a state a process can skip through without
reading. Prefetching is grain's ``ThreadPrefetchDatasetIterator`` (:func:`prefetch`), which keeps
the iterator's state with each buffered batch; ``mp_prefetch`` would run the pipeline in worker
processes, out of reach of :meth:`DataIterator.set_weights`.
"""

from __future__ import annotations

import dataclasses
import json
import re
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

    Each lane is a grain slice (``documents[j::lanes]``) of the lazily tokenized dataset, so a
    stream reads and tokenizes only the records of the lanes it builds examples from.
    :meth:`skip_example` takes an example's turn without building it (another process builds
    it): the lane only counts it, and walks past the skipped tokens the next time this stream
    builds from that lane (reading those documents then, since their lengths are needed).
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
        tokenized = dataset.repeat().map(
            lambda text: np.asarray(tokenizer.encode(text, add_bos=True, add_eos=True), np.int32)
        )
        self._lanes = [tokenized[lane::lanes] for lane in range(lanes)]
        self.seq_len = seq_len
        self.lanes = lanes
        # Evaluation sets take one window per document, so a few batches span many documents.
        self.one_window_per_document = one_window_per_document
        # Per lane: (k, offset) = the next token is at ``offset`` in the lane's k-th document,
        # once the lane has moved past ``pending`` more examples (skipped, built elsewhere).
        self.cursors = [(0, 0)] * lanes
        self.pending = [0] * lanes
        self.next_lane = 0
        self._recent: list[dict[int, np.ndarray]] = [{} for _ in range(lanes)]

    def _tokens(self, lane: int, k: int) -> np.ndarray:
        recent = self._recent[lane]  # the lane's documents from its cursor on
        if k not in recent:
            recent[k] = self._lanes[lane][k]
        return recent[k]

    def _take_turn(self) -> int:
        lane = self.next_lane
        self.next_lane = (lane + 1) % self.lanes
        return lane

    def _window(self, lane: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """The lane's next ``seq_len + 1`` tokens with their segments and positions, and the
        index of the last document they reach."""
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
        return tokens, segments, positions, k

    def _advance(self, lane: int, last: int, examples: int = 1) -> None:
        """Moves the lane's cursor past ``examples`` examples, the first of which reaches
        document ``last``."""
        if self.one_window_per_document:
            k = last + 1
            for _ in range(examples - 1):
                self.cursors[lane] = (k, 0)
                k = self._window(lane)[3] + 1
            self.cursors[lane] = (k, 0)
        else:
            # Advance by seq_len: the window's last token starts the lane's next example.
            advance, (k, offset) = self.seq_len * examples, self.cursors[lane]
            while advance > 0:
                left = len(self._tokens(lane, k)) - offset
                if advance < left:
                    offset += advance
                    advance = 0
                else:
                    advance -= left
                    self._recent[lane].pop(k, None)  # a long catch-up holds one document
                    k, offset = k + 1, 0
            self.cursors[lane] = (k, offset)
        recent = self._recent[lane]
        for index in [i for i in recent if i < self.cursors[lane][0]]:
            del recent[index]

    def _catch_up(self, lane: int) -> None:
        """Moves the lane past the examples skipped since this stream last built from it."""
        if self.pending[lane]:
            last = self._window(lane)[3] if self.one_window_per_document else -1
            self._advance(lane, last, self.pending[lane])
            self.pending[lane] = 0

    def next_example(self) -> dict[str, np.ndarray]:
        lane = self._take_turn()
        self._catch_up(lane)
        tokens, segments, positions, last = self._window(lane)
        self._advance(lane, last)
        return self._example(tokens, segments, positions)

    def skip_example(self) -> None:
        """Passes over the next example (as :meth:`next_example` would) without reading it."""
        self.pending[self._take_turn()] += 1

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
        return {
            "next_lane": self.next_lane,
            "cursors": [list(c) for c in self.cursors],
            "pending": list(self.pending),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Resumes at ``state``; a state without ``pending`` (saved before processes skipped
        examples) has none pending."""
        pending = state.get("pending", [0] * len(state["cursors"]))
        if len(state["cursors"]) != self.lanes or len(pending) != self.lanes:
            raise ValueError(
                f"PackedStream.set_state: state has {len(state['cursors'])} cursors and "
                f"{len(pending)} pending counts, the stream {self.lanes} lanes"
            )
        self.next_lane = int(state["next_lane"])
        self.cursors = [(int(k), int(offset)) for k, offset in state["cursors"]]
        self.pending = [int(p) for p in pending]
        self._recent = [{} for _ in range(self.lanes)]


def _check_weights(weights: Sequence[float], num_sources: int) -> np.ndarray:
    w = np.asarray(weights, np.float64)
    if w.shape != (num_sources,) or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(
            f"mixture weights must be {num_sources} finite non-negative numbers with a positive "
            f"sum, got {list(weights)}"
        )
    return w / w.sum()


def process_rows(batch_size: int, process_index: int = 0, process_count: int = 1) -> range:
    """The rows of a global batch that process ``process_index`` of ``process_count`` builds:
    an equal, contiguous block each, in process order. These are the rows
    ``jax.make_array_from_process_local_data`` expects from a process when the mesh gives each
    process's devices a contiguous block of the batch dimension."""
    if process_count < 1:
        raise ValueError(f"process_count must be >= 1, got {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, process_count={process_count}), got {process_index}"
        )
    if batch_size % process_count:
        raise ValueError(
            f"batch_size must be divisible by process_count={process_count}, got {batch_size}"
        )
    rows = batch_size // process_count
    return range(process_index * rows, (process_index + 1) * rows)


class DataIterator:
    """Batches ``{key: [rows, seq_len]}`` from a weighted mixture of packed streams.

    Examples carry ``domain``: the index of the source they came from. With ``process_count >
    1`` the iterator gives process ``process_index``'s rows (:func:`process_rows`) of the global
    batch of ``batch_size`` rows: every process follows the whole mixture schedule (cheap) and
    builds only its own rows, skipping the others' (:meth:`PackedStream.skip_example`), so the
    processes' rows, concatenated in process order, are the one-process batch.
    """

    def __init__(
        self,
        streams: Sequence[PackedStream],
        batch_size: int,
        weights: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"DataIterator: batch_size must be >= 1, got {batch_size}")
        self.streams = list(streams)
        self.batch_size = batch_size
        self.rows = process_rows(batch_size, process_index, process_count)
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
        for row in range(self.batch_size):
            source = self._next_source()
            if row not in self.rows:
                self.streams[source].skip_example()
                continue
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


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One :meth:`DataIterator.get_state` from every process's state at the same step.

    A process knows exactly only the cursors of the lanes it built from; for the others it
    holds an older cursor and a count of examples skipped since. The merged state takes each
    lane from the process with the fewest pending, so that every process resumes from it
    without reading other processes' documents again (any one process's state resumes the
    same batches, only more slowly).
    """
    if not states:
        raise ValueError("merge_states: states must hold at least one state, got none")
    first = states[0]
    for i, state in enumerate(states[1:], 1):
        same = (
            state["credits"] == first["credits"]
            and state["weights"] == first["weights"]
            and len(state["streams"]) == len(first["streams"])
            and all(
                s["next_lane"] == f["next_lane"] and len(s["cursors"]) == len(f["cursors"])
                for s, f in zip(state["streams"], first["streams"], strict=True)
            )
        )
        if not same:
            raise ValueError(
                f"merge_states: state {i} is not at the same step (mixture credits, weights "
                f"and lanes) as state 0"
            )
    streams = []
    for per_process in zip(*(state["streams"] for state in states), strict=True):
        lanes = len(per_process[0]["cursors"])
        pending = [s.get("pending", [0] * lanes) for s in per_process]
        cursors, left = [], []
        for lane in range(lanes):
            best = min(range(len(per_process)), key=lambda p, lane=lane: pending[p][lane])
            cursors.append(list(per_process[best]["cursors"][lane]))
            left.append(pending[best][lane])
        streams.append(
            {"next_lane": per_process[0]["next_lane"], "cursors": cursors, "pending": left}
        )
    return {"streams": streams, "credits": first["credits"], "weights": first["weights"]}


def with_weights(state: dict[str, Any], weights: Sequence[float]) -> dict[str, Any]:
    """``state`` with new token shares, as :meth:`DataIterator.set_weights` leaves it. For an
    iterator behind :func:`prefetch`: setting this state drops the batches built ahead with the
    old weights, so the change takes effect at the next batch."""
    w = _check_weights(weights, len(state["streams"]))
    return {**state, "credits": [0.0] * len(w), "weights": w.tolist()}


def prefetch(iterator, buffer_size: int = 2) -> grain.experimental.ThreadPrefetchDatasetIterator:
    """``iterator``'s batches, built up to ``buffer_size`` ahead on a thread (grain's
    ``ThreadPrefetchDatasetIterator``). Its ``get_state`` is the state after the last batch
    taken, not after those built ahead; ``close()`` stops the thread."""
    if buffer_size < 0:
        raise ValueError(f"prefetch: buffer_size must be >= 0, got {buffer_size}")
    return grain.experimental.ThreadPrefetchDatasetIterator(iterator, buffer_size)


# --------------------------------------------------------------------------------------------
# From a config: sources named by spec strings.

SOURCE_KINDS = ("embedded", "text", "jsonl", "tfds", "qa", "reasoning")
_NAMEABLE = ("embedded", "text", "jsonl", "tfds")
_COMPONENT_NAME = re.compile(r"[A-Za-z0-9_.-]+")


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
    its component only names the source); ``reasoning`` or ``reasoning:train=1-6&...`` (the
    arithmetic task of :mod:`jaxlab.data.reasoning`, batched the same way).

    ``NAME=SPEC`` names the one component of ``SPEC`` (not ``qa:`` or ``reasoning``) ``NAME``
    (letters, digits, ``_``, ``.``, ``-``) instead of its glob or path, e.g.
    ``guidelines=jsonl:/data/g/*.jsonl``: the name in ``eval_loss/<name>`` and in weights files.
    """
    name, sep, named = spec.partition("=")
    if sep and _COMPONENT_NAME.fullmatch(name) and named.partition(":")[0] in _NAMEABLE:
        components = resolve_source(
            named,
            text_field=text_field,
            validation_fraction=validation_fraction,
            tfds_data_dir=tfds_data_dir,
        )
        if len(components) != 1:
            raise ValueError(
                f"data source {spec!r}: a name needs a spec of one component, but {named!r} "
                f"gives {len(components)}: {[c.name for c in components]}"
            )
        return [dataclasses.replace(components[0], name=name)]
    kind, _, arg = spec.partition(":")
    if kind not in SOURCE_KINDS:
        raise ValueError(f"data source {spec!r}: kind must be one of {SOURCE_KINDS}")
    if kind == "reasoning":
        from jaxlab.data import reasoning

        reasoning.parse_spec(spec)  # a bad spec fails when the run is built
        return [Component("reasoning", (), ())]
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


def _qa_options(data_config, split: str) -> dict[str, Any] | None:
    """The :func:`jaxlab.data.prompts.prompt_answer_batches` options of a ``qa:`` or
    ``reasoning`` source for ``split`` (``"train"`` or ``"validation"``; a ``reasoning``
    source holds out its ``test`` split)."""
    from jaxlab.data import prompts  # imported here: prompts imports this module

    specs = list(data_config.sources)
    qa = [spec for spec in specs if spec.partition(":")[0] in ("qa", "reasoning")]
    if not qa:
        return None
    if len(specs) > 1:
        raise ValueError(
            f"config.data.sources: a prompt/answer source ('qa:...' or 'reasoning:...') must be "
            f"the only source, got {specs}"
        )
    if qa[0].partition(":")[0] == "reasoning":
        from jaxlab.data import reasoning

        task = reasoning.parse_spec(qa[0])
        records = task.records("train" if split == "train" else "test")
        return dict(path_or_records=records, template="none", layout="packed")
    options = prompts.parse_qa_spec(qa[0])
    return dict(options, split=split, validation_fraction=data_config.validation_fraction)


class GlobalBatchRows:
    """A process's ``rows`` of another iterator's global batches, which it builds whole.

    For prompt/answer packing, which places each record by the lengths of all earlier ones, so
    no row can be built alone (finetuning sets are small); and, in the input-pipeline bench,
    the way every source was split before each process built only its own rows.
    """

    def __init__(self, iterator, rows: range):
        self.iterator = iterator
        self.rows = rows

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.iterator)
        return {k: v[self.rows.start : self.rows.stop] for k, v in batch.items()}

    def get_state(self) -> dict[str, Any]:
        return self.iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.iterator.set_state(state)


def train_iterator(
    data_config,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    components: Sequence[Component] | None = None,
    weights: Sequence[float] | None = None,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> DataIterator | GlobalBatchRows:
    """The training batches described by ``config.data`` (``weights`` overrides its mixture).

    Each source packs ``config.data.lanes`` documents side by side (0 = ``batch_size``). A
    ``qa:`` source gives answer-only prompt/answer batches of its ``train`` split instead.
    ``batch_size`` is the global batch; the iterator gives process ``process_index`` of
    ``process_count`` its rows of it (:func:`process_rows`), reading and tokenizing only the
    documents of those rows.
    """
    rows = process_rows(batch_size, process_index, process_count)
    qa = _qa_options(data_config, "train")
    if qa is not None:
        from jaxlab.data import prompts

        try:
            batches = prompts.prompt_answer_batches(
                tokenizer=tokenizer,
                seq_len=seq_len,
                batch_size=batch_size,
                seed=data_config.seed,
                **qa,
            )
        except ValueError as e:
            raise ValueError(
                f"config.data.sources {list(data_config.sources)}: training records: {e}"
            ) from e
        return batches if process_count == 1 else GlobalBatchRows(batches, rows)
    components = build_components(data_config) if components is None else components
    lanes = data_config.get("lanes", 0) or batch_size  # of the global batch, for every process
    streams = [
        PackedStream(c.train, tokenizer, seq_len, seed=data_config.seed + i, lanes=lanes)
        for i, c in enumerate(components)
    ]
    return DataIterator(
        streams,
        batch_size,
        weights=mixture_weights(data_config, components) if weights is None else weights,
        names=[c.name for c in components],
        process_index=process_index,
        process_count=process_count,
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
    source gives its ``validation`` split's records, in order; a ``reasoning`` source its
    ``test`` split's."""
    qa = _qa_options(data_config, "validation")
    if qa is not None:
        from jaxlab.data import prompts

        try:
            return prompts.prompt_answer_eval_batches(
                tokenizer=tokenizer,
                seq_len=seq_len,
                batch_size=batch_size,
                num_batches=num_batches,
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
