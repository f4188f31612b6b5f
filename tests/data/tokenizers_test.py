"""Tests for jaxlab.data.tokenizers against Python's codec, sentencepiece and transformers."""

import inspect
import json
import pickle
import random
import shutil
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece
import tokenizers as hf_tokenizers
import transformers

from jaxlab.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
)

CORPUS_LINES = [line for line in inspect.getsource(textwrap).splitlines() if line.strip()]


def random_texts(seed: int, count: int = 100) -> list[str]:
    """Seeded strings: corpus lines, a small alphabet with whitespace runs, and any code point."""
    rng = random.Random(seed)
    alphabet = "abc xyz 019\n\t  éö你好🙂"
    texts = []
    for i in range(count):
        length = rng.randint(0, 40)
        if i % 3 == 0:
            texts.append(rng.choice(CORPUS_LINES))
        elif i % 3 == 1:
            texts.append("".join(rng.choice(alphabet) for _ in range(length)))
        else:  # Any code point but the surrogates, which UTF-8 cannot encode.
            ranges = [(1, 0xD7FF), (0xE000, 0x10FFFF)]
            texts.append("".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(length)))
    return texts


# ByteTokenizer.


def test_byte_ids_are_utf8_bytes_and_round_trip():
    tok = ByteTokenizer()
    for text in random_texts(seed=0, count=300):
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    text = "héllo 你好 🙂"
    ids = list(text.encode("utf-8"))
    assert tok.decode(np.array(ids, np.int32)) == text
    assert tok.decode(jnp.array(ids, jnp.int32)) == text
    assert tok.decode([]) == ""
    assert tok.encode_batch(["ab", "", "é"]) == [[97, 98], [], [0xC3, 0xA9]]


def test_byte_special_ids_flags_and_decode_skips_them():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    text = "naïve ∑"
    body = list(text.encode("utf-8"))
    assert tok.encode(text, add_bos=True) == [257, *body]
    assert tok.encode(text, add_eos=True) == [*body, 258]
    assert tok.encode_batch([text], add_bos=True, add_eos=True) == [[257, *body, 258]]
    assert tok.decode([257, *body, 258, 256, 256]) == text


def test_byte_decode_replaces_invalid_utf8():
    tok = ByteTokenizer()
    for raw in (b"\xff\xfeab", "你好".encode()[:-1], b"a\x80\xc3"):
        assert tok.decode(list(raw)) == raw.decode("utf-8", errors="replace")


def test_byte_bad_input_errors():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match=r"ids\[1\] = 259 is outside \[0, 259\)"):
        tok.decode([65, 259])
    with pytest.raises(ValueError, match=r"ids\[0\] = -1"):
        tok.decode(np.array([-1, 65]))
    with pytest.raises(ValueError, match=r"1-D.*\(2, 1\)"):
        tok.decode([[65], [66]])
    with pytest.raises(TypeError, match="float"):
        tok.decode([65.0])
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        tok.encode(b"abc")
    with pytest.raises(TypeError, match="not a single str"):
        tok.encode_batch("abc")


def test_import_does_not_load_optional_packages():
    code = (
        "import sys, jaxlab.data.tokenizers; "
        "print(sorted({'sentencepiece', 'tokenizers', 'transformers'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# SentencePieceTokenizer.


def train_sentencepiece(model_prefix: str, **options) -> None:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS_LINES),
        model_prefix=model_prefix,
        vocab_size=400,  # byte_fallback needs 256 byte pieces + the corpus characters.
        byte_fallback=True,
        minloglevel=2,
        **options,
    )


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A Llama-style model (BPE, identity normalization, no pad) as dir/tokenizer.model."""
    directory = tmp_path_factory.mktemp("sp")
    train_sentencepiece(
        str(directory / "tokenizer"),
        model_type="bpe",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
    )
    return directory


@pytest.fixture(scope="module")
def sp_unigram_dir(tmp_path_factory):
    """A unigram model with SentencePiece's default normalizer and a pad id."""
    directory = tmp_path_factory.mktemp("sp_unigram")
    train_sentencepiece(str(directory / "tokenizer"), model_type="unigram", pad_id=3)
    return directory


@pytest.mark.parametrize("fixture", ["sp_dir", "sp_unigram_dir"])
def test_sentencepiece_matches_transformers(fixture, request):
    directory = request.getfixturevalue(fixture)
    tok = SentencePieceTokenizer(directory / "tokenizer.model")
    # transformers converts the model proto to its own Rust tokenizer, independent of the
    # sentencepiece runtime that SentencePieceTokenizer wraps.
    ref = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    texts = random_texts(seed=1)
    expected = [ref(text, add_special_tokens=False)["input_ids"] for text in texts]
    assert [tok.encode(text) for text in texts] == expected
    assert tok.encode_batch(texts) == expected
    assert tok.vocab_size == len(ref)
    assert (tok.bos_id, tok.eos_id) == (ref.bos_token_id, ref.eos_token_id)


