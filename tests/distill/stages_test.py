"""Distillation stages (experiments/distill_stages.py with configs/distill_mohawk.py and
configs/distill_mambainllama.py) on a tiny Llama teacher: the stages run in the configured order,
each from the previous one's run, each with its own schedule (read back from its metrics); frozen
parameters (MLPs, norms, embedding, attention) are bitwise the teacher's after the stages that
freeze them, while the mixers change; a first stage with ``init="source"`` starts from the model
the caller names."""

import json
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import distill_mambainllama, distill_mohawk, lm_smoke
from experiments import distill_stages
from jaxlab import models
from jaxlab.train import loop, pretrained

LAYERS = 3


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A 2-step lm_smoke Llama with 3 layers (hidden 32, 4 heads, 2 KV heads)."""
    workdir = str(tmp_path_factory.mktemp("teacher"))
    config = lm_smoke.get_config()
    config.update(num_steps=2, checkpoint_every=2, eval_every=2, eval_batches=1)
    config.model.num_layers = LAYERS
    loop.train_and_evaluate(config, workdir)
    return workdir


def shrink(config, teacher_dir, steps, learning_rates):
    """The stage config at lm_smoke's size, ``steps`` and peak rates per stage, one warm-up
    step, every step logged."""
    smoke = lm_smoke.get_config()
    config.update(batch_size=8, seq_len=32, eval_batches=1, log_every=1)
    config.data = smoke.data
    config.model.update(
        hidden_size=32,
        num_layers=LAYERS,
        intermediate_size=64,
        head_dim=8,  # 4 SSM heads, one per teacher head
        state_size=8,
        chunk_size=16,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=64,
    )
    config.objective.teacher = f"run:{teacher_dir}"
    for name, n, lr in zip(config.stage_order, steps, learning_rates, strict=True):
        config.stages[name].update(
            num_steps=n, eval_every=n, checkpoint_every=n, warmup_fraction=0.5 / n
        )  # the warm-up follows num_steps: one step
        config.stages[name].optim.learning_rate = lr
    return config


def learning_rates(workdir):
    records = [r for r in loop.read_metrics(workdir) if "learning_rate" in r]
    return [r["learning_rate"] for r in sorted(records, key=lambda r: r["step"])]


def wsd(peak, n, warmup, fraction):
    """Warm-up from 0, flat, then a linear decay to 0 over the last round(fraction * n) steps."""
    cooldown = min(max(round(fraction * n), 1), n - warmup)
    stable = n - warmup - cooldown
    return [
        peak * t / warmup
        if t < warmup
        else peak * (1 - min(max((t - warmup - stable) / cooldown, 0), 1))
        for t in range(n)
    ]


def cosine(peak, n, warmup, final_fraction):
    span = n - warmup
    return [
        peak * t / warmup
        if t < warmup
        else peak
        * (
            (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / span))
            + final_fraction
        )
        for t in range(n)
    ]


def flat(params):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(params)}


def initial_mixers(exp):
    """The random parameters a stage's new mixers start from (``config.seed``)."""
    model = models.build(exp.model_config, nnx.Rngs(exp.config.seed))
    return flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def teacher_name(name):
    """A student block parameter's name in the Llama teacher."""
    return name.replace("post_mixer_norm", "post_attention_norm")


def split(params, kind):
    return {k: v for k, v in params.items() if kind in k}


