"""The training engine with a data mixer: DoGE (universal and OOD) and DoReMi proxy runs on the
embedded corpus, resuming exactly, the weights file, and a base run reading it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import lm_smoke
from jaxlab import mixing
from jaxlab.data.tokenizers import load_tokenizer
from jaxlab.mixing.objectives import domain_mean_losses
from jaxlab.objectives import token_losses
from jaxlab.optim import params_matching
from jaxlab.train import loop

SOURCES = ("embedded:json", "embedded:email", "embedded:html")


def proxy_config(**mixer):
    config = lm_smoke.get_config()
    config.data.sources = SOURCES
    config.objective.name = "doge"
    config.mixer.update(**mixer)
    return config


def first_batch(config, exp):
    """The first training batch of the three domains sampled uniformly: the model inputs and
    each token's domain, as arrays."""
    iterator = loop.pipeline.train_iterator(
        config.data, exp.tokenizer, config.seq_len, config.batch_size, weights=[1.0] * 3
    )
    keep = (*loop.MODEL_INPUTS, "domain")
    return {k: jnp.asarray(v) for k, v in next(iter(iterator)).items() if k in keep}


def test_doge_proxy_run_writes_weights_and_the_step_matches_the_rule(tmp_path):
    config = proxy_config(mu=0.05)
    summary = loop.train_and_evaluate(config, str(tmp_path))
    record = json.loads((tmp_path / "domain_weights.json").read_text())
    assert record["domains"] == ["json", "email", "html"] and record["steps"] == config.num_steps
    assert sum(record["average"]) == pytest.approx(1.0, abs=1e-5)
    metrics = loop.read_metrics(str(tmp_path))
    logged = [[m[f"weight_{d}"] for d in record["domains"]] for m in metrics if "weight_json" in m]
    assert len(logged) >= 3 and not np.allclose(logged[-1], 1 / 3)  # the weights moved

    # One more step by hand equals the engine's step: per-domain gradients from separate
    # jax.grad calls, the mixer rule, the weighted gradient.
    exp = summary.experiment
    state = summary.state
    iterator = loop.pipeline.train_iterator(
        config.data, exp.tokenizer, config.seq_len, config.batch_size, weights=[1.0] * 3
    )
    batch = next(iter(iterator))
    keys = (*loop.MODEL_INPUTS, "domain")
    device_batch = {k: jnp.asarray(batch[k]) for k in keys}

    def domain_loss(params, d):
        losses, mask = token_losses(exp.graphdef, params, device_batch)
        return domain_mean_losses(losses, mask, device_batch["domain"], (d,))[0][0]

    grads = [jax.grad(domain_loss)(state.params, d) for d in range(3)]
    stacked = jax.tree.map(lambda *g: jnp.stack(g), *grads)
    weights, _ = mixing.doge(num_domains=3, mu=0.05, lr_schedule=exp.schedule).update(
        mixing.Observation(stacked), state.objective
    )
    train_step, _ = loop.compile_steps(exp)
    new_state, metrics = train_step(jax.tree.map(jnp.copy, state), device_batch, {})
    got = np.array([float(metrics[f"weight_{d}"]) for d in record["domains"]])
    np.testing.assert_allclose(got, np.asarray(weights), rtol=1e-4, atol=1e-6)
    assert int(new_state.objective.step) == config.num_steps + 1


