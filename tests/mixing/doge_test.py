"""DoGE and DoReMi updates against float64 NumPy implementations of the rules written from the
brief, per-domain gradients against separate jax.grad calls, checkpointing with orbax."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxlab import mixing
from jaxlab.objectives import init_train_state


def numpy_doge(
    grads,
    log_w,
    step,
    *,
    lr,
    mu,
    clip,
    objective,
    target=None,
    smoothing=0.0,
    grad_clip=None,
    keep=None,
):
    """The rule of brief section 1.2 in float64, domain by domain (grads: list of leaf lists)."""
    grads = [[np.asarray(g, np.float64) for g in domain] for domain in grads]
    target = None if target is None else [[np.asarray(g, np.float64) for g in d] for d in target]

    def clipped(domain):
        norm = np.sqrt(sum(np.sum(g * g) for g in domain))
        return [g * min(1.0, grad_clip / norm) for g in domain] if grad_clip else domain

    def flat(domain):
        leaves = [g for i, g in enumerate(clipped(domain)) if keep is None or keep[i]]
        return np.concatenate([g.ravel() for g in leaves])

    g = [flat(d) for d in grads]
    k = len(g)
    if objective == "universal":
        scores = np.array([sum(g[i] @ g[j] for j in range(k) if j != i) for i in range(k)])
    else:
        t = [flat(d) for d in target]
        scores = np.array([sum(g[i] @ tj for tj in t) for i in range(k)])
    scores = lr * scores / (np.mean([np.linalg.norm(v) for v in g]) + 1e-6)
    scores = np.clip(scores, lr * clip[0], lr * clip[1])
    z = np.asarray(log_w, np.float64) + scores / mu
    w = np.exp(z - z.max())
    w /= w.sum()
    return (1 - smoothing) * w + smoothing / k


def random_grads(rng, k, scale=1.0):
    """A pytree of per-domain gradients sharing a common direction (so scores have both signs)."""
    shapes = {"a": (4, 3), "b": (5,), "c": (2, 2, 2)}
    common = {n: rng.standard_normal(s) for n, s in shapes.items()}
    return {
        n: jnp.asarray(
            np.stack([rng.uniform(-1, 1) * common[n] + rng.standard_normal(s) for _ in range(k)])
            * scale,
            jnp.float32,
        )
        for n, s in shapes.items()
    }


def as_lists(tree, k):
    leaves = jax.tree.leaves(tree)
    return [[leaf[i] for leaf in leaves] for i in range(k)]


@pytest.mark.parametrize("objective", ["universal", "ood"])
@pytest.mark.parametrize("seed", [0, 1])
def test_doge_update_matches_numpy(objective, seed):
    rng = np.random.default_rng(seed)
    k = 5
    schedule = optax.cosine_decay_schedule(1e-2, 10, alpha=0.1)
    keep = {"a": True, "b": False, "c": True}
    mixer = mixing.doge(
        num_domains=k,
        mu=0.05,
        lr_schedule=schedule,
        objective=objective,
        score_clip=(0.0, 5.0),
        grad_clip=4.0,
        smoothing=0.01,
        param_filter=keep,
    )
    state = mixer.init()
    log_w = np.log(np.full(k, 1.0 / k))
    clipped_somewhere = False
    for step in range(4):
        grads = random_grads(rng, k, scale=rng.uniform(0.5, 3.0))
        target = random_grads(rng, 2) if objective == "ood" else None
        weights, state = jax.jit(mixer.update)(mixing.Observation(grads, target), state)
        expected = numpy_doge(
            as_lists(grads, k),
            log_w,
            step,
            lr=float(schedule(step)),
            mu=0.05,
            clip=(0.0, 5.0),
            objective=objective,
            target=None if target is None else as_lists(target, 2),
            smoothing=0.01,
            grad_clip=4.0,
            keep=[True, False, True],
        )
        np.testing.assert_allclose(np.asarray(weights), expected, rtol=2e-5, atol=1e-7)
        assert float(jnp.sum(weights)) == pytest.approx(1.0, abs=1e-6)
        assert np.all(np.asarray(weights) > 0)
        log_w = np.log(expected)
        norms = [
            np.sqrt(sum(float(jnp.sum(g[i] ** 2)) for g in jax.tree.leaves(grads)))
            for i in range(k)
        ]
        clipped_somewhere |= max(norms) > 4.0
    assert clipped_somewhere  # the gradient clip was exercised
    avg = np.asarray(mixing.averaged_weights(state))
    assert int(state.step) == 4 and avg.sum() == pytest.approx(1.0, abs=1e-6)


def test_score_clipping_is_active_and_harmful_domains_lose_weight():
    """A domain whose gradient opposes all others scores < 0, is clipped to 0, and loses weight
    only through the renormalisation; with a tiny upper clip every score saturates."""
    base = np.ones(6)
    grads = {"w": jnp.asarray(np.stack([base, base * 1.1, base * 0.9, -base]), jnp.float32)}
    mixer = mixing.doge(num_domains=4, mu=10.0, lr_schedule=1.0)
    weights, _ = mixer.update(mixing.Observation(grads), mixer.init())
    w = np.asarray(weights)
    assert w[3] < 0.25 and w[3] == pytest.approx(min(w))
    raw = numpy_doge(
        as_lists(grads, 4),
        np.log(np.full(4, 0.25)),
        0,
        lr=1.0,
        mu=10.0,
        clip=(-np.inf, np.inf),
        objective="universal",
    )
    assert raw[3] < w[3]  # unclipped, the negative score would push it lower still
    saturated = mixing.doge(num_domains=4, mu=0.01, lr_schedule=1.0, score_clip=(0.0, 1e-3))
    weights, _ = saturated.update(mixing.Observation(grads), saturated.init())
    top = np.exp(1e-3 / 0.01)
    np.testing.assert_allclose(
        np.asarray(weights), np.array([top, top, top, 1.0]) / (3 * top + 1), rtol=1e-5
    )


def test_domain_gradients_equal_separate_grads():
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(4), jnp.float32),
    }
    x = jnp.asarray(rng.standard_normal((30, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, 30))
    domain = jnp.asarray(rng.integers(0, 3, 30))

    def per_example(p):
        logits = x @ p["w"] + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    def domain_loss(p, i):
        mask = (domain == i).astype(jnp.float32)
        return jnp.sum(per_example(p) * mask) / jnp.sum(mask)

    losses, grads = jax.jit(
        lambda p: mixing.domain_gradients(
            lambda q: jnp.stack([domain_loss(q, i) for i in range(3)]), p
        )
    )(params)
    for i in range(3):
        expected = jax.grad(domain_loss)(params, i)
        for name in params:
            np.testing.assert_allclose(
                np.asarray(grads[name][i]), np.asarray(expected[name]), rtol=1e-5, atol=1e-6
            )
        assert float(losses[i]) == pytest.approx(float(domain_loss(params, i)), rel=1e-6)


@pytest.mark.parametrize("rows_per_pass", [0, 1, 3])
def test_row_domain_gradients_equal_separate_grads(rows_per_pass):
    """Rows of a sequence model (tokens within a row interact through a running sum), each row in
    one domain, domain 3 absent, one row without counted tokens: every domain's gradient and
    mean loss equal a separate float64 jax.grad of that domain's masked mean over the batch, all
    rows at once or a few at a time (1: seven groups; 3: the last group padded)."""
    rng = np.random.default_rng(1)
    k, rows, seq = 4, 7, 5
    params64 = {
        "w": rng.standard_normal((3, 6)),
        "v": rng.standard_normal((6, 4)),
    }
    x = rng.standard_normal((rows, seq, 3))
    y = rng.integers(0, 4, (rows, seq))
    row_domain = np.array([0, 2, 1, 0, 2, 2, 1])
    mask = (rng.random((rows, seq)) < 0.8).astype(np.float64)
    mask[3] = 0.0  # a row of domain 0 with no counted token
    masks = (row_domain[None, :, None] == np.arange(k)[:, None, None]) * mask[None]
    counts = masks.sum(axis=(1, 2))

    def token_losses(p, x, y):  # [..., seq]; a token sees the running sum of its row's prefix
        h = jnp.cumsum(jnp.tanh(x @ p["w"]), axis=-2)
        return optax.softmax_cross_entropy_with_integer_labels(h @ p["v"], y)

    def domain_loss(p, i):
        return jnp.sum(token_losses(p, x, y) * masks[i]) / max(counts[i], 1.0)

    def row_loss(p, row):
        losses = token_losses(p, row["x"], row["y"])
        return jnp.sum(losses * row["weight"]), losses

    weight = (masks / np.maximum(counts, 1.0)[:, None, None]).sum(axis=0)
    as32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)  # noqa: E731
    grads, losses = jax.jit(
        functools.partial(mixing.row_domain_gradients, rows_per_pass=rows_per_pass),
        static_argnums=0,
    )(
        row_loss,
        as32(params64),
        {"x": as32(x), "y": jnp.asarray(y), "weight": as32(weight)},
        jnp.asarray(masks.any(axis=2)),
    )
    means = mixing.domain_means(losses, as32(masks))[0]
    with jax.enable_x64(True):
        p64 = jax.tree.map(jnp.asarray, params64)
        for i in range(k):
            expected = jax.grad(domain_loss)(p64, i)
            for name in params64:
                np.testing.assert_allclose(
                    np.asarray(grads[name][i]), np.asarray(expected[name]), rtol=1e-5, atol=1e-6
                )
            assert float(means[i]) == pytest.approx(float(domain_loss(p64, i)), rel=1e-5)
    assert not np.any(np.asarray(grads["w"][3]))  # the absent domain: exactly zero


def test_a_mixer_reading_some_leaves_cannot_also_prepare_all():
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    rule = mixing.doge(num_domains=2, mu=0.1, lr_schedule=0.1, param_filter={"a": True, "b": False})
    assert rule.reads == {"a": True, "b": False}
    clipping = rule._replace(prepare=lambda g: g)  # a prepare step that reads every leaf

    def losses(p):
        return jnp.stack([jnp.sum(p["a"]), jnp.sum(p["b"] ** 2)]), ()

    with pytest.raises(ValueError, match="Mixer.reads set must have no prepare step"):
        mixing.proxy.doge_gradients(losses, params, clipping, rule.init())
    clipped = mixing.doge(
        num_domains=2, mu=0.1, lr_schedule=0.1, param_filter={"a": True, "b": False}, grad_clip=1.0
    )
    assert clipped.reads is None  # clipping needs every leaf: the mixer reads them all


@pytest.mark.parametrize("objective", ["universal", "ood"])
@pytest.mark.parametrize("grad_clip", [None, 0.5])
def test_selected_gradients_equal_all_leaves(objective, grad_clip):
    """With a param_filter and no clipping the mixer reads only the selected leaves and
    doge_gradients takes only their per-domain gradients, then the update by one more backward
    pass; weights, state and update equal per-domain gradients of every leaf (domain_gradients)
    reweighted by doge_update, with domain 2 absent from the batch. Clipping reads every leaf."""
    rng = np.random.default_rng(2)
    k, m = 3, 2
    params = {
        "w": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(5), jnp.float32),
        "v": jnp.asarray(rng.standard_normal((5, 4)), jnp.float32),
    }
    chosen = {"w": False, "b": True, "v": False}
    x = jnp.asarray(rng.standard_normal((40, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, 40))
    domain = jnp.asarray(rng.choice([0, 1, 3, 4], 40))  # 0-2 train (2 absent), 3, 4 target

    def domain_losses(p, domains):
        logits = jnp.tanh(x @ p["w"] + p["b"]) @ p["v"]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        masks = jnp.stack([(domain == d).astype(jnp.float32) for d in domains])
        return mixing.domain_means(losses, masks)

    mixer = mixing.doge(
        num_domains=k,
        mu=0.05,
        lr_schedule=0.5,
        score_clip=(-5.0, 5.0),  # negative scores move the weights too
        objective=objective,
        param_filter=chosen,
        grad_clip=grad_clip,
    )
    assert mixer.reads == (chosen if grad_clip is None else None)
    train = lambda p: domain_losses(p, range(k))  # noqa: E731
    target = (lambda p: domain_losses(p, range(k, k + m))[0]) if objective == "ood" else None
    state = mixer.init()._replace(log_weights=jnp.log(jnp.asarray([0.2, 0.5, 0.3])))

    @jax.jit
    def every_leaf(params, state):
        losses, grads, counts = mixing.domain_gradients(train, params, has_aux=True)
        target_grads = None if target is None else mixing.domain_gradients(target, params)[1]
        return (*mixing.doge_update(grads, mixer, state, target_grads), losses, counts)

    got = jax.jit(lambda p, s: mixing.doge_gradients(train, p, mixer, s, target))(params, state)
    want = every_leaf(params, state)
    assert float(want[4][2]) == 0.0  # domain 2 is absent
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not np.allclose(got[1], [0.2, 0.5, 0.3])  # the weights moved


def test_doremi_update_matches_numpy():
    """Per-token clipped excess averaged per domain (not the clip of the domain means), then the
    exponentiated step with smoothing; an absent domain takes no step."""
    rng = np.random.default_rng(3)
    k, tokens = 4, 30
    mixer = mixing.doremi(num_domains=k, step_size=0.5, smoothing=1e-3)
    state = mixer.init()
    log_w = np.log(np.full(k, 0.25))
    for step in range(3):
        losses, ref = rng.uniform(1, 3, tokens), rng.uniform(1, 3, tokens)
        domain = rng.integers(0, k - 1 if step == 1 else k, tokens)  # domain 3 absent at step 1
        masks = (domain[None] == np.arange(k)[:, None]).astype(np.float32)
        excess, present = mixing.domain_excess(
            jnp.asarray(losses), jnp.asarray(ref), jnp.asarray(masks)
        )
        expected_excess = np.array(
            [
                np.maximum(losses - ref, 0)[domain == i].mean() if np.any(domain == i) else 0.0
                for i in range(k)
            ]
        )
        np.testing.assert_allclose(np.asarray(excess), expected_excess, rtol=1e-5, atol=1e-7)
        means = np.array(
            [(losses - ref)[domain == i].mean() if np.any(domain == i) else 0.0 for i in range(k)]
        )
        assert np.all(expected_excess >= np.maximum(means, 0) - 1e-12)  # Jensen: per token >=
        weights, state = mixer.update(mixing.Observation(excess=excess, present=present), state)
        z = log_w + 0.5 * expected_excess * np.asarray(present)
        expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum() * (1 - 1e-3) + 1e-3 / k
        np.testing.assert_allclose(np.asarray(weights), expected, rtol=1e-5)
        log_w = np.log(expected)


def test_model_update_uses_the_clipped_domain_gradients():
    """The authors clip each domain gradient in place, so both the scores and the model step see
    the clipped gradients (here 100 e1 and e2 clipped to norm 1)."""
    mixer = mixing.doge(num_domains=2, mu=1.0, lr_schedule=0.0, grad_clip=1.0)
    params = {"w": jnp.zeros(2)}
    grads_by_domain = jnp.asarray([[100.0, 0.0], [0.0, 1.0]])
    step = mixing.make_doge_step(
        lambda p, _: jnp.stack([p["w"] @ g for g in grads_by_domain]), optax.sgd(1.0), mixer
    )
    state = init_train_state(params, optax.sgd(1.0), mixer.init())
    new, _ = step(state, None)
    np.testing.assert_allclose(np.asarray(new.params["w"]), [-0.5, -0.5], atol=1e-6)


def test_a_weight_that_underflows_recovers():
    """Log weights are kept by log-softmax: a domain pushed below float32's smallest weight still
    comes back once its excess dominates (with log(softmax) it would stay at -inf)."""
    mixer = mixing.doremi(num_domains=2, step_size=1.0, smoothing=0.0)
    state = mixer.init()
    for _ in range(110):
        weights, state = mixer.update(mixing.Observation(excess=jnp.asarray([0.0, 1.0])), state)
    assert float(weights[0]) == 0.0 and np.isfinite(np.asarray(state.log_weights)).all()
    for _ in range(200):
        weights, state = mixer.update(mixing.Observation(excess=jnp.asarray([1.0, 0.0])), state)
    assert float(weights[0]) > 0.99


def test_state_checkpoints_and_resumes_with_orbax(tmp_path):
    rng = np.random.default_rng(1)
    mixer = mixing.doge(num_domains=3, mu=0.01, lr_schedule=0.1)
    state = mixer.init()
    for _ in range(3):
        _, state = mixer.update(mixing.Observation(random_grads(rng, 3)), state)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "mixer", state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "mixer", jax.tree.map(jnp.zeros_like, state))
    restored = (
        mixing.DoGEState(*restored) if not isinstance(restored, mixing.DoGEState) else restored
    )
    grads = random_grads(rng, 3)
    a, _ = mixer.update(mixing.Observation(grads), state)
    b, _ = mixer.update(mixing.Observation(grads), restored)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(
        np.asarray(mixing.averaged_weights(restored)), np.asarray(mixing.averaged_weights(state))
    )


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="leading axis of num_domains=3"):
        mixer = mixing.doge(num_domains=3, mu=0.01, lr_schedule=0.1)
        mixer.update(mixing.Observation({"w": jnp.zeros((4, 2))}), mixer.init())
    with pytest.raises(ValueError, match="initial_weights must be 3 positive numbers"):
        mixing.doge(num_domains=3, mu=0.01, lr_schedule=0.1, initial_weights=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="initial_weights must be 3 positive numbers"):
        mixing.doremi(num_domains=3, initial_weights=[1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="needs target_grads"):
        mixer = mixing.doge(num_domains=2, mu=0.01, lr_schedule=0.1, objective="ood")
        mixer.update(mixing.Observation({"w": jnp.ones((2, 2))}), mixer.init())
    with pytest.raises(ValueError, match="objective must be one of"):
        mixing.doge(num_domains=2, mu=0.01, lr_schedule=0.1, objective="mix")


def test_parameter_selection_ranking():
    ratios = {"a": 3.0, "b": 0.5, "c": 2.0, "d": 9.0}
    assert mixing.select_parameters(ratios, 2) == {
        "a": False,
        "b": True,
        "c": True,
        "d": False,
    }
    assert mixing.select_parameters(ratios, -1) == {
        "a": False,
        "b": False,
        "c": False,
        "d": True,
    }
    old = {"w": jnp.ones(4)}
    new = {"w": jnp.ones(4) * 1.5}
    grads = {"w": jnp.full(4, 2.0)}
    r = mixing.cancellation_ratios(grads, old, new)
    assert float(r["w"]) == pytest.approx(4.0 / 1.0)


def test_cancellation_prerun_against_numpy_and_selection():
    """||g_t|| / ||W_t - W_{t-1}|| summed from the second step, recomputed with NumPy gradients
    of a linear softmax model under plain SGD; select_parameters keeps the requested end."""
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(2), jnp.float32),
    }
    batches = [(rng.standard_normal((8, 3)), rng.integers(0, 2, 8)) for _ in range(5)]

    def loss(p, batch):
        x, y = batch
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y))

    def numpy_grads(w, b, x, y):
        z = x @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(y)), y] -= 1
        return {"w": x.T @ p / len(y), "b": p.mean(0)}

    lr = 0.25
    w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
    expected = {"w": 0.0, "b": 0.0}
    previous = None
    for x, y in batches:
        g = numpy_grads(w, b, x, y)
        if previous is not None:
            for name, now, before in (("w", w, previous[0]), ("b", b, previous[1])):
                expected[name] += np.linalg.norm(g[name]) / np.linalg.norm(now - before)
        previous = (w, b)
        w, b = w - lr * g["w"], b - lr * g["b"]
    jax_batches = [(jnp.asarray(x, jnp.float32), jnp.asarray(y)) for x, y in batches]
    sums = mixing.cancellation_prerun(loss, params, optax.sgd(lr), jax_batches)
    for name in ("w", "b"):
        assert float(sums[name]) == pytest.approx(expected[name], rel=1e-4)
    keep_small = mixing.select_parameters(sums, 1)
    smaller = min(sums, key=lambda k: float(sums[k]))
    assert keep_small == {k: k == smaller for k in sums}


def test_doremi_proxy_step_gradient_is_the_weighted_loss_gradient():
    """The step's single-pass VJP equals jax.grad of sum_i w_i mean(loss_i) at the weights the
    step chose (and plain SGD then moves the parameters by exactly that gradient)."""
    rng = np.random.default_rng(5)
    k, n = 3, 6
    x = jnp.asarray(rng.standard_normal((k, n, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 2, (k, n)))
    params = {"w": jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)}
    reference = {"w": jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)}

    def example_losses(p, batch):
        return optax.softmax_cross_entropy_with_integer_labels(batch[0] @ p["w"], batch[1])

    mixer = mixing.doremi(num_domains=k, step_size=2.0)
    step = mixing.make_doremi_step(example_losses, optax.sgd(1.0), mixer)
    state = init_train_state(params, optax.sgd(1.0), mixer.init())
    new, metrics = jax.jit(step)(state, (x, y), {"reference": reference})
    weights = metrics["weights"]
    expected = jax.grad(lambda p: jnp.dot(weights, jnp.mean(example_losses(p, (x, y)), 1)))(params)
    np.testing.assert_allclose(
        np.asarray(params["w"] - new.params["w"]), np.asarray(expected["w"]), rtol=1e-5, atol=1e-7
    )
    assert not np.allclose(np.asarray(weights), 1 / k)  # the weights moved
