"""jaxclip inside the JAX ecosystem: Optax wrappers, Flax, Equinox, Orbax and loggers.

Each test trains a tiny model for a few steps and checks what the clipper did
against NumPy computations on independently computed gradients. Flax, Equinox
and Orbax are test dependencies only; a test that needs one is skipped when it
is not installed.
"""

import csv
import functools
import importlib.util
import inspect
import io
import json
import logging
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import np_norm

import jaxclip

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
RTOL = 2e-5  # float32 training steps against float64 references

# -- a tiny model and its data ------------------------------------------------------------

IN, HIDDEN, OUT, BATCH = 3, 6, 2, 8
SPIKES = (3, 6)  # steps whose targets are scaled up: their gradients are much larger


def _params(seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {
        "dense": {"kernel": jax.random.normal(k1, (IN, HIDDEN)) / 2, "bias": jnp.zeros(HIDDEN)},
        "head": {"kernel": jax.random.normal(k2, (HIDDEN, OUT)) / 2, "bias": jnp.full(OUT, 0.1)},
    }


def _loss(params, x, y):
    h = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
    return jnp.mean((h @ params["head"]["kernel"] + params["head"]["bias"] - y) ** 2)


def _batch(t):
    rng = np.random.default_rng(100 + t)
    x = rng.normal(size=(BATCH, IN)).astype(np.float32)
    y = rng.normal(size=(BATCH, OUT)).astype(np.float32)
    return x, (y * 20 if t in SPIKES else y)


_grad = jax.jit(jax.grad(_loss))


def _flat(tree):
    """A pytree as ``{path: float64 array}``."""
    return {
        jax.tree_util.keystr(path): np.asarray(leaf, np.float64)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _train_step(tx):
    """A jitted training step ``(params, opt_state, x, y) -> (params, opt_state)``."""

    @jax.jit
    def step(params, opt_state, x, y):
        grads = jax.grad(_loss)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def _assert_close(actual, expected, rtol=RTOL, atol=1e-7):
    """Two flat dicts of arrays equal up to float32 rounding."""
    assert actual.keys() == expected.keys()
    for k in expected:
        np.testing.assert_allclose(actual[k], expected[k], rtol=rtol, atol=atol, err_msg=k)


def _torch_scale(norm, threshold, eps=1e-6):
    """PyTorch's clip_grad_norm_ factor: min(1, threshold / (norm + eps))."""
    return min(1.0, threshold / (norm + eps))


# -- 1. gradient accumulation with optax.MultiSteps ----------------------------------------


def _accumulate(clipper, k, macro_steps, lr):
    """Trains under MultiSteps; per accumulated step: params before, mean gradient, stats, after.

    Also checks, mini-step by mini-step, that nothing moves before the k-th.
    """
    tx = optax.MultiSteps(optax.chain(clipper, optax.sgd(lr)), every_k_schedule=k)
    params = _params()
    state = tx.init(params)
    step = _train_step(tx)
    records, t = [], 0
    for macro in range(macro_steps):
        before, grads = params, []
        for j in range(k):
            x, y = _batch(t)
            t += 1
            grads.append(_flat(_grad(params, x, y)))
            params, state = step(params, state, x, y)
            stats = jaxclip.get_stats(state)  # found inside MultiStepsState
            assert isinstance(stats, jaxclip.ClipStats)
            if j < k - 1:
                assert int(stats.step) == macro, "the clipper's state moved before the k-th step"
                assert int(state.gradient_step) == macro
                for name, leaf in _flat(params).items():
                    np.testing.assert_array_equal(leaf, _flat(before)[name])
        assert int(stats.step) == macro + 1
        assert int(state.gradient_step) == macro + 1
        assert int(state.mini_step) == 0
        mean = {name: np.mean([g[name] for g in grads], axis=0) for name in grads[0]}
        # the mean of the k gradients is not the last one: the check below can tell them apart
        assert abs(np_norm(mean.values()) - np_norm(grads[-1].values())) > 1e-3
        records.append((_flat(before), mean, stats, _flat(params)))
    return records


def test_multisteps_clips_the_mean_gradient_once_per_accumulated_step():
    max_norm, lr, k = 5.0, 0.1, 3  # mean norms are about 3, 9 and 10
    records = _accumulate(jaxclip.clip_by_global_norm(max_norm), k, macro_steps=3, lr=lr)
    clipped = []
    for before, mean, stats, after in records:
        norm = np_norm(mean.values())
        scale = min(1.0, max_norm / norm)
        np.testing.assert_allclose(float(stats.norm), norm, rtol=RTOL)
        np.testing.assert_allclose(float(stats.scale), scale, rtol=RTOL)
        assert float(stats.threshold) == pytest.approx(max_norm)
        assert bool(stats.clipped) == (norm > max_norm)
        clipped.append(norm > max_norm)
        _assert_close(after, {n: before[n] - lr * scale * mean[n] for n in mean})
    assert any(clipped) and not all(clipped)  # both branches were exercised
    assert int(records[-1][2].clipped_steps) == sum(clipped)


def test_multisteps_with_autoclip_sees_one_norm_per_accumulated_step():
    percentile, lr, k = 50.0, 0.1, 2
    clipper = jaxclip.autoclip(percentile=percentile, history=8)
    records = _accumulate(clipper, k, macro_steps=4, lr=lr)
    norms, clipped = [], []
    for i, (before, mean, stats, after) in enumerate(records):
        norm = np_norm(mean.values())
        norms.append(norm)
        threshold = float(np.percentile(norms, percentile))  # over accumulated steps only
        scale = _torch_scale(norm, threshold) if norm + 1e-6 > threshold else 1.0
        np.testing.assert_allclose(float(stats.norm), norm, rtol=RTOL)
        np.testing.assert_allclose(float(stats.threshold), threshold, rtol=RTOL)
        assert float(stats.extra["seen"]) == i + 1
        clipped.append(scale < 0.999)
        _assert_close(after, {n: before[n] - lr * scale * mean[n] for n in mean})
    assert any(clipped)


# -- 2. hyperparameters injected and scheduled ---------------------------------------------


def test_injected_max_norm_follows_its_schedule():
    lr = 0.05
    schedule = optax.linear_schedule(init_value=6.0, end_value=1.0, transition_steps=5)
    inject = optax.inject_hyperparams(jaxclip.clip_by_global_norm)(max_norm=schedule)
    tx = optax.chain(inject, optax.sgd(lr))
    params = _params()
    state = tx.init(params)
    step = _train_step(tx)
    clipped = []
    for t in range(7):
        x, y = _batch(t)
        grads = _flat(_grad(params, x, y))
        before = _flat(params)
        params, state = step(params, state, x, y)
        threshold = float(np.interp(t, [0, 5], [6.0, 1.0]))
        norm = np_norm(grads.values())
        stats = jaxclip.get_stats(state)
        np.testing.assert_allclose(float(stats.threshold), threshold, rtol=1e-6)
        np.testing.assert_allclose(float(state[0].hyperparams["max_norm"]), threshold, rtol=1e-6)
        np.testing.assert_allclose(float(stats.norm), norm, rtol=RTOL)
        scale = min(1.0, threshold / norm)
        clipped.append(norm > threshold)
        assert bool(stats.clipped) == clipped[-1]
        _assert_close(_flat(params), {n: before[n] - lr * scale * grads[n] for n in grads})
    assert any(clipped) and not all(clipped)


def test_injected_adaptive_percentile_follows_its_schedule():
    lr = 0.05
    percentile = optax.linear_schedule(init_value=90.0, end_value=10.0, transition_steps=4)
    inject = optax.inject_hyperparams(jaxclip.autoclip, static_args=("history",))
    tx = optax.chain(inject(percentile=percentile, history=16), optax.sgd(lr))
    params = _params()
    state = tx.init(params)
    step = _train_step(tx)
    norms = []
    for t in range(6):
        x, y = _batch(t)
        grads = _flat(_grad(params, x, y))
        before = _flat(params)
        params, state = step(params, state, x, y)
        norms.append(np_norm(grads.values()))
        q = float(np.interp(t, [0, 4], [90.0, 10.0]))
        threshold = float(np.percentile(norms, q))
        stats = jaxclip.get_stats(state)
        np.testing.assert_allclose(float(stats.threshold), threshold, rtol=RTOL)
        np.testing.assert_allclose(float(state[0].hyperparams["percentile"]), q, rtol=1e-6)
        scale = _torch_scale(norms[-1], threshold) if norms[-1] + 1e-6 > threshold else 1.0
        _assert_close(_flat(params), {n: before[n] - lr * scale * grads[n] for n in grads})
    assert int(jaxclip.get_stats(state).clipped_steps) >= 2


PER_EXAMPLE = np.array(
    [[0.3, 0.4], [1.2, 1.6], [1.8, 2.4], [2.4, 3.2]], np.float32
)  # norms .5 2 3 4


@pytest.mark.parametrize(
    "injected",
    [False, True],
    ids=["plain", "injected"],
)
def test_per_example_quantile_without_noise_is_exact_under_jit(injected):
    kwargs = dict(max_norm=1.0, target_quantile=0.5, quantile_learning_rate=0.3)
    if injected:
        tx = optax.inject_hyperparams(jaxclip.per_example_clip)(**kwargs)
    else:
        tx = jaxclip.per_example_clip(**kwargs)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    per_example = PER_EXAMPLE.astype(np.float64)
    norms = np.linalg.norm(per_example, axis=1)
    c = 1.0
    for _ in range(4):
        updates, state = update({"w": jnp.asarray(PER_EXAMPLE)}, state, params)
        scales = np.minimum(1.0, c / norms)
        expected = (per_example * scales[:, None]).mean(axis=0)
        np.testing.assert_allclose(np.asarray(updates["w"]), expected, rtol=RTOL)
        c = c * np.exp(-0.3 * (np.mean(norms <= c) - 0.5))
        np.testing.assert_allclose(float(jaxclip.per_example_clip_norm(state)), c, rtol=RTOL)


# -- 3. per-group clipping: optax.masked and optax.partition -------------------------------


def _is_kernel(path):
    return path[-1].key == "kernel"


def test_masked_clips_the_weights_and_leaves_the_biases():
    max_norm, lr = 3.0, 0.1
    mask = lambda p: jax.tree_util.tree_map_with_path(lambda path, _: _is_kernel(path), p)  # noqa: E731
    tx = optax.chain(optax.masked(jaxclip.clip_by_global_norm(max_norm), mask), optax.sgd(lr))
    params = _params()
    state = tx.init(params)
    step = _train_step(tx)
    for t in range(4):
        x, y = _batch(t)
        grads = _flat(_grad(params, x, y))
        before = _flat(params)
        params, state = step(params, state, x, y)
        weights = [v for n, v in grads.items() if n.endswith("['kernel']")]
        norm = np_norm(weights)
        scale = min(1.0, max_norm / norm)
        expected = {
            n: before[n] - lr * (scale if n.endswith("['kernel']") else 1.0) * g
            for n, g in grads.items()
        }
        _assert_close(_flat(params), expected)
        stats = jaxclip.get_stats(state)
        assert isinstance(stats, jaxclip.ClipStats)  # one record: the weights' group
        np.testing.assert_allclose(float(stats.norm), norm, rtol=RTOL)
        assert bool(stats.clipped) == (norm > max_norm)
    assert int(stats.clipped_steps) >= 1


def test_partition_gives_each_group_its_threshold_and_its_record():
    thresholds, lr = {"weights": 3.0, "biases": 1.0}, 0.1
    labels = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: "weights" if _is_kernel(path) else "biases", p
    )
    groups = {name: jaxclip.clip_by_global_norm(c) for name, c in thresholds.items()}
    tx = optax.chain(optax.partition(groups, labels), optax.sgd(lr))
    params = _params()
    state = tx.init(params)
    step = _train_step(tx)
    for t in range(4):
        x, y = _batch(t)
        grads = _flat(_grad(params, x, y))
        before = _flat(params)
        params, state = step(params, state, x, y)
        group_of = {n: "weights" if n.endswith("['kernel']") else "biases" for n in grads}
        norms = {g: np_norm([v for n, v in grads.items() if group_of[n] == g]) for g in thresholds}
        scales = {g: min(1.0, thresholds[g] / norms[g]) for g in thresholds}
        expected = {n: before[n] - lr * scales[group_of[n]] * v for n, v in grads.items()}
        _assert_close(_flat(params), expected)

        records = jaxclip.get_stats(state)
        assert isinstance(records, dict) and len(records) == 2
        for path, stats in records.items():
            (group,) = [g for g in thresholds if g in path.split("/")]
            np.testing.assert_allclose(float(stats.norm), norms[group], rtol=RTOL)
            assert float(stats.threshold) == pytest.approx(thresholds[group])
            assert bool(stats.clipped) == (norms[group] > thresholds[group])

        logged = jaxclip.stats_dict(state)
        norm_keys = sorted(k for k in logged if k.endswith("/norm"))
        assert len(norm_keys) == 2 and len(set(logged)) == len(logged)
        assert len(logged) == 2 * len(records[next(iter(records))].to_dict())
        for key in norm_keys:
            (group,) = [g for g in thresholds if g in key.split("/")]
            np.testing.assert_allclose(logged[key], norms[group], rtol=RTOL)
    counts = {p: int(s.clipped_steps) for p, s in jaxclip.get_stats(state).items()}
    assert all(c >= 1 for c in counts.values())


# -- 4. Flax: linen TrainState and NNX Optimizer -------------------------------------------


def _np_zclip(norms, warmup, z_thresh, alpha, eps=1e-6):
    """ZClip (z-score, adaptive scaling) in plain Python: scale, mean and std per step."""
    mean, var, out = 0.0, 0.0, []
    for count, n in enumerate(norms):  # count: norms seen before this one
        if count < warmup:
            new_mean = mean + (n - mean) / (count + 1)
            var = var + ((n - mean) * (n - new_mean) - var) / (count + 1)
            mean, scale = new_mean, 1.0
        else:
            std = np.sqrt(var)
            z = (n - mean) / (std + eps)
            spike = z > z_thresh
            target = mean + z_thresh**2 * std / z if spike else np.inf
            scale = target / (n + 1e-6) if n > target else 1.0
            x = target if spike else n
            mean = alpha * mean + (1 - alpha) * x
            var = alpha * var + (1 - alpha) * (x - mean) ** 2
        out.append((scale, mean, np.sqrt(var)))
    return out


def test_flax_linen_train_state_with_zclip_and_adamw():
    import flax  # noqa: F401  (the test extra installs it)
    from flax import linen as nn
    from flax.training import train_state

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(OUT)(jnp.tanh(nn.Dense(HIDDEN)(x)))

    model = MLP()
    x0, _ = _batch(0)
    params = model.init(jax.random.PRNGKey(1), x0)["params"]
    warmup, z_thresh, alpha = 3, 2.0, 0.9
    tx = optax.chain(
        jaxclip.zclip(alpha=alpha, z_thresh=z_thresh, warmup_steps=warmup),
        optax.adamw(1e-2, weight_decay=1e-4),
    )
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    def loss_fn(p, x, y):
        return jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)

    @jax.jit
    def train_step(state, x, y):
        grads = jax.grad(loss_fn)(state.params, x, y)
        return state.apply_gradients(grads=grads)

    # three warm-up steps, two ordinary ones, then targets 50 times larger: a spike
    batches = [_batch(t) for t in (0, 1, 2, 4, 5)]
    batches.append((batches[-1][0], batches[-1][1] * 50))
    reference_grad = jax.jit(jax.grad(loss_fn))
    grads, norms = [], []
    for x, y in batches:
        grads.append(_flat(reference_grad(state.params, x, y)))
        norms.append(np_norm(grads[-1].values()))
        state = train_step(state, x, y)
    reference = _np_zclip(norms, warmup, z_thresh, alpha)

    stats = jaxclip.get_stats(state.opt_state)
    scale, mean, std = reference[-1]
    assert int(stats.step) == len(batches) == int(state.step)
    assert bool(stats.clipped) and scale < 0.5  # the spike was cut
    assert int(stats.clipped_steps) == sum(s < 1 for s, _, _ in reference)
    np.testing.assert_allclose(float(stats.norm), norms[-1], rtol=RTOL)
    np.testing.assert_allclose(float(stats.scale), scale, rtol=1e-4)
    np.testing.assert_allclose(float(stats.extra["mean"]), mean, rtol=1e-4)
    np.testing.assert_allclose(float(stats.extra["std"]), std, rtol=1e-3)
    # Adam's first moment is an EMA of the gradients the clipper let through
    mu = {n: 0.0 for n in grads[0]}
    for g, (s, _, _) in zip(grads, reference):
        mu = {n: 0.9 * mu[n] + 0.1 * s * g[n] for n in g}
    adam_state = state.opt_state[1][0]
    _assert_close(_flat(adam_state.mu), mu, rtol=1e-4, atol=1e-6)


