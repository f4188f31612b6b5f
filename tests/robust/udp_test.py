"""UDP, PGD and TRADES perturbations against closed forms on linear models and invariants on
random MLPs; the classifier objective in the shared train step, and its batch transforms."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlab import robust as R
from jaxlab.data import synthetic
from jaxlab.models.classifiers import LinearClassifier, MLPClassifier, SmallCNN, functional
from jaxlab.objectives import init_train_state, make_train_step


def random_mlp(seed, in_features=5, classes=3):
    return functional(MLPClassifier(in_features, (16, 16), classes, rngs=nnx.Rngs(seed)))


def random_linear(seed, dim):
    apply_fn, params = functional(LinearClassifier(dim, 2, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    params["linear"]["kernel"] = jnp.asarray(rng.standard_normal((dim, 2)), jnp.float32)
    params["linear"]["bias"] = jnp.asarray(rng.standard_normal(2), jnp.float32)
    return apply_fn, params


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("seed", [0, 1])
def test_udp_stays_in_the_ball_and_the_clip_range(norm, seed):
    apply_fn, params = random_mlp(seed)
    x = jnp.asarray(np.random.default_rng(seed).uniform(0, 1, (64, 5)), jnp.float32)
    for clip in (None, (0.0, 1.0)):
        adv = R.udp_perturb(
            apply_fn,
            params,
            x,
            jax.random.PRNGKey(seed),
            epsilon=0.3,
            step_size=0.1,
            num_steps=8,
            norm=norm,
            random_start=True,
            clip=clip,
        )
        delta = np.asarray(adv - x)
        size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
        assert size.max() <= 0.3 + 1e-6 and size.max() > 0.1
        if clip is not None:
            assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


def test_udp_never_reads_labels():
    parameters = inspect.signature(R.udp_perturb).parameters
    assert not {"y", "labels", "targets"} & set(parameters)
    apply_fn, params = random_mlp(3)
    rng = np.random.default_rng(3)
    batch = {
        "x": jnp.asarray(rng.standard_normal((32, 5)), jnp.float32),
        "y": jnp.asarray(rng.integers(0, 3, 32)),
    }
    transform = R.perturbation("udp", apply_fn, epsilon=0.5, step_size=0.1, num_steps=5)
    key = jax.random.PRNGKey(0)
    a = transform(params, batch, key)["x_perturbed"]
    b = transform(params, batch | {"y": jnp.asarray(rng.permutation(np.asarray(batch["y"])))}, key)[
        "x_perturbed"
    ]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # PGD does read them: a different labelling moves the points differently.
    pgd = R.perturbation("pgd", apply_fn, epsilon=0.5, step_size=0.1, num_steps=5)
    c = pgd(params, batch, key)["x_perturbed"]
    d = pgd(params, batch | {"y": (batch["y"] + 1) % 3}, key)["x_perturbed"]
    assert not np.allclose(np.asarray(c), np.asarray(d))


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_udp_raises_the_mean_entropy_at_every_step(norm, seed):
    apply_fn, params = random_mlp(seed)
    x = jnp.asarray(np.random.default_rng(seed + 10).standard_normal((128, 5)), jnp.float32)
    entropies = []
    for steps in range(1, 7):  # the same rng: run k is run k-1 plus one step
        adv = R.udp_perturb(
            apply_fn,
            params,
            x,
            jax.random.PRNGKey(0),
            epsilon=10.0,
            step_size=0.02,
            num_steps=steps,
            norm=norm,
            random_stop=False,
        )
        entropies.append(float(jnp.mean(R.predictive_entropy(apply_fn(params, adv)))))
    start = float(jnp.mean(R.predictive_entropy(apply_fn(params, x))))
    assert np.all(np.diff([start, *entropies]) > 0), entropies


def test_udp_on_a_linear_model_walks_straight_to_the_boundary():
    """Binary linear f = w.x + c: entropy rises as |f| falls, so each l2 step is
    -sign(f) step w/||w||; with random stopping, sample i moves exactly stop_i steps."""
    dim = 4
    apply_fn, params = random_linear(5, dim)
    w, c = R.binary_linear(params)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, dim)).astype(np.float32)
    x += (np.sign(x @ w + c) * 3.0 / np.linalg.norm(w))[:, None] * w  # every point far away
    step, steps = 0.05, 6
    adv = np.asarray(
        R.udp_perturb(
            apply_fn,
            params,
            jnp.asarray(x),
            jax.random.PRNGKey(1),
            epsilon=1.0,
            step_size=step,
            num_steps=steps,
            norm="l2",
        )
    )
    delta = adv - x
    taken = np.linalg.norm(delta, axis=1) / step
    np.testing.assert_allclose(taken, np.round(taken), atol=1e-3)
    assert set(np.round(taken).astype(int)) == set(range(1, steps + 1))  # uniform in 1..K
    expected = -np.sign(x @ w + c)[:, None] * w / np.linalg.norm(w) * (taken * step)[:, None]
    np.testing.assert_allclose(delta, expected, atol=2e-5)


def test_pgd_on_a_linear_model_matches_the_closed_form():
    """l2 PGD on the logistic loss of a binary linear model from delta = 0: x - eps s w/||w||
    once the steps reach the ball (its boundary is where ascent stops)."""
    dim = 3
    apply_fn, params = random_linear(7, dim)
    w, _ = R.binary_linear(params)
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((50, dim)).astype(np.float32), rng.integers(0, 2, 50)
    adv = R.pgd_perturb(
        apply_fn,
        params,
        jnp.asarray(x),
        jnp.asarray(y),
        jax.random.PRNGKey(0),
        epsilon=0.4,
        step_size=0.1,
        num_steps=10,
        norm="l2",
        random_start=False,
    )
    s = 2 * y - 1
    expected = x - 0.4 * s[:, None] * w / np.linalg.norm(w)
    np.testing.assert_allclose(np.asarray(adv), expected, atol=1e-5)

    def loss(z):
        return optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, z), y)

    assert np.all(np.asarray(loss(adv)) > np.asarray(loss(jnp.asarray(x))))


def test_trades_perturbation_and_losses_against_numpy():
    apply_fn, params = random_mlp(2)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((16, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 16))
    adv = R.trades_perturb(
        apply_fn, params, x, jax.random.PRNGKey(0), epsilon=0.2, step_size=0.05, num_steps=5
    )
    assert float(jnp.max(jnp.abs(adv - x))) <= 0.2 + 1e-6
    batch = {"x": x, "y": y, "x_perturbed": adv}

    def log_softmax(z):
        z = np.asarray(z, np.float64)
        return (
            z
            - z.max(1, keepdims=True)
            - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
        )

    lp, lq = log_softmax(apply_fn(params, x)), log_softmax(apply_fn(params, adv))
    ce_clean = -lp[np.arange(16), np.asarray(y)].mean()
    ce_adv = -lq[np.arange(16), np.asarray(y)].mean()
    kl = (np.exp(lp) * (lp - lq)).sum(1).mean()
    for mode, expected in (
        ("clean", ce_clean),
        ("perturbed", ce_adv),
        ("clean+perturbed", ce_clean + 0.5 * ce_adv),
        ("trades", ce_clean + 0.5 * kl),
    ):
        got = float(R.classification_loss(apply_fn, params, batch, mode, 0.5))
        assert got == pytest.approx(expected, rel=1e-5), mode
    assert kl > 0


def test_margins_and_the_certified_max_margin():
    x, y = np.array([[0.0, 0.0], [3.0, 4.0]]), np.array([0, 1])
    svm = R.hard_margin_svm(x, y)
    assert svm.margin == pytest.approx(2.5, abs=1e-9)
    np.testing.assert_allclose(svm.w, [0.6, 0.8], atol=1e-9)
    assert R.linear_margin(svm.w, svm.c, x, y) == pytest.approx(2.5, abs=1e-9)
    for seed in range(3):
        data = synthetic.max_margin_data(dim=3, margin=0.7 + seed, seed=seed)
        assert R.linear_margin(data.w_star, 0.0, data.x, data.y) == pytest.approx(data.margin)
        svm = R.hard_margin_svm(data.x, data.y)
        assert svm.margin == pytest.approx(data.margin, abs=1e-6) and svm.gap < 1e-8
        assert float(svm.w @ data.w_star) == pytest.approx(1.0, abs=1e-6)


def test_hard_margin_svm_against_an_angle_scan():
    """Random separable 2-D data: the SVM margin equals the best margin over a fine scan of
    directions (for each direction the best bias is midway between the classes)."""
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal((40, 2))
        normal = rng.standard_normal(2)
        f = x @ normal
        keep = np.abs(f) > 0.3
        x, y = x[keep], (f[keep] > 0).astype(int)

        def best(angles, x=x, y=y):
            proj = x @ np.stack([np.cos(angles), np.sin(angles)])
            margins = (proj[y == 1].min(0) - proj[y == 0].max(0)) / 2
            return angles[margins.argmax()], margins.max()

        coarse = 2 * np.pi / 100_000
        angle, _ = best(np.linspace(0, 2 * np.pi, 100_001))
        _, scan = best(np.linspace(angle - coarse, angle + coarse, 100_001))  # zoom in
        assert R.hard_margin_svm(x, y).margin == pytest.approx(scan, abs=1e-8)
    with pytest.raises(ValueError, match="both classes"):
        R.hard_margin_svm(x, np.zeros(len(x), int))


def test_feature_reliance_and_flip_metrics():
    x, y = synthetic.slab_data(2000, seed=0)
    assert np.all((x[:, 0] > 0) == (y == 1))  # the simple coordinate alone separates
    np.testing.assert_array_equal(synthetic.slab_label(x[:, 1]), y)  # so does the complex one
    apply_fn, params = functional(LinearClassifier(2, 2, rngs=nnx.Rngs(0)))
    params["linear"]["kernel"] = jnp.asarray([[-1.0, 1.0], [0.0, 0.0]])  # uses x0 only
    assert R.accuracy(apply_fn, params, x, y) == 1.0
    assert R.randomized_feature_accuracy(apply_fn, params, x, y, [1]) == 1.0
    assert abs(R.randomized_feature_accuracy(apply_fn, params, x, y, [0]) - 0.5) < 0.05
    moved = x.copy()
    moved[:10, 0] *= -1
    assert R.flip_fraction(apply_fn, params, x, moved) == pytest.approx(10 / 2000)
    robust = R.robust_accuracy(
        apply_fn, params, x, y, jax.random.PRNGKey(0), epsilons=(0.0, 0.05, 2.0)
    )
    # Linf PGD against w = (2, 0): a point is broken iff |x0| <= eps.
    assert robust[0.0] == 1.0 and robust[2.0] == 0.0
    assert robust[0.05] == pytest.approx(np.mean(np.abs(x[:, 0]) > 0.05), abs=1e-3)


def test_classifier_objective_in_the_shared_step_is_a_hand_written_step():
    """One shared step (jaxlab.objectives.make_train_step) on the TRADES objective equals SGD on
    the TRADES loss written out here, with the perturbation taken at the second half of
    split(PRNGKey(seed)) and the first half carried on as the objective's state."""
    x, y = synthetic.two_moons(64, seed=1)
    x = jnp.asarray(x, jnp.float32)
    apply_fn, params = random_mlp(0, in_features=2, classes=2)
    ball = dict(epsilon=0.1, step_size=0.02, num_steps=3)
    transform = R.perturbation("udp", apply_fn, **ball)
    objective = R.classifier_objective(
        apply_fn, transform=transform, mode="trades", weight=0.5, seed=7
    )
    optimizer = optax.sgd(0.1)
    step = jax.jit(make_train_step(None, optimizer, objective=objective))
    new, metrics = step(init_train_state(params, optimizer, objective.init()), {"x": x, "y": y})

    chain, key = jax.random.split(jax.random.PRNGKey(7))
    moved = R.udp_perturb(apply_fn, params, x, key, **ball)

    def trades(p):
        clean, perturbed = apply_fn(p, x), apply_fn(p, moved)
        log_p, log_q = jax.nn.log_softmax(clean), jax.nn.log_softmax(perturbed)
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(clean, y))
        return ce + 0.5 * jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1))

    loss, grads = jax.value_and_grad(trades)(params)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    for got, want in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert set(metrics) == {"loss", "grad_norm", "param_norm"} and int(new.step) == 1
    np.testing.assert_array_equal(np.asarray(new.objective), np.asarray(chain))


