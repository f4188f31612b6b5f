"""The seeded arithmetic task (jaxlab.data.reasoning) against a separate interpreter, its splits,
tokenizer and answer extraction, its greedy scoring (jaxlab.eval.reasoning), and training on it
through the engine with the loss on the answers only."""

import collections
import re

import jax
import numpy as np
import pytest
from flax import nnx

from configs import reasoning_lm
from jaxlab import models
from jaxlab.data import pipeline, reasoning
from jaxlab.data.tokenizers import CharTokenizer, load_tokenizer
from jaxlab.eval import reasoning as reasoning_eval
from jaxlab.train import loop
from tests.train.overrides import configure

SMALL = reasoning.ArithmeticTask(
    train_steps=(1, 4), test_steps=(5, 6), num_train=300, num_test=40, modulus=100, seed=3
)


def interpret(prompt: str, modulus: int) -> tuple[dict[str, int], dict[str, str], str]:
    """Runs a prompt's definitions as Python statements: ``(values, definitions, asked)``."""
    *statements, question = prompt.split(";")
    assert question.endswith("?")
    values, definitions = {}, {}
    for statement in statements:
        name, expression = statement.split("=")
        definitions[name] = expression
        # Zero-padded constants ("07") are no Python literals: read them as ints first.
        python = re.sub(r"\d+", lambda m: str(int(m.group())), expression)
        values[name] = eval(python, {}, dict(values)) % modulus
    return values, definitions, question[:-1]


@pytest.mark.parametrize(
    "task",
    [
        SMALL,
        reasoning.ArithmeticTask(
            train_steps=(2, 3),
            test_steps=7,
            num_train=100,
            num_test=20,
            modulus=7,
            ops=("add", "sub", "mul"),
            const_prob=0.3,
            seed=1,
        ),
    ],
)
def test_answers_and_every_chain_of_thought_line_match_a_separate_interpreter(task):
    width = len(str(task.modulus - 1))
    for problem in task.split("train") + task.split("test"):
        values, definitions, asked = interpret(problem.prompt, task.modulus)
        names = list(values)
        assert names == list("abcdefghijklmnopqrstuvwxyz"[: problem.steps + 1])
        assert asked == names[-1]
        assert problem.value == values[asked]
        assert problem.values == tuple(values.values())
        *lines, final = problem.answer.split(";")
        assert final == f"####{values[asked]:0{width}d}"
        assert len(lines) == problem.steps
        for name, line in zip(names[1:], lines, strict=True):
            # name=x op y=X op Y=R with X, Y the operands' values and R the step's value.
            defined, restated, substituted, result = line.split("=")
            assert (defined, restated) == (name, definitions[name])
            pattern = rf"([a-z]|\d{{{width}}})([-+*])([a-z]|\d{{{width}}})"  # padded constants
            x, op, y = re.fullmatch(pattern, definitions[name]).groups()
            assert x == names[names.index(name) - 1]  # the chain: each step uses the last value
            operands = [values[v] if v.isalpha() else int(v) for v in (x, y)]
            assert substituted == f"{operands[0]:0{width}d}{op}{operands[1]:0{width}d}"
            assert result == f"{values[name]:0{width}d}"
        assert reasoning.is_correct(problem.answer, problem.value)


def test_generation_is_a_function_of_the_seed():
    first = (SMALL.split("train"), SMALL.split("test"))
    reasoning._generated_split.cache_clear()  # draw them again, not from the process's cache
    again = reasoning.ArithmeticTask(**{**SMALL.__dict__})
    assert (again.split("train"), again.split("test")) == first
    other = reasoning.ArithmeticTask(**{**SMALL.__dict__, "seed": 4})
    assert [p.prompt for p in other.split("test")] != [p.prompt for p in SMALL.split("test")]


def test_a_split_is_drawn_once_and_is_a_new_list_each_call():
    train = SMALL.split("train")
    hits = reasoning._generated_split.cache_info().hits
    again = SMALL.split("train")
    assert reasoning._generated_split.cache_info().hits == hits + 1
    assert again is not train and all(a is b for a, b in zip(again, train, strict=True))
    train.clear()  # a caller's list, not the cached split
    assert len(SMALL.split("train")) == SMALL.num_train


def test_splits_are_disjoint_even_when_the_difficulties_overlap():
    # Modulus 3 with 1-2 steps has few distinct problems: raw draws collide with the test set.
    task = reasoning.ArithmeticTask(
        train_steps=(1, 2), test_steps=(1, 2), num_train=400, num_test=30, modulus=3, seed=0
    )
    test = [p.prompt for p in task.split("test")]
    train = [p.prompt for p in task.split("train")]
    assert len(set(test)) == len(test)
    assert not set(test) & set(train)
    first_draws = [
        task.problem(np.random.default_rng([0, 1, i, 0]), 1 + i % 2).prompt for i in range(400)
    ]
    assert set(first_draws) & set(test)  # so the exclusion had work to do
    impossible = reasoning.ArithmeticTask(
        train_steps=1, test_steps=1, num_train=1, num_test=200, modulus=2
    )
    with pytest.raises(ValueError, match="too few distinct problems for num_test=200"):
        impossible.split("test")