def _nnx_optimizer(nnx, model, tx):
    """``nnx.Optimizer`` across versions: newer ones require ``wrt``."""
    if "wrt" in inspect.signature(nnx.Optimizer.__init__).parameters:
        return nnx.Optimizer(model, tx, wrt=nnx.Param)
    return nnx.Optimizer(model, tx)


def _nnx_update(optimizer, model, grads):
    """``optimizer.update``: ``(model, grads)`` in newer versions, ``(grads)`` before."""
    if "model" in inspect.signature(optimizer.update).parameters:
        optimizer.update(model, grads)
    else:
        optimizer.update(grads)


def test_flax_nnx_optimizer_with_clip_by_global_norm():
    import flax  # noqa: F401  (the test extra installs it)
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(IN, HIDDEN, rngs=rngs)
            self.out = nnx.Linear(HIDDEN, OUT, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.hidden(x)))

    def loss_fn(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    model = MLP(nnx.Rngs(0))
    max_norm, lr = 5.0, 0.1
    optimizer = _nnx_optimizer(
        nnx, model, optax.chain(jaxclip.clip_by_global_norm(max_norm), optax.sgd(lr))
    )

    @nnx.jit
    def train_step(model, optimizer, x, y):
        grads = nnx.grad(loss_fn)(model, x, y)
        _nnx_update(optimizer, model, grads)

    reference_grad = nnx.jit(nnx.grad(loss_fn))
    unwrap = getattr(nnx, "as_pure", None) or nnx.pure
    clipped = []
    for t in range(5):
        x, y = _batch(t)
        grads = _flat(reference_grad(model, x, y))
        before = _flat(nnx.state(model, nnx.Param))
        train_step(model, optimizer, x, y)
        norm = np_norm(grads.values())
        scale = min(1.0, max_norm / norm)
        _assert_close(
            _flat(nnx.state(model, nnx.Param)),
            {n: before[n] - lr * scale * grads[n] for n in grads},
        )
        # the state's arrays are wrapped in nnx variables; as_pure (pure before) unwraps them
        stats = jaxclip.get_stats(unwrap(optimizer.opt_state))
        assert float(jaxclip.get_stats(optimizer.opt_state).norm) == float(stats.norm)
        np.testing.assert_allclose(float(stats.norm), norm, rtol=RTOL)
        assert bool(stats.clipped) == (norm > max_norm)
        clipped.append(norm > max_norm)
        logged = jaxclip.stats_dict(optimizer.opt_state)  # works on the wrapped state too
        np.testing.assert_allclose(logged["clip/norm"], norm, rtol=RTOL)
        assert logged["clip/step"] == t + 1
    assert any(clipped) and not all(clipped)


# -- 5. Equinox ----------------------------------------------------------------------------


# JAX 0.7.0 and 0.7.1 corrupt memory once an eqx.filter_jit function has run (a crash
# at exit or when it is collected); Equinox releases from 0.13.1 on refuse those versions.
BROKEN_FILTER_JIT = jax.__version__ in ("0.7.0", "0.7.1")


@pytest.mark.parametrize(
    "jit",
    [
        pytest.param(
            "filter_jit",
            marks=pytest.mark.skipif(
                BROKEN_FILTER_JIT, reason="eqx.filter_jit crashes on JAX 0.7.0/0.7.1"
            ),
        ),
        "partition_and_jit",
    ],
)
def test_equinox_with_clip_and_adam(jit):
    import equinox as eqx

    model = eqx.nn.MLP(IN, OUT, width_size=HIDDEN, depth=1, key=jax.random.PRNGKey(2))
    max_norm = 5.0
    tx = optax.chain(jaxclip.clip_by_global_norm(max_norm), optax.adam(1e-2))
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    def loss_fn(model, x, y):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    static = eqx.partition(model, eqx.is_array)[1]

    @jax.jit
    def reference_grad(params, x, y):
        return jax.grad(lambda p: loss_fn(eqx.combine(p, static), x, y))(params)

    if jit == "filter_jit":

        @eqx.filter_jit
        def train_step(model, opt_state, x, y):
            grads = eqx.filter_grad(loss_fn)(model, x, y)
            updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
            return eqx.apply_updates(model, updates), opt_state

    else:  # the arrays through jax.jit, the rest closed over

        @jax.jit
        def array_step(params, opt_state, x, y):
            grads = jax.grad(lambda p: loss_fn(eqx.combine(p, static), x, y))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        def train_step(model, opt_state, x, y):
            params, opt_state = array_step(eqx.filter(model, eqx.is_array), opt_state, x, y)
            return eqx.combine(params, static), opt_state

    mu, clipped = None, []
    for t in range(5):
        x, y = _batch(t)
        grads = _flat(reference_grad(eqx.filter(model, eqx.is_array), x, y))
        model, opt_state = train_step(model, opt_state, x, y)
        norm = np_norm(grads.values())
        scale = min(1.0, max_norm / norm)
        stats = jaxclip.get_stats(opt_state)
        np.testing.assert_allclose(float(stats.norm), norm, rtol=RTOL)
        np.testing.assert_allclose(float(stats.scale), scale, rtol=RTOL)
        assert bool(stats.clipped) == (norm > max_norm)
        clipped.append(norm > max_norm)
        mu = {n: 0.9 * (0.0 if mu is None else mu[n]) + 0.1 * scale * g for n, g in grads.items()}
        _assert_close(_flat(opt_state[1][0].mu), mu, rtol=1e-4, atol=1e-7)
    assert any(clipped) and not all(clipped)
    assert int(stats.step) == 5 and int(stats.clipped_steps) == sum(clipped)


# -- 6. Orbax: checkpoint, resume in a fresh process, compare bit for bit -------------------

RESUME_SCRIPT = HERE / "integrations" / "checkpoint_resume.py"
SAVED_AT, STOP = 6, 12
RESUME_TIMEOUT = 300  # seconds


@functools.cache
def _resume_module():
    spec = importlib.util.spec_from_file_location("jaxclip_checkpoint_resume", RESUME_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# the default run resumes a fixed and two adaptive clippers and SPAM; --slow resumes them all
QUICK_RESUME = ("clip_by_global_norm", "autoclip", "zclip", "spike_aware")


@pytest.mark.parametrize(
    "only",
    [
        pytest.param(QUICK_RESUME, id="four-optimizers"),
        pytest.param(None, id="every-clipper", marks=pytest.mark.slow),
    ],
)
def test_orbax_checkpoint_resumes_bit_identically_in_a_fresh_process(only):
    import orbax.checkpoint  # noqa: F401

    resume = _resume_module()
    names = only or tuple(resume.OPTIMIZERS)
    if only is None:
        assert len(names) == 12 and {"per_example_clip", "skip_on_spike", "stable_update"} <= set(
            names
        )
    with tempfile.TemporaryDirectory(prefix="jaxclip-ckpt-") as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "out").mkdir()
        with open(tmp / "log.txt", "w") as log:
            # the fresh process starts now and compiles while this one trains
            command = [sys.executable, str(RESUME_SCRIPT), str(tmp / "ckpt"), str(tmp / "out")]
            proc = subprocess.Popen(
                [*command, str(SAVED_AT), str(STOP), f"--only={','.join(names)}", "--wait"],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
            try:
                runs = resume.train(resume.initial_runs(names), 0, SAVED_AT)
                resume.save(tmp / "ckpt", runs)
                try:
                    proc.stdin.write("go\n")
                    proc.stdin.close()
                except BrokenPipeError:  # it has already failed: its log says why
                    pass
                # the uninterrupted runs continue here from the same point
                runs = resume.train(runs, SAVED_AT, STOP)
                returncode = proc.wait(timeout=RESUME_TIMEOUT)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        output = (tmp / "log.txt").read_text()
        assert returncode == 0, output[-4000:]
        for name in names:
            for stats in _records(runs[name]["opt_state"]):
                assert int(stats.step) > SAVED_AT  # the records kept counting after the save
            expected = resume.flat_leaves(runs[name])
            with np.load(tmp / "out" / f"{name}.npz") as data:
                resumed = dict(data)
            assert resumed.keys() == expected.keys(), name
            assert any(k.endswith(".clipped_steps") for k in expected), name  # ClipStats compared
            for key, value in expected.items():
                assert resumed[key].dtype == value.dtype, (name, key)
                assert np.array_equal(resumed[key], value), f"{name}: {key} differs after resuming"


def _records(opt_state):
    found = jaxclip.get_stats(opt_state)
    return list(found.values()) if isinstance(found, dict) else [found]


# -- 7. logging the statistics -------------------------------------------------------------


def _train_and_log(write, steps=4):
    """Trains with zclip, calling ``write(step, stats_dict)``; returns the reference norms."""
    tx = optax.chain(jaxclip.zclip(warmup_steps=2, z_thresh=2.0), optax.sgd(0.05))
    params = _params()
    state = tx.init(params)
    step = _train_step(tx)
    norms = []
    for t in range(steps):
        x, y = _batch(t)
        norms.append(np_norm(_flat(_grad(params, x, y)).values()))
        params, state = step(params, state, x, y)
        write(t, jaxclip.stats_dict(state))
    return norms


def test_stats_to_stdlib_logging(caplog):
    logger = logging.getLogger("train")
    with caplog.at_level(logging.INFO, logger="train"):
        norms = _train_and_log(lambda t, stats: logger.info("step %d %s", t, stats))
    records = [r for r in caplog.records if r.name == "train"]
    assert len(records) == len(norms)
    for t, (record, norm) in enumerate(zip(records, norms)):
        step, stats = record.args
        assert step == t
        assert all(type(v) is float for v in stats.values())
        np.testing.assert_allclose(stats["clip/norm"], norm, rtol=RTOL)
        assert stats["clip/step"] == t + 1
        assert f"'clip/norm': {stats['clip/norm']!r}" in record.getMessage()
    assert {"clip/extra/mean", "clip/extra/std", "clip/extra/z"} <= set(stats)


def test_stats_to_json_lines_and_csv():
    lines, rows = io.StringIO(), []

    def write(t, stats):
        row = {"step": t, **stats}
        lines.write(json.dumps(row) + "\n")
        rows.append(row)

    norms = _train_and_log(write)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)  # the keys are the same at every step

    from_json = [json.loads(line) for line in lines.getvalue().splitlines()]
    from_csv = list(csv.DictReader(io.StringIO(table.getvalue())))
    assert len(from_json) == len(from_csv) == len(norms)
    for t, (j, c, norm) in enumerate(zip(from_json, from_csv, norms)):
        assert j.keys() == c.keys() == rows[t].keys()
        np.testing.assert_allclose(j["clip/norm"], norm, rtol=RTOL)
        for key, value in j.items():
            assert float(c[key]) == value  # both formats round-trip the float exactly
    assert from_json[-1]["clip/extra/warmup"] == 0.0 and from_json[0]["clip/extra/warmup"] == 1.0