def test_train_step_with_a_transform_and_bad_arguments():
    x, y = synthetic.two_moons(512, seed=0)
    apply_fn, params = functional(MLPClassifier(2, (32,), 2, rngs=nnx.Rngs(0)))
    optimizer = optax.adam(1e-2)
    transform = R.perturbation("udp", apply_fn, epsilon=0.05, step_size=0.01, num_steps=5)
    objective = R.classifier_objective(apply_fn, transform=transform, mode="clean+perturbed")
    result = R.train(
        objective, params, optimizer, R.batches(x.astype(np.float32), y, 128, 0), num_steps=300
    )
    assert result.losses[-20:].mean() < 0.5 * result.losses[:5].mean()
    assert R.accuracy(apply_fn, result.params, x, y) > 0.95
    with pytest.raises(ValueError, match="needs a transform"):
        R.classifier_objective(apply_fn, mode="perturbed")
    with pytest.raises(ValueError, match="mode must be one of"):
        R.classifier_objective(apply_fn, transform=transform, mode="adversarial")
    with pytest.raises(ValueError, match="method must be one of"):
        R.perturbation("fgsm", apply_fn)
    with pytest.raises(ValueError, match="norm must be one of"):
        R.udp_perturb(
            apply_fn,
            params,
            jnp.zeros((2, 2)),
            jax.random.PRNGKey(0),
            epsilon=0.1,
            step_size=0.1,
            num_steps=1,
            norm="l1",
        )


