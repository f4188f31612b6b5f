"""Prompt/answer data: answer-only loss masks, padded and packed layouts, added special tokens."""

import json
import pickle
import random
import re

import jax
import numpy as np
import pytest
import tokenizers as hf_tokenizers
import transformers
from flax import nnx

from jaxlab import models
from jaxlab.data import prompts
from jaxlab.data.pipeline import EXAMPLE_KEYS
from jaxlab.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    SpecialTokensTokenizer,
    add_special_tokens,
)
from jaxlab.train.step import loss_sums
from tests.data.tokenizers_test import CORPUS_LINES, train_sentencepiece

START, END = "<|im_start|>", "<|im_end|>"
ALPHABET = "abcxyz 019?.\n\téö你🙂"


def random_text(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(low, high)))


def random_records(seed: int, count: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"question": f"#{i} " + random_text(rng, 0, 12), "gold": random_text(rng, 0, 10)}
        for i in range(count)
    ]


# The formats, written out independently of jaxlab.data.prompts: (prompt text, answer text).
def expected_texts(template: str, prompt: str, answer: str, system: str | None):
    if template == "none":
        return prompt, answer
    if template == "chatml":
        head = f"{START}system\n{system}{END}\n" if system is not None else ""
        return f"{head}{START}user\n{prompt}{END}\n{START}assistant\n", f"{answer}{END}"
    head = f"{START}system\n{system}{END}\n" if system is not None else ""
    return f"{head}{START}question\n{prompt}{END}\n", f"{START}answer\n{answer}{END}\n"


def byte_chatml_ids(text: str) -> list[int]:
    """Bytes, with the two ChatML markers as ids 259 and 260 (ByteTokenizer + added tokens)."""
    ids = []
    for piece in re.split(r"(<\|im_start\|>|<\|im_end\|>)", text):
        ids += {START: [259], END: [260]}.get(piece, list(piece.encode("utf-8")))
    return ids


def expected_example(template: str, record: dict, system: str | None):
    """(all ids, number of answer ids at the end) for the byte tokenizer with ChatML tokens."""
    prompt, answer = expected_texts(template, record["question"], record["gold"], system)
    bos = [] if template == "meditron" else [257]  # meditron adds no bos (Megatron-LLM)
    eos = [258] if template == "none" else []
    answer_ids = byte_chatml_ids(answer) + eos
    return bos + byte_chatml_ids(prompt) + answer_ids, len(answer_ids)


@pytest.fixture(scope="module")
def byte_chatml():
    return add_special_tokens(ByteTokenizer(), prompts.CHATML_TOKENS)


@pytest.fixture(scope="module")
def tiny_model():
    config = models.TransformerConfig(
        vocab_size=261,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        max_seq_len=256,
    )
    return models.build(config, nnx.Rngs(0))