def test_sentencepiece_round_trip_and_special_ids(sp_dir, sp_unigram_dir):
    tok = SentencePieceTokenizer(sp_dir / "tokenizer.model")
    for text in random_texts(seed=2):
        assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text
    # Set by the trainer options: unk=0, bos=1, eos=2 by default, pad off (-1) unless given.
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (None, 1, 2)
    unigram = SentencePieceTokenizer(sp_unigram_dir / "tokenizer.model")
    assert (unigram.pad_id, unigram.bos_id, unigram.eos_id) == (3, 1, 2)
    assert unigram.decode([3, 1, *unigram.encode("def wrap"), 2, 3]) == "def wrap"


def test_sentencepiece_flags_match_library_flags(sp_dir):
    model_file = str(sp_dir / "tokenizer.model")
    tok = SentencePieceTokenizer(model_file)
    texts = random_texts(seed=3, count=30)
    for add_bos in (False, True):
        for add_eos in (False, True):
            ref = sentencepiece.SentencePieceProcessor(
                model_file=model_file, add_bos=add_bos, add_eos=add_eos
            )
            assert tok.encode_batch(texts, add_bos=add_bos, add_eos=add_eos) == [
                ref.encode(text, out_type=int) for text in texts
            ]


def test_sentencepiece_errors(sp_dir, tmp_path):
    tok = SentencePieceTokenizer(sp_dir / "tokenizer.model")
    with pytest.raises(ValueError, match=r"ids\[0\] = 400 is outside \[0, 400\)"):
        tok.decode([400])
    with pytest.raises(ValueError, match="add_bos=True.*no bos"):
        SentencePieceTokenizer(_model_without_bos(tmp_path)).encode("x", add_bos=True)
    with pytest.raises(FileNotFoundError, match="model_file.*missing.model"):
        SentencePieceTokenizer(tmp_path / "missing.model")


def _model_without_bos(tmp_path) -> str:
    train_sentencepiece(str(tmp_path / "nobos"), model_type="bpe", bos_id=-1)
    return str(tmp_path / "nobos.model")