def test_small_cnn_matches_its_module_call():
    model = SmallCNN((28, 28, 1), 10, rngs=nnx.Rngs(0))
    apply_fn, params = functional(model)
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (3, 28, 28, 1)), jnp.float32)
    np.testing.assert_allclose(np.asarray(apply_fn(params, x)), np.asarray(model(x)), atol=1e-6)
    adv = R.udp_perturb(
        apply_fn,
        params,
        x,
        jax.random.PRNGKey(0),
        epsilon=0.1,
        step_size=0.05,
        num_steps=3,
        clip=(0.0, 1.0),
    )
    assert adv.shape == x.shape and float(jnp.max(jnp.abs(adv - x))) <= 0.1 + 1e-6


def test_vat_finds_the_most_sensitive_direction_of_a_linear_model():
    """For a binary linear model the KL Hessian at r = 0 is p(1 - p) w w^T: VAT's step is
    +-epsilon w/||w|| whatever the random start, in float32 and in 784 dimensions (exact
    Hessian-vector products; a finite difference of 1e-6 would be lost to rounding here)."""
    dim = 784
    apply_fn, params = random_linear(9, dim)
    params["linear"]["kernel"] = params["linear"]["kernel"] / np.sqrt(dim)  # moderate logits
    w, _ = R.binary_linear(params)
    x = jnp.asarray(np.random.default_rng(9).uniform(0, 1, (40, dim)), jnp.float32)
    adv = R.vat_perturb(apply_fn, params, x, jax.random.PRNGKey(3), epsilon=0.3)
    delta = np.asarray(adv - x, np.float64)
    np.testing.assert_allclose(np.linalg.norm(delta, axis=1), 0.3, rtol=1e-4)
    cosine = np.abs(delta @ w) / (np.linalg.norm(delta, axis=1) * np.linalg.norm(w))
    np.testing.assert_allclose(cosine, 1.0, atol=1e-4)
    batch = {"x": x, "y": jnp.zeros(40, jnp.int32)}
    transform = R.perturbation("vat", apply_fn, epsilon=0.3)
    via_transform = transform(params, batch, jax.random.PRNGKey(3))["x_perturbed"]
    np.testing.assert_allclose(np.asarray(via_transform), np.asarray(adv))