def segments_of(batch: dict, row: int, pad_id: int = 256):
    """{segment id: (input positions, tokens)} of one row (byte tokenizer: pad 256).

    A segment's tokens are its inputs, and the last target when the window ends inside it (the
    example's last token is then only a target)."""
    found = {}
    inputs, targets, segment_ids = (batch[k][row] for k in ("inputs", "targets", "segment_ids"))
    for segment in sorted(set(segment_ids.tolist()) - {0}):
        where = np.flatnonzero(segment_ids == segment)
        assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
        tokens = [int(t) for t in inputs[where]]
        if where[-1] == len(inputs) - 1 and targets[-1] != pad_id:
            tokens.append(int(targets[-1]))
        found[segment] = (where, tokens)
    return found


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("template", ["none", "chatml", "meditron"])
def test_loss_is_answer_only_cross_entropy(template, layout, byte_chatml, tiny_model):
    seed = {"none": 0, "chatml": 1, "meditron": 2}[template] + 10 * (layout == "packed")
    records = random_records(seed, count=25)
    system = None if template == "none" else ("Be brief." if seed % 2 else None)
    seq_len, batch_size = 160, 4
    iterator = prompts.prompt_answer_batches(
        records,
        byte_chatml,
        seq_len,
        batch_size,
        prompt_field="question",
        answer_field="gold",
        system=system,
        template=template,
        layout=layout,
        seed=seed,
    )
    expected = {}
    for i, record in enumerate(records):
        ids, num_answer = expected_example(template, record, system)
        expected[tuple(ids)] = (i, num_answer)

    graphdef, state = nnx.split(tiny_model)
    params = nnx.to_pure_dict(nnx.state(tiny_model, nnx.Param))
    forward = jax.jit(lambda s, x, p, g: nnx.merge(graphdef, s)(x, positions=p, segment_ids=g))
    seen = []
    for _ in range(2):
        batch = next(iterator)
        assert set(batch) == set(EXAMPLE_KEYS)
        assert all(v.shape == (batch_size, seq_len) and v.dtype == np.int32 for v in batch.values())
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
        mask = np.zeros((batch_size, seq_len), np.int32)
        ce_sum, count = 0.0, 0
        for row in range(batch_size):
            found = segments_of(batch, row)
            if layout == "padded":
                assert list(found) == [1]
            for where, tokens in found.values():
                index, num_answer = expected[tuple(tokens)]
                seen.append(index)
                np.testing.assert_array_equal(batch["positions"][row, where], np.arange(len(where)))
                # Token j of the segment is the target at input where[0] + j - 1; its last
                # num_answer tokens are the answer's.
                first = where[0] + len(tokens) - num_answer - 1
                mask[row, first : where[0] + len(tokens) - 1] = 1
                # Reference: the example alone through the model, cross-entropy in float64.
                alone = np.zeros((1, seq_len + 1), np.int32)
                alone[0, : len(tokens)] = tokens
                segment = (np.arange(seq_len) < len(tokens) - 1).astype(np.int32)[None]
                positions = np.arange(seq_len, dtype=np.int32)[None]
                z = np.asarray(forward(state, alone[:, :-1], positions, segment), np.float64)[0]
                logp = z - z.max(-1, keepdims=True)
                logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
                for j in range(len(tokens) - num_answer, len(tokens)):
                    ce_sum -= logp[j - 1, tokens[j]]
                    count += 1
        np.testing.assert_array_equal(batch["loss_mask"], mask)
        loss_sum, token_count = loss_sums(graphdef, params, {k: batch[k] for k in EXAMPLE_KEYS})
        assert int(token_count) == count
        np.testing.assert_allclose(float(loss_sum) / float(token_count), ce_sum / count, rtol=2e-5)
    if layout == "padded":
        assert sorted(seen) == sorted(set(seen))  # 8 different records of the first epoch
    else:
        assert len(seen) > 2 * batch_size  # rows hold several examples


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_state_round_trips(layout, byte_chatml):
    records = random_records(3, count=11)

    def make():
        return prompts.prompt_answer_batches(
            records,
            byte_chatml,
            64,
            3,
            prompt_field="question",
            answer_field="gold",
            template="chatml",
            layout=layout,
            seed=5,
        )

    iterator = make()
    for _ in range(4):  # past the first epoch
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = [next(iterator) for _ in range(5)]
    resumed = make()
    resumed.set_state(state)
    for want in expected:
        jax.tree.map(np.testing.assert_array_equal, next(resumed), want)
    fresh, again = make(), make()
    jax.tree.map(np.testing.assert_array_equal, next(fresh), next(again))  # deterministic
    with pytest.raises(ValueError, match="state is for 11 records, this iterator has 10"):
        prompts.PromptAnswerIterator(
            prompts.load_records(records[:10], prompt_field="question", answer_field="gold"),
            byte_chatml,
            64,
            3,
        ).set_state(state)


def test_each_epoch_is_a_fresh_permutation(byte_chatml):
    records = random_records(4, count=9)
    iterator = prompts.prompt_answer_batches(
        records, byte_chatml, 64, 9, prompt_field="question", answer_field="gold", seed=1
    )
    texts = sorted(r["question"] + r["gold"] for r in records)
    epochs = []
    for _ in range(3):  # "none": [bos] prompt answer [eos]; the inputs leave out the eos
        epochs.append([byte_chatml.decode(row) for row in next(iterator)["inputs"]])
        assert sorted(epochs[-1]) == texts
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]


