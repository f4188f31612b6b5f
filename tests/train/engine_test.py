"""The engine's general parts: objectives with frozen models (KL to a teacher, a Llama teacher for a
Mamba student), init_from (hf:, run:, partial, mapping), frozen parameters, per-source evaluation
and activation pinning, against independent computations."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from configs import lm_smoke, mamba_lm
from jaxlab import models
from jaxlab.data import pipeline
from jaxlab.objectives import loss_sums, model_logits
from jaxlab.train import feed, loop
from jaxlab.train.checkpoint import Checkpointer
from tests.hf_utils import make_hf_model
from tests.train.overrides import configure


def smoke(**overrides):
    return configure(lm_smoke.get_config(), **overrides)


def by_name(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(tree)}


def first_batch(config, exp, keys=loop.MODEL_INPUTS):
    iterator = pipeline.train_iterator(
        config.data, exp.tokenizer, config.seq_len, config.batch_size
    )
    return {k: v for k, v in next(iter(iterator)).items() if k in keys}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A finished 4-step lm_smoke run with checkpoints at steps 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("teacher"))
    loop.train_and_evaluate(smoke(num_steps=4, checkpoint_every=2, eval_every=4), workdir)
    return workdir


def source_params(workdir, step):
    exp = loop.build_experiment(smoke(num_steps=4))
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    state, _, _ = checkpointer.restore(step, exp.abstract_state)
    checkpointer.close()
    return state.params


def test_kl_to_an_exact_copy_of_the_student_is_zero_with_zero_gradients(teacher_dir):
    config = smoke(
        init_from=f"run:{teacher_dir}",
        **{"objective.name": "distill_kl", "objective.teacher": f"run:{teacher_dir}"},
    )
    exp = loop.build_experiment(config)
    params, _ = loop.initial_params(exp)
    frozen = loop.load_frozen(exp)
    batch = feed.on_devices(first_batch(config, exp), exp.mesh)
    grads, _, metrics = jax.jit(exp.objective.gradients)(
        params, batch, frozen, (), jax.random.PRNGKey(0)
    )
    # Zero up to float32 rounding: XLA fuses the teacher's forward and the differentiated
    # student's forward differently, so their logits agree to ~1e-7, not bitwise.
    assert 0.0 <= float(metrics["loss"]) < 1e-7 and float(metrics["kl"]) == float(metrics["loss"])
    assert float(metrics["ce"]) > 1.0  # the model itself is far from perfect
    ce_grads = jax.grad(
        lambda p: loss_sums(exp.graphdef, p, batch)[0] / loss_sums(exp.graphdef, p, batch)[1]
    )(params)
    assert float(optax.tree.norm(grads)) < 1e-5 * float(optax.tree.norm(ce_grads))


def numpy_kl(teacher_logits, student_logits, temperature):
    def log_softmax(x):
        x = np.asarray(x, np.float64) / temperature
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(teacher_logits), log_softmax(student_logits)
    return temperature**2 * np.sum(np.exp(lp) * (lp - lq), axis=-1)


def numpy_ce(logits, targets):
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]


def test_a_llama_teacher_trains_a_mamba_student_on_the_mesh(teacher_dir, tmp_path):
    config = mamba_lm.get_config("mamba2")
    config.update(
        num_steps=3,
        batch_size=8,
        seq_len=32,
        eval_every=3,
        eval_batches=1,
        checkpoint_every=3,
        log_every=1,
    )
    config.data.sources = ("embedded:json", "embedded:email")
    config.model.update(hidden_size=32, num_layers=2, head_dim=16, max_seq_len=64)
    config.optim.warmup_steps = 1
    configure(
        config,
        **{
            "mesh.data": 4,
            "mesh.fsdp": 2,
            "objective.name": "distill_kl",
            "objective.teacher": f"run:{teacher_dir}",
            "objective.temperature": 2.0,
            "objective.ce_weight": 0.5,
        },
    )
    exp = loop.build_experiment(config)
    assert exp.model_config.name == "mamba" and exp.frozen["teacher"].model_config.name == "llama"
    frozen = loop.load_frozen(exp)
    assert "fsdp" in str(frozen["teacher"]["embed"].sharding.spec)  # the teacher is sharded too
    state = loop.init_state(exp)
    host_batch = first_batch(config, exp)
    batch = feed.on_devices(host_batch, exp.mesh)
    train_step, _ = loop.compile_steps(exp)
    params = jax.device_get(state.params)
    _, metrics = train_step(state, batch, frozen)

    # Independent: each model called on its own, float64 KL and CE in NumPy.
    def logits(model_config, p):
        # One compiled forward from the abstract model: op-by-op, the initialisation and the
        # forward each compile dozens of small programs (the values are the same).
        abstract = nnx.eval_shape(lambda: models.build(model_config, nnx.Rngs(0)))
        graphdef, _ = nnx.split(abstract, nnx.Param)
        forward = jax.jit(model_logits, static_argnums=0)
        return np.asarray(forward(graphdef, p, jax.tree.map(jnp.asarray, host_batch)))

    student = logits(exp.model_config, params)
    teacher = logits(exp.frozen["teacher"].model_config, jax.device_get(frozen["teacher"]))
    mask = host_batch["loss_mask"].astype(np.float64)
    kl = numpy_kl(teacher, student, 2.0)
    ce = numpy_ce(student, host_batch["targets"])
    expected = np.sum((kl + 0.5 * ce) * mask) / mask.sum()
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-4)
    assert float(metrics["kl"]) == pytest.approx(np.sum(kl * mask) / mask.sum(), rel=1e-4)

    summary = loop.train_and_evaluate(config, str(tmp_path))
    records = [r for r in loop.read_metrics(str(tmp_path)) if "kl" in r]
    assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)
    assert summary.state.params["embed"].sharding.mesh.size == 8


def test_init_from_hf_gives_the_transformers_loss(tmp_path):
    hf_model = make_hf_model("gqa_untied", seed=5, vocab_size=259)
    hf_model.save_pretrained(str(tmp_path))
    model = dict(
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        tie_embeddings=False,
        rms_norm_eps=1e-5,
    )
    config = smoke(init_from=f"hf:{tmp_path}", **{f"model.{k}": v for k, v in model.items()})
    exp = loop.build_experiment(config)
    params, report = loop.initial_params(exp)
    assert report["kept"] == [] and report["unused"] == []
    _, eval_step = loop.compile_steps(exp)
    tokens = np.random.default_rng(0).integers(0, 259, (8, 33))
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((8, 32), np.int32),
        "segment_ids": np.ones((8, 32), np.int32),
        "positions": np.broadcast_to(np.arange(32), (8, 32)).copy(),
    }
    out = eval_step(params, feed.on_devices(batch, exp.mesh))
    ours = float(out["loss_sum"]) / float(out["tokens"])
    with torch.no_grad():
        theirs = hf_model(torch.tensor(tokens), labels=torch.tensor(tokens)).loss.item()
    assert abs(ours - theirs) <= 1e-4

    config.model.rope_theta = 500000.0
    with pytest.raises(ValueError, match="rope_theta"):
        loop.initial_params(loop.build_experiment(config))


def test_init_from_run_is_bitwise_and_mismatches_name_the_parameter(teacher_dir):
    for spec, step in ((f"run:{teacher_dir}", 4), (f"run:{teacher_dir}@2", 2)):
        exp = loop.build_experiment(smoke(init_from=spec))
        params, _ = loop.initial_params(exp)
        expected = by_name(source_params(teacher_dir, step))
        got = by_name(params)
        assert got.keys() == expected.keys()
        for name in got:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    with pytest.raises(ValueError, match="no checkpoint 3"):
        loop.initial_params(loop.build_experiment(smoke(init_from=f"run:{teacher_dir}@3")))

    wide = smoke(
        init_from=f"run:{teacher_dir}", init_from_mode="partial", **{"model.hidden_size": 48}
    )
    with pytest.raises(
        ValueError,
        match=r"parameter embed has shape \(259, 32\) there, the "
        r"model's is \(259, 48\)",
    ):
        loop.initial_params(loop.build_experiment(wide))
    with pytest.raises(ValueError, match="hidden_size"):  # exact mode checks the architecture
        loop.initial_params(loop.build_experiment(configure(wide, init_from_mode="exact")))

    # Partial with a rename: the 3-layer model takes source layer 0 as its layer 0 and source
    # layer 1 as its layer 2; its layer 1, which no source parameter lands on, stays random.
    deep = smoke(
        init_from=f"run:{teacher_dir}",
        init_from_mode="partial",
        init_from_map=(("layers/1", "layers/2"),),
        **{"model.num_layers": 3},
    )
    exp = loop.build_experiment(deep)
    params, report = loop.initial_params(exp)
    assert report["kept"] and all(n.startswith("layers/1/") for n in report["kept"])
    assert "layers/2/attn/q_proj" in report["copied"] and report["unused"] == []
    source = source_params(teacher_dir, 4)
    np.testing.assert_array_equal(
        params["layers"][2]["mlp"]["up_proj"], source["layers"][1]["mlp"]["up_proj"]
    )
    np.testing.assert_array_equal(
        params["layers"][0]["attn"]["q_proj"], source["layers"][0]["attn"]["q_proj"]
    )
    random = loop.init_state(loop.build_experiment(configure(deep, init_from=""))).params
    np.testing.assert_array_equal(
        params["layers"][1]["attn"]["q_proj"], random["layers"][1]["attn"]["q_proj"]
    )
    # Renames that collide, match nothing, or are not pairs are errors naming the field.
    errors = [
        ((("layers/0", "layers/1"),), "both map to layers/1"),
        ((("blocks/0", "layers/0"),), "no parameter .* starts with 'blocks/0'"),
        (("layers/0", "layers/1"), "init_from_map entries must be"),
    ]
    for mapping, message in errors:
        with pytest.raises(ValueError, match=message):
            renamed = configure(deep, init_from=f"run:{teacher_dir}", init_from_map=mapping)
            loop.initial_params(loop.build_experiment(renamed))


def test_resuming_takes_precedence_over_init_from(teacher_dir, tmp_path):
    config = smoke(init_from=f"run:{teacher_dir}", num_steps=4)
    loop.train_and_evaluate(config, str(tmp_path), stop_at=2)
    record = json.loads((tmp_path / "init_from.json").read_text())
    assert record["source"] == f"run:{teacher_dir}@4" and record["kept"] == []  # pinned
    resumed = loop.train_and_evaluate(config, str(tmp_path))
    assert resumed.start_step == 2 and resumed.init_from is None


def test_frozen_parameters_stay_bitwise_and_get_no_moments(tmp_path):
    config = smoke(num_steps=3, **{"optim.frozen": ("embed", "layers/0/")})
    summary = loop.train_and_evaluate(config, str(tmp_path))
    exp, state = summary.experiment, summary.state
    start = by_name(loop.init_state(exp).params)
    end = by_name(state.params)
    frozen = [n for n in end if "embed" in n or "[0]" in n]
    trained = [n for n in end if n not in frozen]
    assert frozen and trained
    for name in frozen:
        np.testing.assert_array_equal(end[name], start[name], err_msg=name)
    assert all(not np.array_equal(end[n], start[n]) for n in trained)
    # AdamW keeps two moments per trained element and nothing per frozen one.
    moment_elements = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moment_elements == 2 * sum(end[n].size for n in trained)
    with pytest.raises(ValueError, match="config.optim.frozen"):
        loop.build_experiment(smoke(**{"optim.frozen": ("no_such_parameter",)}))


def test_per_source_evaluation_equals_each_source_alone(tmp_path):
    config = smoke(num_steps=2, eval_every=2)
    config.data.sources = ("embedded:email", "embedded:asyncio")  # both have held-out files
    summary = loop.train_and_evaluate(config, str(tmp_path))
    exp, params = summary.experiment, summary.state.params
    _, eval_step = loop.compile_steps(exp)
    for source in ("email", "asyncio"):
        alone = smoke()
        alone.data.sources = (f"embedded:{source}",)
        batches = pipeline.eval_batches(
            alone.data, exp.tokenizer, alone.seq_len, alone.batch_size, alone.eval_batches
        )
        expected = loop.evaluate(exp, params, batches, eval_step)["eval_loss"]
        assert summary.eval[f"eval_loss/{source}"] == pytest.approx(expected, rel=1e-6)
    last = [r for r in loop.read_metrics(str(tmp_path)) if "eval_loss" in r][-1]
    assert {"eval_loss/asyncio", "eval_perplexity/email"} <= set(last)
    assert json.loads((tmp_path / "eval.json").read_text())["eval_loss/email"] == pytest.approx(
        last["eval_loss/email"]
    )


def test_the_lowered_train_step_pins_activations_on_an_fsdp_mesh():
    exp = loop.build_experiment(smoke(**{"mesh.data": 1, "mesh.fsdp": 8}))
    train_step, _ = loop.compile_steps(exp)
    batch = {k: jax.ShapeDtypeStruct((8, 32), jnp.int32) for k in loop.MODEL_INPUTS}
    text = train_step.lower(exp.abstract_state, batch, {}).as_text()
    constraints = text.count("sharding_constraint") + text.count("@Sharding")
    # Residual stream per layer and the logits, in the forward and backward passes.
    assert constraints >= 2 * (exp.model_config.num_layers + 2)


def test_finetuning_a_run_on_chatml_records_grows_the_vocabulary(teacher_dir, tmp_path):
    records = tmp_path / "qa.jsonl"
    rng = np.random.default_rng(0)
    with open(records, "w") as f:
        for _ in range(60):
            a, b = (int(x) for x in rng.integers(0, 50, 2))
            f.write(json.dumps({"question": f"{a} + {b} = ?", "answer": str(a + b)}) + "\n")
    spec = f"qa:{records}?prompt=question&answer=answer&template=chatml"
    config = smoke(
        init_from=f"run:{teacher_dir}", num_steps=2, eval_every=2, checkpoint_every=2, seq_len=64
    )
    config.data.update(
        sources=(spec,), special_tokens=("<|im_start|>", "<|im_end|>"), validation_fraction=0.2
    )
    exp = loop.build_experiment(config)
    assert exp.model_config.vocab_size == 261 and exp.tokenizer.vocab_size == 261
    params, report = loop.initial_params(exp)
    assert report["grown"] == {"embed": [259, 261]}
    source = source_params(teacher_dir, 4)
    np.testing.assert_array_equal(np.asarray(params["embed"])[:259], source["embed"])
    np.testing.assert_allclose(
        np.asarray(params["embed"])[259:],
        np.broadcast_to(np.mean(source["embed"], 0), (2, 32)),
        rtol=1e-6,
    )
    summary = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert np.isfinite(summary.eval["eval_loss"]) and summary.train["tokens"] > 0
    # Only answer tokens count: far fewer than the batch's 8 x 32 positions.
    assert summary.train["tokens"] < 0.5 * config.batch_size * config.seq_len