def test_vat_mode_holds_the_clean_distribution_constant_and_batches_check_the_size():
    apply_fn, params = random_mlp(4)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((16, 5)), jnp.float32)
    batch = {"x": x, "y": jnp.asarray(rng.integers(0, 3, 16)), "x_perturbed": x + 0.1}

    def kl_grad(mode):
        def kl(p):
            return R.classification_loss(apply_fn, p, batch, mode) - R.classification_loss(
                apply_fn, p, batch, "clean"
            )

        return jax.grad(kl)(params)

    def numpy_vat_grad():  # d/dparams of KL with p(x) fixed: -E_p[grad log q(x')]
        log_p = jax.lax.stop_gradient(jax.nn.log_softmax(apply_fn(params, x)))
        return jax.grad(
            lambda p: (
                -jnp.mean(
                    jnp.sum(
                        jnp.exp(log_p) * jax.nn.log_softmax(apply_fn(p, batch["x_perturbed"])), -1
                    )
                )
            )
        )(params)

    for a, b in zip(
        jax.tree.leaves(kl_grad("vat")), jax.tree.leaves(numpy_vat_grad()), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    trades, vat = jax.tree.leaves(kl_grad("trades")), jax.tree.leaves(kl_grad("vat"))
    same = [np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(trades, vat, strict=True)]
    assert not all(same)  # TRADES also differentiates through p(x)
    with pytest.raises(ValueError, match="batch_size must be in"):
        next(R.batches(np.zeros((4, 2)), np.zeros(4), 8, 0))
