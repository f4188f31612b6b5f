"""DoGE on generated domains with known roles: the synthetic half of ``experiments/doge.py``, kept
in the library so that tests run it too.

Five classification domains ``y ~ softmax(x W_i)`` around an out-of-domain target
(``jaxlab.data.synthetic.related_domains``: two related, one near-duplicate, one unrelated, one
with noise labels; roles assigned by a seeded permutation). A proxy MLP learns domain weights
with DoGE (OOD and universal) and DoReMi; fresh models are then trained on batches sampled with
each weight vector and compared on the target's held-out loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlab import mixing
from jaxlab.data import synthetic
from jaxlab.models.classifiers import MLPClassifier, functional
from jaxlab.objectives import init_train_state


def model(task, hidden, seed):
    dim = task.target.shape[0]
    return functional(MLPClassifier(dim, tuple(hidden), task.num_classes, rngs=nnx.Rngs(seed)))


def ce(apply_fn, params, x, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x), y))


def domain_batches(task, batch_size, rng):
    """Endless ``{x [k, B, d], y [k, B], target_x [B, d], target_y [B]}``: uniform over domains
    (as the authors sample), plus a target batch for the OOD scores."""
    k = len(task.roles)
    while True:
        parts = [synthetic.sample_domain(task, i, batch_size, rng) for i in range(k)]
        tx, ty = synthetic.sample_domain(task, "target", batch_size, rng)
        yield {
            "x": np.stack([p[0] for p in parts]),
            "y": np.stack([p[1] for p in parts]),
            "target_x": tx,
            "target_y": ty,
        }


def train_proxy(task, c, method: str, seed: int, reference_params=None):
    """Trains the proxy with ``method`` in ``doge-ood``, ``doge-universal``, ``doremi`` or
    ``uniform`` (plain training on the uniform mixture: DoReMi's reference model). Returns the
    final parameters, the averaged and per-step weights."""
    apply_fn, params = model(task, c.hidden, seed)
    k = len(task.roles)
    schedule = optax.cosine_decay_schedule(c.learning_rate, c.proxy_steps, alpha=c.final_lr_ratio)
    optimizer = optax.adam(schedule)

    def example_losses(p, batch):  # [k, batch]: each domain's per-example cross-entropy
        logits = jax.vmap(lambda x: apply_fn(p, x))(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    def domain_losses(p, batch):
        return jnp.mean(example_losses(p, batch), axis=1)

    def target_losses(p, batch):
        return ce(apply_fn, p, batch["target_x"], batch["target_y"])[None]

    frozen = {}
    if method.startswith("doge"):
        objective = method.split("-")[1]
        mixer = mixing.doge(
            num_domains=k,
            mu=c.mu_ood if objective == "ood" else c.mu_universal,
            lr_schedule=schedule,
            objective=objective,
            score_clip=tuple(c.score_clip),
        )
        targets = target_losses if objective == "ood" else None
        step = mixing.make_doge_step(domain_losses, optimizer, mixer, target_losses=targets)
    elif method == "doremi":
        mixer = mixing.doremi(
            num_domains=k, step_size=c.doremi_step_size, smoothing=c.doremi_smoothing
        )
        step = mixing.make_doremi_step(example_losses, optimizer, mixer)
        frozen = {"reference": reference_params}
    elif method == "uniform":
        mixer = mixing.doge(num_domains=k, mu=1.0, lr_schedule=0.0)  # lr 0: weights stay uniform
        step = mixing.make_doge_step(domain_losses, optimizer, mixer)
    else:
        raise ValueError(f"unknown method {method!r}")
    state = init_train_state(params, optimizer, mixer.init())
    step = jax.jit(step)
    data = domain_batches(task, c.batch_size, np.random.default_rng(seed + 1))
    trajectory = []
    for _ in range(c.proxy_steps):
        state, metrics = step(state, next(data), frozen)
        trajectory.append(metrics["weights"])
    return dict(
        params=state.params,
        average=np.asarray(mixing.averaged_weights(state.objective)),
        trajectory=np.asarray(jax.device_get(trajectory)),
        apply_fn=apply_fn,
        domain_losses=domain_losses,
        target_losses=target_losses,
    )


def score_signs(task, proxy, c, seed):
    """For each domain: does the sign of its DoGE-OOD score ``<g_i, g_target>`` agree with a
    central finite difference of the target loss along one SGD step on domain ``i``,
    ``L_target(theta - h g_i) - L_target(theta + h g_i)`` (about ``-2 h <g_i, g_target>``)?
    Float64, on a large fresh target sample (which also gives ``g_target``)."""
    rng = np.random.default_rng(seed + 7)
    batch = next(domain_batches(task, 4 * c.batch_size, rng))
    tx, ty = synthetic.sample_domain(task, "target", 20_000, rng)
    apply_fn = proxy["apply_fn"]
    with jax.enable_x64(True):
        params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), proxy["params"])
        batch = {
            k: jnp.asarray(v, jnp.float64) if v.dtype.kind == "f" else jnp.asarray(v)
            for k, v in batch.items()
        }
        tx = jnp.asarray(tx, jnp.float64)
        _, grads = mixing.domain_gradients(lambda p: proxy["domain_losses"](p, batch), params)
        target = jax.grad(lambda p: ce(apply_fn, p, tx, ty))(params)
        flat_target = mixing.flatten_selected(jax.tree.map(lambda t: t[None], target))[0]
        scores = np.asarray(jnp.asarray(mixing.flatten_selected(grads), jnp.float64) @ flat_target)
        changes = []
        for i in range(len(task.roles)):

            def step(sign, i=i):
                return jax.tree.map(lambda p, g: p + sign * c.fd_step * g[i], params, grads)

            changes.append(float(ce(apply_fn, step(-1), tx, ty) - ce(apply_fn, step(1), tx, ty)))
    changes = np.asarray(changes)
    return dict(
        scores=scores.tolist(),
        changes=changes.tolist(),
        agree=int(np.sum(np.sign(scores) == -np.sign(changes))),
    )


def train_base(task, weights, c, seed):
    """A fresh model on batches whose domains are drawn from ``weights``; the target's held-out
    loss at the end."""
    apply_fn, params = model(task, c.hidden, 1000 + seed)
    optimizer = optax.adam(
        optax.cosine_decay_schedule(c.learning_rate, c.base_steps, alpha=c.final_lr_ratio)
    )

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: ce(apply_fn, p, x, y))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(2000 + seed)
    opt_state = optimizer.init(params)
    k = len(task.roles)
    total = k * c.batch_size
    for _ in range(c.base_steps):
        counts = rng.multinomial(total, np.asarray(weights, np.float64) / np.sum(weights))
        parts = [synthetic.sample_domain(task, i, n, rng) for i, n in enumerate(counts) if n]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        params, opt_state, _ = step(params, opt_state, x, y)
    tx, ty = synthetic.sample_domain(task, "target", 20_000, np.random.default_rng(3000 + seed))
    return float(ce(apply_fn, params, tx, ty))


def run(c):
    """Everything for seeds ``c.seeds``: weights per method, score-sign checks, base losses."""
    results = []
    for seed in c.seeds:
        task = synthetic.related_domains(seed=seed)
        out = {"seed": seed, "roles": list(task.roles), "weights": {}, "trajectories": {}}
        reference = train_proxy(task, c, "uniform", seed)
        for method in ("doge-ood", "doge-universal", "doremi"):
            proxy = train_proxy(task, c, method, seed, reference_params=reference["params"])
            out["weights"][method] = proxy["average"].tolist()
            out["trajectories"][method] = proxy["trajectory"]
            if method == "doge-ood":
                out["signs"] = score_signs(task, proxy, c, seed)
        k = len(task.roles)
        out["target_loss"] = {
            "uniform": train_base(task, np.full(k, 1.0 / k), c, seed),
            "doge-ood": train_base(task, out["weights"]["doge-ood"], c, seed),
            "doremi": train_base(task, out["weights"]["doremi"], c, seed),
        }
        results.append(out)
        losses = {k: round(v, 4) for k, v in out["target_loss"].items()}
        print(
            f"synthetic seed {seed}: roles {task.roles}, DoGE-OOD "
            f"{np.round(out['weights']['doge-ood'], 3)}, target loss {losses}",
            flush=True,
        )
    return results


def role_shares(result, method):
    """Averaged weight per role (the two related domains summed)."""
    shares = {}
    for role, w in zip(result["roles"], result["weights"][method], strict=True):
        shares[role] = shares.get(role, 0.0) + w
    return shares