def test_eval_batches_cover_every_record_once(byte_chatml):
    records = random_records(6, count=10)
    for layout in ("padded", "packed"):
        batches = prompts.prompt_answer_eval_batches(
            records,
            byte_chatml,
            96,
            3,
            prompt_field="question",
            answer_field="gold",
            template="chatml",
            layout=layout,
        )
        seen = []
        for batch in batches:
            for row in range(3):
                for _, tokens in segments_of(batch, row).values():
                    seen.append(byte_chatml.decode(tokens))
        assert seen == [
            "".join(expected_texts("chatml", r["question"], r["gold"], None)) for r in records
        ]
        if layout == "padded":
            assert len(batches) == 4 and batches[-1]["loss_mask"][1:].sum() == 0
    capped = prompts.prompt_answer_eval_batches(
        records, byte_chatml, 96, 3, num_batches=2, prompt_field="question", answer_field="gold"
    )
    assert len(capped) == 2


def test_jsonl_file_system_field_and_splits(tmp_path, byte_chatml):
    path = tmp_path / "qa.jsonl"
    lines = [
        json.dumps({"q": f"question {i}", "a": f"answer {i}", "sys": f"s{i}"}) for i in range(40)
    ]
    path.write_text("\n".join(lines[:20]) + "\n\n" + "\n".join(lines[20:]) + "\n")
    kwargs = dict(prompt_field="q", answer_field="a", system_field="sys")
    every = prompts.load_records(str(path), **kwargs)
    assert [r.prompt for r in every] == [f"question {i}" for i in range(40)]
    assert every[3].system == "s3" and every[25].where == f"{path}:27"
    train = prompts.load_records(path, split="train", validation_fraction=0.3, **kwargs)
    valid = prompts.load_records(path, split="validation", validation_fraction=0.3, **kwargs)
    assert sorted(r.where for r in train + valid) == sorted(r.where for r in every)
    assert 0 < len(valid) < 40
    moved = tmp_path / "elsewhere" / "qa.jsonl"  # the split does not depend on the folder
    moved.parent.mkdir()
    moved.write_bytes(path.read_bytes())
    again = prompts.load_records(moved, split="validation", validation_fraction=0.3, **kwargs)
    assert [r.prompt for r in again] == [r.prompt for r in valid]
    batch = next(
        prompts.prompt_answer_batches(str(path), byte_chatml, 96, 2, template="chatml", **kwargs)
    )
    text = byte_chatml.decode(batch["inputs"][0])
    number = re.search(r"question (\d+)", text).group(1)
    assert text.startswith(f"{START}system\ns{number}{END}\n{START}user\nquestion {number}")


def test_spec_string():
    spec = "qa:data/**/*.jsonl?prompt=question&answer=gold&template=chatml&system=Be%20brief."
    assert prompts.parse_qa_spec(spec) == dict(
        path_or_records="data/**/*.jsonl",
        prompt_field="question",
        answer_field="gold",
        template="chatml",
        system="Be brief.",
    )
    assert prompts.parse_qa_spec("qa:x.jsonl") == {"path_or_records": "x.jsonl"}
    with pytest.raises(ValueError, match="unknown key 'promt'"):
        prompts.parse_qa_spec("qa:x.jsonl?promt=q")
    with pytest.raises(ValueError, match="must look like 'qa:PATH"):
        prompts.parse_qa_spec("jsonl:x.jsonl")


# Bad input and too-long examples.