def test_mohawk_stages_run_in_order_with_their_schedules_and_frozen_mlps(teacher_dir, tmp_path):
    config = shrink(distill_mohawk.get_config(), teacher_dir, (4, 4, 2), (1e-3, 2e-3, 3e-3))
    for name in config.stage_order:
        config.stages[name].optim.wsd_decay_fraction = 0.5
    workdir = str(tmp_path)
    results = distill_stages.run_stages(config, workdir)

    with open(os.path.join(workdir, "stages.json")) as f:
        summary = json.load(f)
    assert [s["stage"] for s in summary] == ["matrix", "hidden", "kl"]
    assert [s["objective"] for s in summary] == ["mohawk_matrix", "mohawk_hidden", "distill_kl"]
    assert [s["init_from"] for s in summary] == [
        f"run:{teacher_dir}",
        f"run:{workdir}/0_matrix",
        f"run:{workdir}/1_hidden",
    ]
    assert [s["init_from_mode"] for s in summary] == ["partial", "exact", "exact"]
    # Each stage restarts its own WSD schedule: 0, flat at its peak, then the decay.
    for s, (n, peak) in zip(summary, ((4, 1e-3), (4, 2e-3), (2, 3e-3)), strict=True):
        np.testing.assert_allclose(learning_rates(s["workdir"]), wsd(peak, n, 1, 0.5), rtol=1e-6)
    assert learning_rates(summary[0]["workdir"])[1:] == pytest.approx([1e-3, 1e-3, 5e-4])
    metrics = [  # the last train record of each stage
        [r for r in loop.read_metrics(s["workdir"]) if "loss" in r][-1] for s in summary
    ]
    assert {"matrix_0", "matrix_2"} <= set(metrics[0]) and "hidden_2" in metrics[1]
    assert "kl" in metrics[2]

    teacher = flat(loop.load_frozen(results[0][1].experiment)["teacher"])
    start = initial_mixers(results[0][1].experiment)
    params = [flat(result.state.params) for _, result in results]
    for stage in (0, 1):  # the alignment stages: everything but the mixers is the teacher's
        frozen = {k: v for k, v in params[stage].items() if "['mixer']" not in k}
        assert len(frozen) == 1 + LAYERS * 5 + 1  # embed, per layer 2 norms + 3 MLP, final norm
        for name, value in frozen.items():
            np.testing.assert_array_equal(value, teacher[teacher_name(name)], err_msg=name)
    for i in range(LAYERS):  # and the mixers trained (what their matrices depend on)
        for part in ("in_proj", "conv_weight", "D"):
            name = f"['layers'][{i}]['mixer']['{part}']"
            assert not np.array_equal(params[0][name], start[name]), name
    assert any(
        not np.array_equal(v, params[0][k]) for k, v in split(params[1], "['mixer']").items()
    )
    # The KL stage trains everything.
    assert not np.array_equal(
        params[2]["['layers'][0]['mlp']['up_proj']"], teacher["['layers'][0]['mlp']['up_proj']"]
    )


def test_mambainllama_steps_replace_layers_with_the_rest_frozen_then_train_end_to_end(
    teacher_dir, tmp_path
):
    config = distill_mambainllama.get_config("50")
    config.model.num_layers = LAYERS
    distill_mambainllama.set_replacement(config, 50, per_step=1)
    config = shrink(config, teacher_dir, (3, 3, 2), (1e-3, 2e-3, 3e-3))
    config.model.num_groups = 2
    workdir = str(tmp_path)
    results = distill_stages.run_stages(config, workdir)

    assert [name for name, _ in results] == ["step0", "step1", "e2e"]
    attention = [r.experiment.model_config.attention_layers for _, r in results]
    assert attention == [(1, 2), (1,), (1,)]
    final_fraction = config.optim.final_lr_fraction
    for (_, result), (n, peak) in zip(results, ((3, 1e-3), (3, 2e-3), (2, 3e-3)), strict=True):
        np.testing.assert_allclose(
            learning_rates(result.workdir), cosine(peak, n, 1, final_fraction), rtol=1e-6
        )
    # The stepwise loss: 0.1 KL + 1 CE on the teacher's argmax.
    for record in loop.read_metrics(results[0][1].workdir):
        if "kl" in record:
            assert record["loss"] == pytest.approx(0.1 * record["kl"] + record["ce"], rel=1e-5)

    teacher = flat(loop.load_frozen(results[0][1].experiment)["teacher"])
    params = [flat(result.state.params) for _, result in results]
    for stage in (0, 1):  # only the Mamba mixers train in the steps
        mixers = split(params[stage], "['mixer']")
        assert mixers and all(f"['layers'][{attention[stage][0]}]" not in k for k in mixers)
        for name, value in params[stage].items():
            if "['mixer']" not in name:
                np.testing.assert_array_equal(value, teacher[teacher_name(name)], err_msg=name)
    start = initial_mixers(results[0][1].experiment)
    assert not np.array_equal(
        params[0]["['layers'][0]['mixer']['in_proj']"], start["['layers'][0]['mixer']['in_proj']"]
    )
    # Step 1 starts from step 0 (layer 0's mixer goes on training) and replaces layer 2.
    assert not np.array_equal(
        params[1]["['layers'][0]['mixer']['in_proj']"],
        params[0]["['layers'][0]['mixer']['in_proj']"],
    )
    assert "['layers'][2]['mixer']['in_proj']" in params[1]
    assert "['layers'][2]['attn']['q_proj']" in params[0]
    # End to end: every parameter trains, the kept attention layers too.
    for name in ("['layers'][0]['mlp']['up_proj']", "['layers'][1]['attn']['q_proj']"):
        assert not np.array_equal(params[2][name], teacher[name]), name