def test_mixer_run_resumes_exactly(tmp_path):
    config = proxy_config(mu=0.05)
    full = loop.train_and_evaluate(config, str(tmp_path / "full"))
    loop.train_and_evaluate(config, str(tmp_path / "split"), stop_at=4)
    resumed = loop.train_and_evaluate(config, str(tmp_path / "split"))
    assert resumed.start_step == 4
    full_leaves = jax.tree.leaves(full.state.objective)
    for a, b in zip(full_leaves, jax.tree.leaves(resumed.state.objective), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_ood_doremi_and_a_base_run_from_the_weights_file(tmp_path):
    ood = proxy_config(mu=0.05, target_sources=("html",))
    loop.train_and_evaluate(ood, str(tmp_path / "ood"))
    record = json.loads((tmp_path / "ood" / "domain_weights.json").read_text())
    assert record["domains"] == ["json", "email"] and record["targets"] == ["html"]

    reference = lm_smoke.get_config()  # DoReMi's reference: plain training on the same domains
    reference.data.sources = ("embedded:json", "embedded:email")
    loop.train_and_evaluate(reference, str(tmp_path / "reference"))
    doremi = lm_smoke.get_config()
    doremi.data.sources = ("embedded:json", "embedded:email")
    doremi.objective.name = "doremi"
    doremi.mixer.update(
        step_size=1.0, smoothing=1e-3, reference_workdir=str(tmp_path / "reference")
    )
    summary = loop.train_and_evaluate(doremi, str(tmp_path / "doremi"))
    weights = json.loads((tmp_path / "doremi" / "domain_weights.json").read_text())
    assert weights["mixer"] == "doremi" and sum(weights["average"]) == pytest.approx(1, abs=1e-5)
    # One more engine step by hand: per-token clipped excess -> weights; the update is the
    # gradient of sum_i w_i mean_loss_i (its norm is logged as grad_norm).
    exp, state = summary.experiment, summary.state
    frozen = loop.load_frozen(exp)
    reference_params = frozen["reference"]
    iterator = loop.pipeline.train_iterator(
        doremi.data, exp.tokenizer, doremi.seq_len, doremi.batch_size, weights=[1.0, 1.0]
    )
    batch = {
        k: jnp.asarray(v)
        for k, v in next(iter(iterator)).items()
        if k in (*loop.MODEL_INPUTS, "domain")
    }
    mask = batch["loss_mask"].astype(jnp.float32)
    masks = jnp.stack([(batch["domain"] == d).astype(jnp.float32) * mask for d in (0, 1)])
    now = token_losses(exp.graphdef, state.params, batch)[0]
    ref = token_losses(exp.frozen["reference"].graphdef, reference_params, batch)[0]
    excess = [float(jnp.sum(jnp.maximum(now - ref, 0) * m) / jnp.sum(m)) for m in masks]
    rule = mixing.doremi(num_domains=2, step_size=1.0, smoothing=1e-3)
    expected_weights, _ = rule.update(
        mixing.Observation(excess=jnp.asarray(excess)), state.objective
    )

    def weighted(p):
        losses, mask_ = token_losses(exp.graphdef, p, batch)
        means = domain_mean_losses(losses, mask_, batch["domain"], (0, 1))[0]
        return jnp.dot(expected_weights, means)

    grad_norm = float(optax.tree.norm(jax.grad(weighted)(state.params)))
    train_step, _ = loop.compile_steps(exp)
    _, metrics = train_step(jax.tree.map(jnp.copy, state), batch, frozen)
    got = np.array([float(metrics[f"weight_{d}"]) for d in ("json", "email")])
    np.testing.assert_allclose(got, np.asarray(expected_weights), rtol=1e-4, atol=1e-6)
    assert float(metrics["grad_norm"]) == pytest.approx(grad_norm, rel=1e-4)

    base = lm_smoke.get_config()
    base.data.sources = ("embedded:email", "embedded:json")  # any order: matched by name
    base.data.weights_file = str(tmp_path / "ood" / "domain_weights.json")
    iterator = loop.pipeline.train_iterator(
        base.data, load_tokenizer("byte"), base.seq_len, base.batch_size
    )
    by_name = dict(zip(record["domains"], record["average"], strict=True))
    np.testing.assert_allclose(
        iterator.weights / iterator.weights.sum(), [by_name["email"], by_name["json"]], rtol=1e-6
    )
    base.data.sources = ("embedded:email", "embedded:json", "embedded:html")  # + the OOD target
    iterator = loop.pipeline.train_iterator(
        base.data, load_tokenizer("byte"), base.seq_len, base.batch_size
    )
    assert iterator.weights[2] == 0.0 and iterator.weights[:2].sum() > 0
    base.data.sources = ("embedded:email", "embedded:xml")
    with pytest.raises(ValueError, match="weights_file"):
        loop.pipeline.train_iterator(
            base.data, load_tokenizer("byte"), base.seq_len, base.batch_size
        )


def test_selected_parameters_restrict_the_scores():
    """With selected_params the engine's DoGE objective scores only those parameters: its weights
    equal the filtered rule on per-domain gradients from separate jax.grad calls, and differ from
    the unfiltered rule."""
    selected = proxy_config(selected_params=("layers/1/mlp",))
    exp = loop.build_experiment(selected)
    state = loop.init_state(exp)
    state = state._replace(objective=state.objective._replace(step=jnp.int32(5)))  # lr > 0
    chosen = params_matching(state.params, ("layers/1/mlp",), "selected")
    paths = [
        jax.tree_util.keystr(p)
        for p, keep in jax.tree_util.tree_flatten_with_path(chosen)[0]
        if keep
    ]
    assert paths and all("1" in p and "mlp" in p for p in paths)
    batch = first_batch(selected, exp)

    def domain_loss(params, d):
        losses, mask = token_losses(exp.graphdef, params, batch)
        return domain_mean_losses(losses, mask, batch["domain"], (d,))[0][0]

    grads = [jax.grad(domain_loss)(state.params, d) for d in range(3)]
    stacked = jax.tree.map(lambda *g: jnp.stack(g), *grads)
    rule = mixing.doge(num_domains=3, mu=0.01, lr_schedule=exp.schedule, param_filter=chosen)
    expected = np.asarray(rule.update(mixing.Observation(stacked), state.objective)[0])
    _, _, metrics = jax.jit(exp.objective.gradients)(
        state.params, batch, {}, state.objective, jax.random.PRNGKey(0)
    )
    got = np.array([float(metrics[f"weight_{d}"]) for d in ("json", "email", "html")])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    unfiltered = mixing.doge(num_domains=3, mu=0.01, lr_schedule=exp.schedule)
    assert not np.allclose(
        got, np.asarray(unfiltered.update(mixing.Observation(stacked), state.objective)[0])
    )
    with pytest.raises(ValueError, match="selected_params"):
        loop.build_experiment(proxy_config(selected_params=("nothing_like_this",)))


def test_mixer_config_errors_name_the_field():
    config = proxy_config(target_sources=("nope",))
    with pytest.raises(ValueError, match="config.mixer.target_sources"):
        loop.build_experiment(config)
    config = proxy_config()
    config.objective.name = "dro"
    with pytest.raises(ValueError, match="config.objective.name"):
        loop.build_experiment(config)
    config = proxy_config()
    config.accum_steps = 2
    with pytest.raises(ValueError, match="accum_steps must be 1"):
        loop.build_experiment(config)
    config = lm_smoke.get_config()
    config.objective.name = "doremi"
    with pytest.raises(ValueError, match="reference_workdir"):
        loop.build_experiment(config)
    config = proxy_config()
    config.data.weights = (1.0, 2.0, 1.0)
    with pytest.raises(ValueError, match="samples its components uniformly"):
        loop.build_experiment(config)
    config = proxy_config(rows_per_pass=-1)
    with pytest.raises(ValueError, match="config.mixer.rows_per_pass must be an integer >= 0"):
        loop.build_experiment(config)


@pytest.mark.parametrize(
    "mixer",
    [
        dict(),
        dict(target_sources=("html",)),
        dict(selected_params=("layers/1/mlp",)),
        dict(grad_clip=0.05, smoothing=0.1),
        dict(rows_per_pass=3),
    ],
    ids=["universal", "ood", "selected", "clipped", "three-rows-per-pass"],
)
def test_row_gradients_equal_the_general_path(mixer, monkeypatch):
    """The engine's DoGE objective takes per-domain gradients row by row: its update, weights and
    metrics equal every leaf's per-domain gradient from k vmapped backward passes (and target
    gradients of their own) reweighted by doge_update, on a batch where one training domain is
    absent; a batch whose rows mix domains takes the general path (doge_gradients, selected
    leaves only when the mixer says so) and equals it too."""
    config = proxy_config(mu=0.01, **mixer)
    exp = loop.build_experiment(config)
    state = loop.init_state(exp)
    state = state._replace(objective=state.objective._replace(step=jnp.int32(5)))  # lr > 0
    target = (2,) if mixer.get("target_sources") else ()
    train = tuple(d for d in range(3) if d not in target)
    chosen = None
    if mixer.get("selected_params"):
        chosen = params_matching(state.params, mixer["selected_params"], "selected")
    rule = mixing.doge(
        num_domains=len(train),
        mu=0.01,
        lr_schedule=exp.schedule,
        objective="ood" if target else "universal",
        param_filter=chosen,
        grad_clip=mixer.get("grad_clip"),
        smoothing=mixer.get("smoothing", 0.0),
    )
    assert config.batch_size % 3, "rows_per_pass=3 should leave a padded group"

    def per_domain(params, batch, domains):
        losses, mask = token_losses(exp.graphdef, params, batch)
        return domain_mean_losses(losses, mask, batch["domain"], domains)

    @jax.jit
    def general(params, batch, mixer_state):  # every leaf's per-domain gradient, k backward passes
        losses, grads, counts = mixing.domain_gradients(
            lambda p: per_domain(p, batch, train), params, has_aux=True
        )
        targets = None
        if target:
            targets = mixing.domain_gradients(lambda p: per_domain(p, batch, target)[0], params)[1]
        return (*mixing.doge_update(grads, rule, mixer_state, targets), losses, counts)

    batch = first_batch(config, exp)
    absent = jnp.where(batch["domain"] == 1, 0, batch["domain"])  # no email rows
    half = config.seq_len // 2
    mixed = absent.at[:, half:].set((absent[:, half:] + 1) % 3)  # every row mixes two domains
    step = jax.jit(exp.objective.gradients)
    names = [("json", "email", "html")[d] for d in train]
    for domain in (absent, mixed):
        b = dict(batch, domain=domain)
        update, mixer_state, metrics = step(
            state.params, b, {}, state.objective, jax.random.PRNGKey(0)
        )
        expected, weights, expected_state, losses, counts = general(
            state.params, b, state.objective
        )
        assert float(counts[1]) == 0.0 or domain is mixed  # email absent from `absent`
        np.testing.assert_allclose(
            [float(metrics[f"weight_{n}"]) for n in names], weights, rtol=1e-5, atol=1e-7
        )
        for got, want in zip(
            jax.tree.leaves((update, mixer_state)),
            jax.tree.leaves((expected, expected_state)),
            strict=True,
        ):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        assert float(metrics["loss"]) == pytest.approx(
            float(jnp.dot(losses, counts) / jnp.sum(counts)), rel=1e-5
        )

    if mixer:
        return

    # The single-domain batch does take the row path: with the general path poisoned, its update
    # stays finite while the mixed batch's does not.
    def poisoned(*args, **kwargs):
        update, *rest = mixing.doge_gradients(*args, **kwargs)
        return (jax.tree.map(lambda g: g * jnp.nan, update), *rest)

    monkeypatch.setattr(mixing.objectives, "doge_gradients", poisoned)
    step = jax.jit(loop.build_experiment(config).objective.gradients)
    for domain, finite in ((absent, True), (mixed, False)):
        update = step(state.params, dict(batch, domain=domain), {}, state.objective, None)[0]
        assert all(bool(jnp.all(jnp.isfinite(g))) == finite for g in jax.tree.leaves(update))