def test_missing_or_bad_fields_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n{"question": "c", "ans": "d"}\n')
    message = r"bad.jsonl:2: record has no field 'answer' \(answer_field\); its fields are \['ans'"
    with pytest.raises(ValueError, match=message):
        prompts.load_records(str(path), prompt_field="question")
    path.write_text('{"question": "a", "answer": 3}\n')
    with pytest.raises(
        ValueError,
        match=r"bad.jsonl:1: field 'answer' \(answer_field\) must be "
        "a string, got int",
    ):
        prompts.load_records(str(path), prompt_field="question")
    path.write_text('{"question": "a", "answer": "b"}\n{"question": \n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        prompts.load_records(str(path), prompt_field="question")
    with pytest.raises(ValueError, match=r"records\[1\]: record has no field 'prompt'"):
        prompts.load_records([{"prompt": "a", "answer": "b"}, {"answer": "b"}])
    with pytest.raises(ValueError, match="no files match"):
        prompts.load_records(str(tmp_path / "none*.jsonl"))


def test_bad_text_is_refused_at_load_naming_file_line_and_field(tmp_path):
    path = tmp_path / "qa.jsonl"
    good = json.dumps({"question": "q", "answer": "a", "sys": "s"})
    # A lone surrogate is valid JSON (Python decodes it) but no text: refused at load.
    path.write_text(f'{good}\n{good}\n{{"question": "q", "answer": "x\\udcff", "sys": "s"}}\n')
    kwargs = dict(prompt_field="question", system_field="sys")
    for split in (None, "train", "validation"):
        message = r"qa.jsonl:3: field 'answer' holds a lone surrogate '\\udcff' at character 1"
        with pytest.raises(ValueError, match=message):
            prompts.load_records(str(path), split=split, **kwargs)
    path.write_text(f'{good}\n{{"question": "q", "answer": "a", "sys": "\\ud800"}}\n')
    with pytest.raises(ValueError, match=r"qa.jsonl:2: field 'sys' holds a lone surrogate"):
        prompts.load_records(str(path), **kwargs)
    records = [{"question": "q", "answer": "a"}, {"question": "\udfff", "answer": "a"}]
    with pytest.raises(ValueError, match=r"records\[1\]: field 'question' holds a lone surrogate"):
        prompts.load_records(records, prompt_field="question")
    with pytest.raises(ValueError, match=r"system holds a lone surrogate '\\ud800'"):
        prompts.load_records(records[:1], prompt_field="question", system="\ud800")
    # Invalid UTF-8 and a malformed line name the file and the line, not the JSON's "line 1".
    lines = [good.encode()] * 5
    lines[3] = b'{"question": "caf\xe9", "answer": "a", "sys": "s"}'
    raw = b"\n".join(lines)
    path.write_bytes(raw)
    offset = raw.index(b"\xe9")
    with pytest.raises(
        ValueError,
        match=rf"qa.jsonl:4: not valid UTF-8: byte 0xe9 at column 18 "
        rf"\(byte offset {offset} of the file",
    ):
        prompts.load_records(str(path), **kwargs)
    bad = '{"question": "q", "answer": ]'
    path.write_text("\n".join([good] * 57 + [bad]))
    with pytest.raises(
        ValueError,
        match=r"qa.jsonl:58: not valid JSON: Expecting value at "
        rf"column {bad.index(']') + 1}",
    ) as error:
        prompts.load_records(str(path), **kwargs)
    assert "line 1" not in str(error.value)


def test_too_long_policies(tmp_path, byte_chatml):
    path = tmp_path / "long.jsonl"
    rows = [
        {"prompt": "p" * 5, "answer": "a" * 5},
        {"prompt": "p" * 30, "answer": "a" * 3},
        {"prompt": "p" * 4, "answer": "a" * 30},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def make(**kw):
        return prompts.prompt_answer_eval_batches(str(path), byte_chatml, 20, 3, **kw)

    # "none": [bos] prompt answer [eos]: 12, 35 and 36 tokens; seq_len + 1 = 21.
    with pytest.raises(
        ValueError,
        match=r"long.jsonl:2: the example has 35 tokens \(31 prompt \+ "
        r"4 answer\), more than seq_len \+ 1 = 21",
    ):
        make()
    with pytest.raises(ValueError, match=r"long.jsonl:2: .* even the prompt does not fit"):
        make(too_long="truncate")
    (batch,) = make(too_long="skip")
    assert [byte_chatml.decode(r) for r in batch["inputs"][:1]] == ["ppppp" + "aaaaa"]
    assert batch["segment_ids"][1:].max() == 0  # two records were left out
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[::2]))
    (batch,) = make(too_long="truncate")
    # The long answer is cut to fill the row: 5 prompt tokens (bos + 4) and 16 answer tokens.
    assert byte_chatml.decode(batch["inputs"][1]) == "pppp" + "a" * 15
    assert batch["targets"][1, -1] == ord("a") and batch["loss_mask"][1].sum() == 16
    path.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match="every record is longer than seq_len"):
        make(too_long="skip")


def test_other_bad_arguments(byte_chatml):
    records = [{"prompt": "q", "answer": "a"}]
    with pytest.raises(ValueError, match="needs '<|im_start|>' to encode as one id"):
        prompts.prompt_answer_batches(records, ByteTokenizer(), 32, 1, template="chatml")
    with pytest.raises(ValueError, match="layout must be one of"):
        prompts.prompt_answer_batches(records, byte_chatml, 32, 1, layout="rows")
    with pytest.raises(ValueError, match="template must be one of"):
        prompts.prompt_answer_batches(records, byte_chatml, 32, 1, template="alpaca")
    with pytest.raises(ValueError, match="too_long must be one of"):
        prompts.prompt_answer_batches(records, byte_chatml, 32, 1, too_long="clip")
    with pytest.raises(ValueError, match="records\\[0\\]: the example starts with its answer"):
        next(
            prompts.prompt_answer_batches(
                [{"prompt": "", "answer": "a"}], byte_chatml, 32, 1, add_bos=False
            )
        )
    with pytest.raises(ValueError, match="no records"):
        prompts.prompt_answer_batches(records, byte_chatml, 32, 1, split="validation")