def test_difficulties_take_turns_so_each_has_its_share():
    assert collections.Counter(p.steps for p in SMALL.split("train")) == {
        1: 75,
        2: 75,
        3: 75,
        4: 75,
    }
    assert collections.Counter(p.steps for p in SMALL.split("test")) == {5: 20, 6: 20}
    task = reasoning.ArithmeticTask(train_steps=(1, 3), num_train=10, num_test=1)
    assert [p.steps for p in task.split("train")] == [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]


def test_extract_answer_reads_the_first_marker_and_refuses_malformed_text():
    assert reasoning.extract_answer("b=a+3=4+3=7;####7") == 7
    assert reasoning.extract_answer("####07") == 7
    assert reasoning.extract_answer("#### 42 and more") == 42
    assert reasoning.extract_answer("####-3") == -3
    assert reasoning.extract_answer("####3;####4") == 3
    malformed_outputs = ("", "b=a+3=4+3=7;", "####", "####;7", "###7", "#### -", "b=7;#### x5")
    for malformed in malformed_outputs + ("####;####5", "#####5", "#### ####5"):
        assert reasoning.extract_answer(malformed) is None, malformed
        assert not reasoning.is_correct(malformed, 7)
    assert reasoning.is_correct("####07", 7)
    assert not reasoning.is_correct("####08", 7)


def test_the_character_tokenizer_round_trips_every_example():
    tokenizer = load_tokenizer("reasoning")
    assert isinstance(tokenizer, CharTokenizer) and tokenizer.vocab_size == 46
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    used = set()
    for problem in SMALL.split("train") + SMALL.split("test"):
        text = problem.prompt + problem.answer
        ids = tokenizer.encode(text, add_bos=True, add_eos=True)
        assert len(ids) == len(text) + 2 and ids[0] == 1 and ids[-1] == 2
        assert tokenizer.decode(ids) == text
        assert [tokenizer.alphabet[i - 3] for i in ids[1:-1]] == list(text)
        used |= set(text)
    assert used <= set(reasoning.ALPHABET)
    with pytest.raises(ValueError, match=r"text\[2\] = ' ' is not in this CharTokenizer"):
        tokenizer.encode("a= 3")
    with pytest.raises(ValueError, match="alphabet characters repeat: \\['a'\\]"):
        CharTokenizer("aba")


def test_spec_strings_name_tasks_and_reject_unknown_keys():
    task = reasoning.parse_spec(
        "reasoning:train=2-5&test=9&num_train=7&num_test=3&modulus=10&ops=add,mul&const_prob=0.25"
    )
    assert task == reasoning.ArithmeticTask(
        train_steps=(2, 5),
        test_steps=(9, 9),
        num_train=7,
        num_test=3,
        modulus=10,
        ops=("add", "mul"),
        const_prob=0.25,
    )
    assert reasoning.parse_spec("reasoning") == reasoning.ArithmeticTask()
    with pytest.raises(ValueError, match="unknown key 'step'"):
        reasoning.parse_spec("reasoning:step=3")
    with pytest.raises(ValueError, match="test must be N or LOW-HIGH"):
        reasoning.parse_spec("reasoning:test=x")
    with pytest.raises(ValueError, match=r"train_steps must be .* got \(5, 2\)"):
        reasoning.parse_spec("reasoning:train=5-2")
    with pytest.raises(ValueError, match="ops must be distinct names"):
        reasoning.parse_spec("reasoning:ops=add,div")


def test_exact_match_counts_malformed_outputs_apart():
    problems = SMALL.split("test")[:4]
    outputs = [problems[0].answer, "####", f"####{(problems[2].value + 1) % 100}", ""]
    counts = reasoning_eval.exact_match(problems, outputs)
    assert counts == {
        5: {"total": 2, "correct": 1, "malformed": 0},  # problems 0 (right) and 2 (wrong)
        6: {"total": 2, "correct": 0, "malformed": 2},
    }