# HFTokenizer.


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json with a tokenizer_config.json beside it.

    Its post-processor adds <s> ... </s>, which HFTokenizer must leave to add_bos/add_eos.
    """
    directory = tmp_path_factory.mktemp("hf")
    tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
    tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf_tokenizers.decoders.ByteLevel()
    trainer = hf_tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS_LINES, trainer=trainer)
    tok.post_processor = hf_tokenizers.processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    tok.save(str(directory / "tokenizer.json"))
    bos = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "rstrip": False}
    bos |= {"normalized": False, "single_word": False, "special": True}
    config = {"bos_token": bos, "eos_token": "</s>", "pad_token": "<pad>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_hf_matches_transformers(hf_dir):
    tok = HFTokenizer(hf_dir / "tokenizer.json")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    texts = random_texts(seed=4)
    expected = [ref(text, add_special_tokens=False)["input_ids"] for text in texts]
    assert [tok.encode(text) for text in texts] == expected
    assert tok.encode_batch(texts) == expected
    for text, ids in zip(texts, expected, strict=True):
        assert tok.decode(ids) == text
    assert tok.vocab_size == len(ref)


def test_hf_special_ids_from_config_match_transformers(hf_dir):
    tok = HFTokenizer(hf_dir)
    ref = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (
        ref.pad_token_id,
        ref.bos_token_id,
        ref.eos_token_id,
    )
    for text in random_texts(seed=5, count=30):
        # The tokenizer's own post-processor adds <s> ... </s>; our flags must do the same.
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids == ref(text)["input_ids"]
        assert tok.decode([*ids, tok.pad_id, tok.pad_id]) == text


def test_hf_special_ids_by_common_names_without_config(hf_dir, tmp_path):
    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = HFTokenizer(tmp_path)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    expected = ref.convert_tokens_to_ids(["<pad>", "<s>", "</s>"])
    assert [tok.pad_id, tok.bos_id, tok.eos_id] == expected


def test_hf_config_null_token_and_special_tokens_map(hf_dir, tmp_path):
    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {"bos_token": None, "eos_token": {"content": "<pad>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    # The map fills keys the config lacks (pad) but does not override those it has (bos).
    tokens_map = {"bos_token": "<s>", "pad_token": "</s>"}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(tokens_map))
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
        None,
        ref.convert_tokens_to_ids("<pad>"),
        ref.convert_tokens_to_ids("</s>"),
    )
    with pytest.raises(ValueError, match="add_bos=True but this HFTokenizer has no bos id"):
        tok.encode("x", add_bos=True)


def test_hf_errors(hf_dir, tmp_path):
    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match=r"eos_token in .*tokenizer_config.json.*'<\|nope\|>'"):
        HFTokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json file or a directory"):
        HFTokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"ids\[2\] = 400 is outside \[0, 400\)"):
        HFTokenizer(hf_dir).decode(np.array([5, 6, 400]))


def test_hf_bad_files_name_the_file_and_the_problem(hf_dir, tmp_path):
    file = tmp_path / "tokenizer.json"
    cut = '{"version": "1.0", "model": '
    file.write_text(cut)  # cut short
    with pytest.raises(
        ValueError,
        match=r"tokenizer.json: not valid JSON: Expecting value at "
        rf"line 1, column {len(cut) + 1}",
    ):
        HFTokenizer(file)
    file.write_bytes(b'{"version": "\xff"}')
    with pytest.raises(ValueError, match=r"tokenizer.json: not valid UTF-8: byte 0xff at line 1"):
        HFTokenizer(file)
    file.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"tokenizer.json: expected a JSON object.*got list"):
        HFTokenizer(file)
    file.write_text(json.dumps({"version": "1.0", "model": {"type": "NoSuchModel"}}))
    with pytest.raises(
        ValueError,
        match=r"tokenizer.json: not a tokenizer the Hugging Face "
        r"tokenizers library can read: .*",
    ):
        HFTokenizer(file)
    # A valid file with an empty vocabulary.
    hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE()).save(str(file))
    with pytest.raises(
        ValueError,
        match=r"tokenizer.json: the vocabulary is empty \(no tokens "
        r"in the model or added tokens\)",
    ):
        HFTokenizer(tmp_path)
    shutil.copy(hf_dir / "tokenizer.json", file)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_text('{"eos_token": "</s>",\n "bos_token": <s>}')
        column = ' "bos_token": <s>}'.index("<") + 1
        with pytest.raises(
            ValueError,
            match=rf"{name}: not valid JSON: Expecting value at line 2, "
            rf"column {column}",
        ):
            HFTokenizer(tmp_path)
        (tmp_path / name).write_text('"</s>"')
        with pytest.raises(ValueError, match=rf"{name}: expected a JSON object.*got str"):
            HFTokenizer(tmp_path)
        (tmp_path / name).write_text(json.dumps({"eos_token": 7}))
        with pytest.raises(
            ValueError,
            match=rf"eos_token in .*{name} must be a token string, "
            r"null or an object with a string \"content\", "
            r"got 7",
        ):
            HFTokenizer(tmp_path)
        (tmp_path / name).unlink()


# load_tokenizer.


@pytest.mark.parametrize(
    ("spec", "expected_type"),
    [
        (None, ByteTokenizer),
        ("byte", ByteTokenizer),
        ("{sp}/tokenizer.model", SentencePieceTokenizer),
        ("{sp}", SentencePieceTokenizer),
        ("{hf}/tokenizer.json", HFTokenizer),
        ("{hf}", HFTokenizer),
    ],
)
def test_load_tokenizer_dispatch(spec, expected_type, sp_dir, hf_dir):
    if spec is not None:
        spec = spec.format(sp=sp_dir, hf=hf_dir)
    tok = load_tokenizer(spec)
    assert type(tok) is expected_type
    if expected_type is HFTokenizer:
        ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    elif expected_type is SentencePieceTokenizer:
        ref = transformers.AutoTokenizer.from_pretrained(sp_dir, local_files_only=True)
    else:
        assert tok.encode("wrap") == list(b"wrap")
        return
    assert (
        tok.encode("def wrap(text):")
        == ref("def wrap(text):", add_special_tokens=False)["input_ids"]
    )


@pytest.mark.parametrize("spec", [None, "{sp}", "{hf}"])
def test_tokenizers_pickle(spec, sp_dir, hf_dir):
    # grain sends the tokenizer to its worker processes by pickling it.
    if spec is not None:
        spec = spec.format(sp=sp_dir, hf=hf_dir)
    text = "def wrap(text): 你好"
    original = load_tokenizer(spec)
    copy = pickle.loads(pickle.dumps(original))
    assert copy.encode(text, add_bos=True) == original.encode(text, add_bos=True)
    assert (copy.vocab_size, copy.pad_id, copy.bos_id, copy.eos_id) == (
        original.vocab_size,
        original.pad_id,
        original.bos_id,
        original.eos_id,
    )


def test_load_tokenizer_prefers_tokenizer_json_in_a_directory(sp_dir, hf_dir, tmp_path):
    shutil.copy(sp_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    assert isinstance(load_tokenizer(str(tmp_path)), HFTokenizer)


def test_load_tokenizer_bad_spec(tmp_path):
    missing = str(tmp_path / "nothing_here")
    with pytest.raises(FileNotFoundError, match=f"'{missing}' does not exist; expected None"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="'bytes' does not exist"):
        load_tokenizer("bytes")
    with pytest.raises(ValueError, match="fits no tokenizer; expected .*tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="vocab.txt' fits no tokenizer"):
        load_tokenizer(tmp_path / "vocab.txt")