# Added special tokens for the three tokenizer kinds.

NEW = ("<|im_start|>", "<|im_end|>", "[bib_ref]", "[/bib_ref]")


def sp_tokenizer(directory) -> SentencePieceTokenizer:
    train_sentencepiece(
        str(directory / "tokenizer"),
        model_type="bpe",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["[fig]"],
    )
    return SentencePieceTokenizer(directory / "tokenizer.model")


def hf_tokenizer(directory) -> HFTokenizer:
    tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
    tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf_tokenizers.decoders.ByteLevel()
    trainer = hf_tokenizers.trainers.BpeTrainer(
        vocab_size=350,
        special_tokens=["<pad>", "<s>", "</s>", "[fig]"],
        show_progress=False,
        initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS_LINES, trainer=trainer)
    tok.save(str(directory / "tokenizer.json"))
    return HFTokenizer(directory)


@pytest.fixture(scope="module", params=["byte", "sentencepiece", "hf"])
def base_tokenizer(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return {"byte": lambda _: ByteTokenizer(), "sentencepiece": sp_tokenizer, "hf": hf_tokenizer}[
        request.param
    ](directory)


def mixed_text(rng: random.Random, tokens) -> tuple[str, list]:
    """A random text and its parts: plain strings and special tokens."""
    parts = []
    for _ in range(rng.randint(1, 8)):
        parts.append(rng.choice(tokens) if rng.random() < 0.4 else random_text(rng, 1, 8))
    return "".join(parts), parts


def test_special_tokens_encode_as_one_id(base_tokenizer):
    base = base_tokenizer
    tok = add_special_tokens(base, NEW)
    assert tok.vocab_size == base.vocab_size + len(NEW)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (base.pad_id, base.bos_id, base.eos_id)
    for k, token in enumerate(NEW):
        assert tok.encode(token) == [base.vocab_size + k] == [tok.token_id(token)]
        assert tok.decode([base.vocab_size + k]) == token
    rng = random.Random(7)
    for _ in range(60):
        text, parts = mixed_text(rng, NEW)
        # Plain runs between special tokens are encoded by the base tokenizer on their own.
        merged = re.split("(" + "|".join(map(re.escape, NEW)) + ")", text)
        expected = []
        for i, piece in enumerate(merged):
            if i % 2:
                expected.append(base.vocab_size + NEW.index(piece))
            elif piece:
                expected += base.encode(piece)
        ids = tok.encode(text, add_bos=base.bos_id is not None)
        assert ids == ([base.bos_id] if base.bos_id is not None else []) + expected
        assert tok.decode(ids) == text
        assert sum(ids.count(base.vocab_size + k) for k in range(len(NEW))) == sum(
            part in NEW for part in parts
        )
    assert tok.encode_batch(["a<|im_end|>", "<|im_start|>"]) == [
        [*base.encode("a"), tok.token_id(END)],
        [tok.token_id(START)],
    ]
    with pytest.raises(ValueError, match=f"outside \\[0, {tok.vocab_size}\\)"):
        tok.decode([tok.vocab_size])


def test_special_tokens_match_transformers_added_tokens(tmp_path):
    base = hf_tokenizer(tmp_path)
    tok = add_special_tokens(base, NEW)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    ref.add_special_tokens({"additional_special_tokens": list(NEW)})
    assert tok.vocab_size == len(ref)
    rng = random.Random(3)
    for _ in range(50):
        text, _ = mixed_text(rng, NEW)
        expected = ref(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text) == expected
        assert tok.decode(expected) == ref.decode(expected)


def test_sentencepiece_special_tokens_match_transformers_added_tokens(tmp_path):
    train_sentencepiece(str(tmp_path / "tokenizer"), model_type="bpe")
    tok = add_special_tokens(SentencePieceTokenizer(tmp_path / "tokenizer.model"), NEW)
    # transformers converts the model to its own Rust tokenizer and splits on added tokens.
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    ref.add_special_tokens({"additional_special_tokens": list(NEW)})
    assert tok.vocab_size == len(ref)
    rng = random.Random(11)
    for _ in range(50):
        text, _ = mixed_text(rng, NEW)
        assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text


def test_existing_special_pieces_keep_their_ids(base_tokenizer):
    base = base_tokenizer
    tok = add_special_tokens(base, ["[fig]", START])
    if isinstance(base, ByteTokenizer):
        assert tok.special_tokens == {"[fig]": 259, START: 260}
        return
    fig = base.encode("x[fig]")[-1]  # "[fig]" is one piece of the base vocabulary
    assert base.decode([fig]) == "[fig]" and fig < base.vocab_size
    assert tok.special_tokens == {"[fig]": fig, START: base.vocab_size}
    assert tok.vocab_size == base.vocab_size + 1
    assert tok.decode(tok.encode("x[fig]y" + START)) == "x[fig]y" + START


def test_adding_more_tokens_and_pickling():
    tok = ByteTokenizer().with_special_tokens([START])
    more = add_special_tokens(tok, [START, END])
    assert isinstance(more, SpecialTokensTokenizer) and more.base is tok.base
    assert more.special_tokens == {START: 259, END: 260} and more.vocab_size == 261
    copy = pickle.loads(pickle.dumps(more))
    assert copy.encode("a<|im_end|>b") == more.encode("a<|im_end|>b") == [97, 260, 98]
    # The longest token wins where one contains another.
    nested = add_special_tokens(ByteTokenizer(), ["<a>", "<a><b>"])
    assert nested.encode("<a><b><a>") == [260, 259]
    with pytest.raises(ValueError, match=r"tokens repeat: \['<a>'\]"):
        add_special_tokens(ByteTokenizer(), ["<a>", "<a>"])
    with pytest.raises(ValueError, match=r"tokens\[1\] must be a non-empty str"):
        add_special_tokens(ByteTokenizer(), ["<a>", ""])
    with pytest.raises(TypeError, match="not a single str"):
        add_special_tokens(ByteTokenizer(), "<a>")
    with pytest.raises(KeyError, match="not one of the added special tokens"):
        more.token_id("<b>")


@pytest.mark.parametrize("template", ["chatml", "meditron"])
def test_answer_mask_decodes_to_the_answer_for_each_tokenizer(template, base_tokenizer):
    tok = add_special_tokens(base_tokenizer, prompts.CHATML_TOKENS)
    records = [
        {"prompt": "def wrap(text):", "answer": "return text"},
        {"prompt": "x = 1", "answer": "y"},
    ]
    (batch,) = prompts.prompt_answer_eval_batches(
        records, tok, 80, 2, template=template, system="Answer."
    )
    for row, record in enumerate(records):
        answer_ids = batch["targets"][row][batch["loss_mask"][row] == 1]
        prompt_text, answer_text = expected_texts(
            template, record["prompt"], record["answer"], "Answer."
        )
        assert tok.decode(answer_ids) == answer_text
        ids = batch["inputs"][row][batch["segment_ids"][row] == 1]  # the whole example
        prompt_ids = ids[: len(ids) - len(answer_ids)]
        assert tok.decode(prompt_ids) == prompt_text
        np.testing.assert_array_equal(ids[len(prompt_ids) :], answer_ids)


@pytest.mark.parametrize("template", ["none", "chatml", "meditron"])
def test_encode_prompt_is_the_training_prompt(template, byte_chatml):
    record = prompts.Record("What is 2 + 2?", "4", system="Be brief.")
    tokens, is_answer = prompts.encode_example(record, byte_chatml, template=template)
    prompt = prompts.encode_prompt(
        record.prompt, byte_chatml, template=template, system=record.system
    )
    if template == "meditron":  # the prompt opens the answer message, as at evaluation
        assert byte_chatml.decode(prompt).endswith(f"{END}\n{START}answer\n")
        header = len(byte_chatml.encode(f"{START}answer\n"))  # trained as answer tokens
        assert prompt == tokens[: len(prompt)].tolist()
        assert is_answer.tolist() == [False] * (len(prompt) - header) + [True] * (
            len(tokens) - len(prompt) + header
        )
    else:
        assert prompt == tokens[~is_answer].tolist()