def test_greedy_outputs_are_the_decoded_greedy_continuations():
    tokenizer = load_tokenizer("reasoning")
    config = models.make_config(
        dict(
            name="llama",
            vocab_size=46,
            hidden_size=16,
            intermediate_size=32,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            max_seq_len=128,
        )
    )
    model = models.build(config, nnx.Rngs(0))
    problems = SMALL.split("test")[:3]
    outputs = reasoning_eval.greedy_outputs(
        model, tokenizer, problems, max_new_tokens=6, batch_size=2
    )
    graphdef, state = nnx.split(model)

    @jax.jit
    def logits(ids):  # a full forward pass; padding after the last real token changes nothing
        return nnx.merge(graphdef, state)(ids)[0]

    assert len(outputs) == 3
    for problem, text in zip(problems, outputs, strict=True):
        ids = tokenizer.encode(problem.prompt, add_bos=True)
        start = len(ids)
        for _ in range(6):  # greedy by hand: the argmax of the full forward at the last token
            padded = np.zeros((1, 128), np.int32)
            padded[0, : len(ids)] = ids
            next_id = int(np.argmax(np.asarray(logits(padded))[len(ids) - 1]))
            ids.append(next_id)
            if next_id == tokenizer.eos_id:
                break
        assert text == tokenizer.decode(ids[start:])


def small_config(**overrides):
    config = reasoning_lm.get_config()
    config.data.sources = ("reasoning:train=1-2&test=3&num_train=64&num_test=8&modulus=10&seed=5",)
    config.mesh.update(num_devices=1)
    config.model.update(
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=96,
    )
    config.optim.warmup_steps = 1
    return configure(
        config,
        num_steps=3,
        batch_size=4,
        seq_len=80,
        eval_every=3,
        checkpoint_every=3,
        eval_batches=1,
        log_every=1,
        **overrides,
    )


def test_batches_put_the_loss_on_the_chain_of_thought_and_answer_only():
    config = small_config()
    tokenizer = pipeline.make_tokenizer(config.data)
    task = reasoning.parse_spec(config.data.sources[0])
    train_answers = {p.prompt: p.answer for p in task.split("train")}
    question = tokenizer.encode("?")[0]
    batch = next(pipeline.train_iterator(config.data, tokenizer, 80, 4))
    examples = 0
    for row in range(4):
        inputs, targets = batch["inputs"][row], batch["targets"][row]
        segments, mask = batch["segment_ids"][row], batch["loss_mask"][row]
        for segment in set(segments[segments > 0].tolist()):
            where = np.flatnonzero(segments == segment)
            tokens = inputs[where]
            if tokens[-1] != tokenizer.eos_id:  # the example ends with the row: eos is a target
                tokens = np.append(tokens, targets[where[-1]])
            assert tokens[0] == tokenizer.bos_id and tokens[-1] == tokenizer.eos_id
            cut = int(np.flatnonzero(tokens == question)[0])  # the prompt ends at "?"
            prompt, answer = (
                tokenizer.decode(tokens[: cut + 1]),
                tokenizer.decode(tokens[cut + 1 :]),
            )
            assert train_answers[prompt] == answer
            # Target j is token j + 1: the loss covers the answer and eos, nothing before, and
            # not the next example's first token after eos.
            j = np.arange(len(where))
            expected = ((j + 1 > cut) & (j + 1 < len(tokens))).astype(np.int32)
            np.testing.assert_array_equal(mask[where], expected)
            examples += 1
        assert mask[segments == 0].sum() == 0
    assert examples > 4  # packed: several examples per row
    held_out = pipeline.eval_batches(config.data, tokenizer, 80, 4, 1)[0]
    test_prompts = {p.prompt for p in task.split("test")}
    starts = np.flatnonzero(held_out["positions"][0] == 0)
    first = held_out["inputs"][0][starts[0] : starts[1] if len(starts) > 1 else None]
    assert tokenizer.decode(first).split("?")[0] + "?" in test_prompts


def test_the_engine_trains_on_the_task_with_the_answer_only_loss(tmp_path):
    config = small_config()
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary.experiment.model_config.vocab_size == 46
    first = pipeline.train_iterator(config.data, summary.experiment.tokenizer, 80, 4)
    masks = [int(next(first)["loss_mask"].sum()) for _ in range(3)]
    tokens = {r["step"]: r["tokens"] for r in loop.read_metrics(str(tmp_path)) if "tokens" in r}
    assert [tokens[s] for s in (1, 2, 3)] == masks  # each step's loss counts exactly the mask
    assert np.isfinite(summary.eval["eval_loss"]) and summary.eval["eval_loss"] < np.log(46) + 1
    with pytest.raises(ValueError, match="must be the only source"):
        pipeline.train_iterator(
            configure(
                small_config(), **{"data.sources": (config.data.sources[0], "embedded")}
            ).data,
            summary.experiment.tokenizer,
            80,
            4,
        )


def test_the_teacher_config_fits_its_longest_test_example():
    config = reasoning_lm.get_config()
    task = reasoning.parse_spec(config.data.sources[0])
    tokenizer = load_tokenizer(config.data.tokenizer)
    longest = max(
        len(tokenizer.encode(p.prompt + p.answer, add_bos=True, add_eos=True))
        for p in task.split("test")
    )
    assert longest <= config.seq_len + 1 <= config.model.max_seq_len + 1
    assert {p.steps for p in task.split("test")} == {8} and len(task.split("test")) == 500
