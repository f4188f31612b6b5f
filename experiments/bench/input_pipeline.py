"""Input-pipeline throughput per host: every host building the global batch, against each host
building only its own rows, for 1, 2 and 4 simulated processes.

A SentencePiece model (BPE, ``--vocab_size`` pieces, byte fallback) is trained at start on lines
of the embedded standard-library corpus (nothing is downloaded); the batches are those of
``--config`` (default ``configs/bench_input_pipeline.py``): ``config.data``'s sources,
``config.batch_size`` global rows of ``config.seq_len`` tokens, one lane per row. For each process
count ``P``:

* ``global``: the way every process got its rows before, building the whole global batch and
  keeping its block (:class:`jaxlab.data.pipeline.GlobalBatchRows`). Every host does the same
  work, so process 0 is timed.
* ``own_rows``: ``train_iterator(..., process_index=p, process_count=P)``, which builds and
  tokenizes only process ``p``'s rows. Every process is timed; the slowest is reported (a step
  waits for the slowest host).

Each timing runs a fresh iterator for ``--batches`` batches, first batch included (documents are
tokenized whole when a lane reaches them, so excluding the first batch would drop the cost of the
documents it opens). Reported per host: batches/s, tokens/s (tokens of the host's rows), and the
characters it tokenized per batch (a counting wrapper around the tokenizer). Before timing, the
processes' rows are checked to concatenate into the one-process batch.

With one source every lane stays on its rows, so a host tokenizes 1/P of the text. With a mixture
(``--config.data.sources="('embedded:*',)"``) the schedule moves lanes between the processes'
rows, and a host taking a lane over reads the documents it passed over once, so it tokenizes
somewhat more than 1/P.

  python -m experiments.bench.input_pipeline [--out=bench_results/bench_input_pipeline.json]
      [--quick] [--config.batch_size=32]

``--quick`` shrinks the batch to 16 x 256 tokens except where ``--config.`` sets them explicitly.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time

import numpy as np
import sentencepiece
from absl import app, flags
from ml_collections import config_flags

from experiments import run_config
from jaxlab.data import pipeline, sources
from jaxlab.data.tokenizers import SentencePieceTokenizer

flags.DEFINE_string("out", "bench_results/bench_input_pipeline.json", "Where to write the JSON.")
flags.DEFINE_list("processes", ["1", "2", "4"], "Simulated process counts.")
flags.DEFINE_integer("batches", 30, "Batches per timed run.")
flags.DEFINE_integer("vocab_size", 4096, "SentencePiece vocabulary size.")
flags.DEFINE_integer("train_lines", 100_000, "Corpus lines the SentencePiece model trains on.")
flags.DEFINE_bool("quick", False, "Smoke run: 3 batches of 16 x 256 tokens, 1 and 2 processes.")
config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "..", "..", "configs", "bench_input_pipeline.py"),
    "The data, batch_size and seq_len of the batches timed.",
    lock_config=True,
)
FLAGS = flags.FLAGS

QUICK = {"batch_size": 16, "seq_len": 256}


class CountingTokenizer:
    """Delegates ``encode`` to ``tokenizer`` and counts the characters it encodes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.characters = 0

    def encode(self, text, **options):
        self.characters += len(text)
        return self.tokenizer.encode(text, **options)


def train_tokenizer(directory: str, vocab_size: int, max_lines: int) -> SentencePieceTokenizer:
    """A BPE SentencePiece model trained on the first ``max_lines`` non-empty lines of the
    embedded corpus's training files."""

    def lines():
        count = 0
        for documents in sources.embedded_corpus("train").values():
            for text in documents:
                for line in text.splitlines():
                    if line.strip():
                        yield line
                        count += 1
                        if count == max_lines:
                            return

    prefix = os.path.join(directory, "bench")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=lines(),
        model_prefix=prefix,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        minloglevel=2,
        num_threads=2,
    )
    return SentencePieceTokenizer(prefix + ".model")


def timed(make_iterator, tokenizer, num_batches: int) -> dict[str, float]:
    """Throughput of a fresh iterator over ``num_batches`` batches (first batch included)."""
    counting = CountingTokenizer(tokenizer)
    start = time.perf_counter()
    iterator = make_iterator(counting)
    rows = 0
    for _ in range(num_batches):
        batch = next(iterator)
        rows += len(batch["inputs"])
    seconds = time.perf_counter() - start
    return dict(
        seconds=seconds,
        batches_per_s=num_batches / seconds,
        tokens_per_s=rows * batch["inputs"].shape[1] / seconds,
        characters_per_batch=counting.characters / num_batches,
    )


def main(argv):
    del argv
    quick = FLAGS.quick
    config = run_config.from_flag(FLAGS["config"], defaults=QUICK if quick else None)
    batch_size, seq_len = config.batch_size, config.seq_len
    num_batches = 3 if quick else FLAGS.batches
    counts = [1, 2] if quick else [int(p) for p in FLAGS.processes]
    components = pipeline.build_components(config.data)
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        tokenizer = train_tokenizer(
            directory, FLAGS.vocab_size, 2_000 if quick else FLAGS.train_lines
        )
        train_seconds = time.perf_counter() - start

    def iterator(process_index=0, process_count=1):
        def make(counting):
            return pipeline.train_iterator(
                config.data,
                counting,
                seq_len,
                batch_size,
                components,
                process_index=process_index,
                process_count=process_count,
            )

        return make

    def before(process_count):
        def make(counting):
            rows = pipeline.process_rows(batch_size, 0, process_count)
            return pipeline.GlobalBatchRows(iterator()(counting), rows)

        return make

    # The processes' own rows, concatenated, are the one-process batch.
    whole = iterator()(tokenizer)
    parts = [iterator(p, max(counts))(tokenizer) for p in range(max(counts))]
    for _ in range(2):
        want = next(whole)
        got = [next(p) for p in parts]
        for key in pipeline.EXAMPLE_KEYS:
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])

    results = []
    for count in counts:
        old = timed(before(count), tokenizer, num_batches)
        hosts = [timed(iterator(p, count), tokenizer, num_batches) for p in range(count)]
        new = min(hosts, key=lambda host: host["batches_per_s"])
        for path, result in (("global", old), ("own_rows", new)):
            results.append(dict(processes=count, path=path, **result))

    header = ("processes", "path", "batches/s", "tokens/s", "chars/batch", "speedup")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        reference = next(
            r for r in results if r["processes"] == result["processes"] and r["path"] == "global"
        )
        speedup = result["batches_per_s"] / reference["batches_per_s"]
        lines.append(
            f"| {result['processes']} | {result['path']} | {result['batches_per_s']:.2f} | "
            f"{result['tokens_per_s']:,.0f} | {result['characters_per_batch']:,.0f} | "
            f"{speedup:.2f}x |"
        )
    table = "\n".join(lines)
    print(
        f"input pipeline per host: {batch_size} x {seq_len} global batch, {num_batches} batches, "
        f"sources {list(config.data.sources)}, SentencePiece BPE {FLAGS.vocab_size} "
        f"(trained in {train_seconds:.1f} s)"
    )
    print(table)
    record = dict(
        benchmark="input_pipeline",
        unit_note="per host; tokens/s counts the host's rows; first batch included",
        batch_size=batch_size,
        seq_len=seq_len,
        batches=num_batches,
        sources=list(config.data.sources),
        vocab_size=FLAGS.vocab_size,
        tokenizer_train_seconds=train_seconds,
        machine=dict(
            platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count()
        ),
        results=results,
        table=table,
    )
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