def test_a_first_stage_starts_from_a_given_run_source(teacher_dir, tmp_path):
    """``init="source"``: the stage starts exactly from the model the caller names (here a
    random student written with save_model_source, not the teacher), so the parameters the stage
    freezes are that model's, bitwise."""
    config = distill_mohawk.get_config()
    config.stage_order = ("matrix",)
    config.stages.matrix.init = "source"
    config = shrink(config, teacher_dir, (2,), (1e-3,))
    model_config = config.model.to_dict()
    teacher_config = pretrained.source_model_config(pretrained.parse_source(f"run:{teacher_dir}"))
    model_config["vocab_size"] = teacher_config.vocab_size
    source_model = models.build(model_config, nnx.Rngs(config.seed + 1))
    source_dir = str(tmp_path / "source")
    pretrained.save_model_source(source_dir, source_model)
    with pytest.raises(ValueError, match=r"stages.matrix.init='source' needs a source"):
        distill_stages.run_stages(config, str(tmp_path / "nosource"))

    workdir = str(tmp_path / "stages")
    results = distill_stages.distill(config, workdir, source=f"run:{source_dir}")

    with open(os.path.join(workdir, "stages.json")) as f:
        summary = json.load(f)
    assert [(s["init_from"], s["init_from_mode"]) for s in summary] == [
        (f"run:{source_dir}", "exact")
    ]
    with open(os.path.join(workdir, "0_matrix", "init_from.json")) as f:
        init = json.load(f)
    assert init["source"] == f"run:{source_dir}@0"
    assert init["kept"] == [] and init["unused"] == []
    source = flat(nnx.to_pure_dict(nnx.state(source_model, nnx.Param)))
    teacher = flat(loop.load_frozen(results[0][1].experiment)["teacher"])
    trained = flat(results[-1][1].state.params)
    assert trained.keys() == source.keys()
    for name, value in trained.items():
        if "['mixer']" in name:  # trained from the source's values
            continue
        np.testing.assert_array_equal(value, source[name], err_msg=name)
        if "norm" not in name:  # (norms start at one in both)
            assert not np.array_equal(value, teacher[teacher_name(name)]), name
    name = "['layers'][0]['mixer']['in_proj']"
    assert not np.array_equal(trained[name], source[name])
    assert os.path.exists(os.path.join(workdir, "REPORT.md"))


def test_mambainllama_first_step_freezes_all_but_the_mixers_of_a_densformer_hybrid():
    """The step with "everything else frozen" freezes the student's depth-weighted averages (the
    teacher's) and an untied head too: only the mixers' parameters stay trainable."""
    from jaxlab.models.mamba import MambaConfig
    from jaxlab.optim import param_path, params_matching

    config = MambaConfig(
        vocab_size=11,
        hidden_size=16,
        num_layers=2,
        intermediate_size=32,
        mixer="mamba2",
        head_dim=8,
        state_size=8,
        attention_layers=(1,),
        num_heads=2,
        num_kv_heads=1,
        dwa=dict(dilation=1, period=1),
    )
    params = nnx.state(models.build(config, nnx.Rngs(0)), nnx.Param)
    frozen = params_matching(params, distill_mambainllama.NOT_MAMBA, "frozen")
    trainable = [
        param_path(path)
        for path, is_frozen in jax.tree_util.tree_leaves_with_path(frozen)
        if not is_frozen
    ]
    assert trainable and all("/mixer/" in p for p in trainable), trainable
    assert any("dwa" in param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(frozen))


def test_each_stage_spans_ademamix_warmup_over_its_own_steps():
    config = distill_mambainllama.get_config(50)
    config.optim.update(name="ademamix", b3=0.999, alpha=8.0, warmup_alpha_b3=1500)
    steps = {name: 7 * (i + 1) for i, name in enumerate(config.stage_order)}
    for name, n in steps.items():
        config.stages[name].num_steps = n
    for name, engine in distill_stages.stage_configs(config):
        assert engine.optim.warmup_alpha_b3 == engine.num_steps == steps[name]
