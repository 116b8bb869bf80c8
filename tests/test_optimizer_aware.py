"""spike_aware (SPAM) and stable_update (StableAdamW) against NumPy transcriptions of
the authors' optimizers, plus errors, jit, statistics, low precision and checkpoints."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxclip
from jaxclip import SpikeAwareState, StableUpdateState, spike_aware, stable_update

LR, B1, B2, EPS, WD = 1e-3, 0.9, 0.999, 1e-8, 0.01


def make_params(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(4, 3)), dtype),
        "b": jnp.asarray(rng.normal(size=(5,)), dtype),
    }


def make_grads(steps, spikes, seed=1, factor=1000.0):
    """Gradients of magnitude 0.5..1.5 with random signs; ``spikes`` maps a step
    (1-based) to the flat indices of "w" multiplied by ``factor`` there."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(1, steps + 1):
        g = {
            name: rng.uniform(0.5, 1.5, size=shape) * rng.choice([-1.0, 1.0], size=shape)
            for name, shape in (("w", (4, 3)), ("b", (5,)))
        }
        for i in spikes.get(k, ()):
            g["w"].flat[i] *= factor
        out.append(g)
    return out


# -- NumPy transcriptions of the authors' code (float64) ---------------------------------


def spam_reference(params, grads, *, theta, R, W, N, wd=WD):
    """galore_torch/SPAM.py (ffuhu/SPAM-Optimizer), AdamW.step, without the GaLore
    masks: returns the params after every step and whether a coordinate was clipped."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    total_step, current_step, step = 0, W + 1, 0

    def get_dr(cur):  # CosineDecay(0.99, W).get_dr: CosineAnnealingLR(T_max=W + 1) closed form
        if cur >= W:
            return 0.0
        return 0.99 * (1 + math.cos(math.pi * cur / (W + 1))) / 2

    history, clipped = [], []
    for g_tree in grads:
        scale_factor = 1 - get_dr(current_step)
        step += 1  # noqa: SIM113 (the reference's own counters, kept as written)
        any_clipped = False
        for name in p:
            g = np.array(g_tree[name], np.float64)
            if (total_step + 1) % R == 0:
                m[name], v[name] = np.zeros_like(g), np.zeros_like(g)
            cur = total_step + 1
            if theta != 0 and cur >= N:
                mask = g**2 > theta * v[name]
                if cur % R >= N:
                    g[mask] = np.sign(g[mask]) * np.sqrt(v[name][mask] * theta)
                    any_clipped |= bool(mask.any())
            m[name] = B1 * m[name] + (1 - B1) * g
            v[name] = B2 * v[name] + (1 - B2) * g * g
            denom = np.sqrt(v[name]) + EPS
            step_size = LR * math.sqrt(1 - B2**step) / (1 - B1**step)
            p[name] = p[name] - step_size * scale_factor * m[name] / denom
            if wd > 0:
                p[name] = p[name] - LR * wd * p[name]
        total_step += 1  # noqa: SIM113
        current_step += 1
        if total_step != 0 and (total_step + 1) % R == 0:
            current_step = 0
        history.append({k: x.copy() for k, x in p.items()})
        clipped.append(any_clipped)
    return history, clipped


def stableadamw_reference(params, grads, *, eps, clip_decay=False):
    """StableAdamWUnfused (Wortsman et al.): debiased betas, per-tensor RMS, decoupled
    decay (with ``clip_decay`` the decay uses the clipped learning rate too)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    u = {k: np.zeros_like(v) for k, v in p.items()}
    step = 1.0
    history, rms_history = [], []
    for g_tree in grads:
        rms_step = {}
        for name in p:
            g = np.asarray(g_tree[name], np.float64)
            b1hat = B1 * (1 - B1 ** (step - 1)) / (1 - B1**step)
            b2hat = B2 * (1 - B2 ** (step - 1)) / (1 - B2**step)
            m[name] = b1hat * m[name] + (1 - b1hat) * g
            u[name] = b2hat * u[name] + (1 - b2hat) * g * g
            denom = np.sqrt(u[name]) + eps
            rms = math.sqrt(np.mean(g**2 / np.maximum(u[name], eps**2)))
            lr_t = LR / max(1.0, rms)
            decay = lr_t if clip_decay else LR
            p[name] = p[name] * (1 - decay * WD) - lr_t * m[name] / denom
            rms_step[name] = rms
        step += 1
        history.append({k: x.copy() for k, x in p.items()})
        rms_history.append(rms_step)
    return history, rms_history


def run(tx, params, grads, jit=True, with_stats=True):
    """Applies ``tx`` over ``grads``; returns the params and stats after every step."""

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    step = jax.jit(step) if jit else step
    state = tx.init(params)
    history, stats = [], []
    for g in grads:
        g = jax.tree.map(lambda x, p: jnp.asarray(x, p.dtype), g, params)
        params, state = step(params, state, g)
        history.append(params)
        if with_stats:
            stats.append(jaxclip.get_stats(state))
    return history, stats, state


def assert_tree_close(actual, expected, rtol=1e-5, atol=1e-6):
    for name in expected:
        np.testing.assert_allclose(
            np.asarray(actual[name], np.float64), expected[name], rtol=rtol, atol=atol
        )


# -- faithfulness --------------------------------------------------------------------------


def test_spike_aware_matches_the_reference_step_for_step():
    params = make_params()
    # spikes before the first clipping step (3), in play (8, 40, 45), in the windows
    # after the resets at 25 and 50 (27, 52)
    grads = make_grads(60, {3: [0], 8: [1, 5], 27: [2], 40: [7], 45: [3], 52: [0, 11]})
    kw = dict(theta=5000.0, R=25, W=10, N=5)
    expected, ref_clipped = spam_reference(params, grads, **kw)
    tx = spike_aware(
        optax.adamw(LR, B1, B2, EPS, weight_decay=WD),
        theta=5000.0,
        reset_interval=25,
        warmup_steps=10,
        no_clip_steps=5,
    )
    history, stats, _ = run(tx, params, grads)
    for k, (actual, want) in enumerate(zip(history, expected), start=1):
        try:
            assert_tree_close(actual, want)
        except AssertionError as e:
            raise AssertionError(f"step {k}") from e
    assert [bool(s.clipped) for s in stats] == ref_clipped
    assert [k for k, c in enumerate(ref_clipped, start=1) if c] == [8, 40, 45]
    # and clipping matters: plain AdamW ends elsewhere
    adamw = optax.adamw(LR, B1, B2, EPS, weight_decay=WD)
    plain, _, _ = run(adamw, params, grads, with_stats=False)
    assert not np.allclose(plain[-1]["w"], expected[-1]["w"], rtol=1e-4)


@pytest.mark.parametrize("clip_decay", [False, True])
def test_stable_update_matches_the_reference(clip_decay):
    params = make_params()
    grads = make_grads(40, {5: [0, 1, 2], 20: [4], 33: [0, 3, 6, 9]})
    expected, ref_rms = stableadamw_reference(params, grads, eps=EPS, clip_decay=clip_decay)
    tx = stable_update(
        optax.adamw(LR, B1, B2, EPS, weight_decay=WD),
        eps=EPS**2,
        b2=B2,
        scale_weight_decay=clip_decay,
    )
    history, stats, _ = run(tx, params, grads)
    for actual, want in zip(history, expected):
        assert_tree_close(actual, want)
    max_rms = [max(r.values()) for r in ref_rms]
    np.testing.assert_allclose([float(s.extra["max_rms"]) for s in stats], max_rms, rtol=1e-4)
    assert sum(r > 1 for r in max_rms) >= 3  # the test exercises the clipping
    assert [bool(s.clipped) for s in stats] == [r > 1 for r in max_rms]


def test_reset_keeps_the_adam_count_and_restarts_the_moments():
    params = make_params()
    grads = make_grads(5, {})
    tx = spike_aware(optax.adam(LR), reset_interval=4, warmup_steps=2, no_clip_steps=2)
    *_, state = run(tx, params, grads[:4])
    adam = state.inner[0]
    assert int(adam.count) == 4 and int(state.step) == 4
    g = np.asarray(grads[3]["w"], np.float32)
    # step 4 reset the moments, then added one gradient to them
    np.testing.assert_allclose(adam.mu["w"], (1 - B1) * g, rtol=1e-6)
    np.testing.assert_allclose(adam.nu["w"], (1 - B2) * g * g, rtol=1e-6)


# -- weight decay placement ---------------------------------------------------------------


@pytest.mark.parametrize("scale_weight_decay", [False, True])
def test_warmup_leaves_weight_decay_unscaled_by_default(scale_weight_decay):
    # zero gradients: Adam's part is 0, the update is the decay alone
    params = make_params()
    tx = spike_aware(
        optax.adamw(0.1, weight_decay=0.5),
        reset_interval=2,
        warmup_steps=5,
        scale_weight_decay=scale_weight_decay,
    )
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    _, state = tx.update(zeros, state, params)
    updates, state = tx.update(zeros, state, params)  # step 2: a reset, factor 0.01
    factor = float(jaxclip.get_stats(state).scale)
    assert factor == pytest.approx(0.01, rel=1e-5)
    expected = -0.1 * 0.5 * np.asarray(params["w"]) * (factor if scale_weight_decay else 1.0)
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("wrapper", [spike_aware, stable_update])
def test_a_non_adam_inner_is_refused_naming_its_state(wrapper):
    with pytest.raises(TypeError, match=r"ScaleByAdamState.*found TraceState"):
        wrapper(optax.sgd(0.1, momentum=0.9)).init(make_params())
    with pytest.raises(ValueError, match="2 ScaleByAdamStates"):
        wrapper(optax.chain(optax.adam(0.1), optax.adam(0.1))).init(make_params())


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: spike_aware(optax.adam(0.1), theta=-1.0), "theta.*-1.0"),
        (lambda: spike_aware(optax.adam(0.1), reset_interval=0), "reset_interval.*got 0"),
        (lambda: spike_aware(optax.adam(0.1), warmup_steps=2.5), "warmup_steps.*2.5"),
        (lambda: spike_aware(optax.adam(0.1), no_clip_steps=-1), "no_clip_steps.*-1"),
        (lambda: spike_aware(optax.adam(0.1), warmup_depth=1.5), "warmup_depth.*1.5"),
        (lambda: stable_update(optax.adam(0.1), eps=0.0), "eps.*0.0"),
        (lambda: stable_update(optax.adam(0.1), threshold=-2.0), "threshold.*-2.0"),
        (lambda: stable_update(optax.adam(0.1), b2=1.0), "b2.*1.0"),
    ],
)
def test_bad_hyperparameters_raise_naming_them(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_b2_must_agree_with_an_injected_b2():
    inner = optax.inject_hyperparams(optax.adamw)(learning_rate=LR, b2=0.95)
    with pytest.raises(ValueError, match=r"b2=0.999.*0.95"):
        stable_update(inner, b2=0.999).init(make_params())


# -- transformations, composition, precision, checkpoints -------------------------------------


@pytest.mark.parametrize("wrapper", [spike_aware, stable_update])
def test_jit_and_eager_agree(wrapper):
    params = make_params()
    grads = make_grads(12, {4: [0], 9: [3]})
    kw = dict(reset_interval=5, warmup_steps=3, no_clip_steps=2) if wrapper is spike_aware else {}
    tx = wrapper(optax.adamw(LR, weight_decay=WD), **kw)
    eager, eager_stats, _ = run(tx, params, grads, jit=False)
    jitted, jitted_stats, _ = run(tx, params, grads, jit=True)
    assert_tree_close(eager[-1], jax.tree.map(np.asarray, jitted[-1]), rtol=1e-6)
    assert int(eager_stats[-1].clipped_steps) == int(jitted_stats[-1].clipped_steps)


@pytest.mark.parametrize("wrapper", [spike_aware, stable_update])
def test_the_update_differentiates_as_the_inner_where_nothing_is_clipped(wrapper):
    params = make_params()
    g1, g2 = (jax.tree.map(jnp.float32, g) for g in make_grads(2, {}))
    loose = {"theta": 1e12, "no_clip_steps": 2} if wrapper is spike_aware else {"threshold": 1e12}
    weights = jax.tree.map(lambda x: jnp.linspace(-1.0, 2.0, x.size).reshape(x.shape), params)

    def derivative(tx):
        state = tx.update(g1, tx.init(params), params)[1]
        total = lambda g: optax.tree.vdot(tx.update(g, state, params)[0], weights)  # noqa: E731
        return jax.jit(jax.grad(total))(g2)

    want = derivative(optax.adam(LR))
    got = derivative(wrapper(optax.adam(LR), **loose))
    assert_tree_close(got, jax.tree.map(np.asarray, want), rtol=1e-5, atol=0)
    assert all(np.abs(np.asarray(x)).min() > 0 for x in jax.tree.leaves(want))
    if wrapper is spike_aware:  # a clipped coordinate no longer depends on the gradient
        tight = derivative(spike_aware(optax.adam(LR), theta=1e-6, no_clip_steps=2))
        assert all(not np.asarray(x).any() for x in jax.tree.leaves(tight))


def test_injected_hyperparameters_and_chain():
    params = make_params()
    grads = make_grads(30, {8: [0], 21: [5]})
    kw = dict(theta=50.0, reset_interval=10, warmup_steps=4, no_clip_steps=3)
    injected = optax.inject_hyperparams(optax.adamw)(learning_rate=LR, b2=0.95, weight_decay=WD)
    plain = optax.adamw(LR, b2=0.95, weight_decay=WD)
    a, _, _ = run(spike_aware(injected, **kw), params, grads)
    b, stats, state = run(optax.chain(spike_aware(plain, **kw)), params, grads)
    assert_tree_close(a[-1], jax.tree.map(np.asarray, b[-1]), rtol=1e-6)
    assert isinstance(state[0], SpikeAwareState) and int(stats[-1].step) == 30
    # stable_update reads b2 from the injected state: same as giving it
    c, _, _ = run(stable_update(injected), params, grads)
    d, _, _ = run(stable_update(plain, b2=0.95), params, grads)
    e, _, _ = run(stable_update(plain), params, grads)  # wrongly assumes 0.999
    assert_tree_close(c[-1], jax.tree.map(np.asarray, d[-1]), rtol=1e-6)
    assert not np.allclose(np.asarray(c[-1]["w"]), np.asarray(e[-1]["w"]), rtol=1e-7, atol=0)


def test_spike_aware_stats():
    tx = spike_aware(optax.adam(0.1, b2=0.5), theta=10.0, reset_interval=4, no_clip_steps=2)
    params = jnp.zeros(4)
    state = tx.init(params)
    for g in ([1.0, 2.0, 1.0, 1.0], [1.0, 2.0, 1.0, 1.0], [100.0, 2.0, -30.0, 1.0]):
        _, state = tx.update(jnp.array(g), state, params)
    stats = jaxclip.get_stats(state)
    assert isinstance(state, SpikeAwareState)
    # v before step 3: 0.75 * g**2 of steps 1-2, so g**2 / v = [13333.3, 1.333, 1200, 1.333]
    assert float(stats.extra["max_ratio"]) == pytest.approx(1e4 / 0.75, rel=1e-5)
    assert float(stats.extra["clipped_fraction"]) == 0.5
    assert bool(stats.clipped) and int(stats.clipped_steps) == 1
    assert float(stats.norm) == pytest.approx(math.sqrt(1e4 + 4 + 900 + 1), rel=1e-6)
    assert float(stats.threshold) == 10.0 and float(stats.scale) == 1.0
    assert int(stats.extra["steps_since_reset"]) == 3
    _, state = tx.update(jnp.array([1.0, 1.0, 1.0, 1.0]), state, params)  # step 4: reset
    logged = jaxclip.stats_dict(state)
    assert logged["clip/scale"] == pytest.approx(0.01, rel=1e-5)
    assert logged["clip/extra/steps_since_reset"] == 0.0 and logged["clip/clipped"] == 0.0


def test_stable_update_stats():
    tx = stable_update(optax.adam(1.0, b2=0.5), b2=0.5, threshold=1.1)
    params = {"a": jnp.zeros(2), "b": jnp.zeros(2), "c": jnp.zeros(2)}
    state = tx.init(params)
    ones = jax.tree.map(jnp.ones_like, params)
    _, state = tx.update(ones, state)
    assert float(jaxclip.get_stats(state).extra["max_rms"]) == pytest.approx(1.0, rel=1e-6)
    grads = {"a": jnp.ones(2), "b": jnp.full(2, 10.0), "c": jnp.full(2, 3.0)}
    updates, state = tx.update(grads, state)
    stats = jaxclip.get_stats(state)
    assert isinstance(state, StableUpdateState)
    # v_hat = (0.25 + 0.5 g**2) / 0.75, so RMS = |g| / sqrt(v_hat): 1 for a, 1.22 for b, 1.19 for c
    rms_b, rms_c = math.sqrt(100 / (50.25 / 0.75)), math.sqrt(9 / (4.75 / 0.75))
    assert float(stats.extra["max_rms"]) == pytest.approx(rms_b, rel=1e-5)
    assert float(stats.extra["clipped_fraction"]) == pytest.approx(2 / 3)
    assert float(stats.scale) == pytest.approx(1.1 / rms_b, rel=1e-5)
    assert int(stats.clipped_steps) == 1 and float(stats.threshold) == pytest.approx(1.1)
    adam = optax.adam(1.0, b2=0.5)
    plain, _ = adam.update(grads, adam.update(ones, adam.init(params))[1])
    np.testing.assert_allclose(updates["a"], plain["a"], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], plain["b"] * 1.1 / rms_b, rtol=1e-5)
    np.testing.assert_allclose(updates["c"], plain["c"] * 1.1 / rms_c, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("wrapper", [spike_aware, stable_update])
def test_low_precision_leaves_run_and_stay_finite(wrapper, dtype):
    params = make_params(dtype)
    # 100x spikes: a 1000x one overflows float16 in Optax's own nu (g**2 > 65504)
    grads = make_grads(30, {6: [0], 12: [1, 2], 25: [4]}, factor=100.0)
    kw = dict(reset_interval=10, warmup_steps=4, no_clip_steps=3) if wrapper is spike_aware else {}
    history, stats, state = run(wrapper(optax.adamw(1e-2, weight_decay=WD), **kw), params, grads)
    assert all(x.dtype == dtype for x in jax.tree.leaves(history[-1]))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(history[-1]))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.inner))
    assert all(bool(s.finite) for s in stats) and int(stats[-1].clipped_steps) > 0
    moved = np.asarray(history[-1]["w"], np.float32) != np.asarray(params["w"], np.float32)
    assert moved.mean() > 0.9


@pytest.mark.parametrize("wrapper", [spike_aware, stable_update])
def test_state_round_trip_through_numpy(wrapper):
    params = make_params()
    grads = make_grads(16, {5: [0], 12: [2]})
    kw = dict(reset_interval=6, warmup_steps=3, no_clip_steps=2) if wrapper is spike_aware else {}
    tx = wrapper(optax.adamw(LR, weight_decay=WD), **kw)

    @jax.jit
    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    p, state = params, tx.init(params)
    for g in grads[:8]:
        p, state = step(p, state, g)
    saved = jax.tree.map(np.asarray, state)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(saved))
    p_a, s_a, p_b, s_b = p, state, jax.tree.map(np.asarray, p), saved
    for g in grads[8:]:
        p_a, s_a = step(p_a, s_a, g)
        p_b, s_b = step(p_b, s_b, g)
    assert_tree_close(p_a, jax.tree.map(np.asarray, p_b), rtol=0, atol=0)
    assert jax.tree.structure(s_a) == jax.tree.structure(s_b)
    assert int(jaxclip.get_stats(s_b).step) == 16


@pytest.mark.parametrize("wrapper", [spike_aware, stable_update])
def test_multisteps_wraps_it_as_one_step_per_mean_gradient(wrapper):
    """Under optax.MultiSteps the wrapper sees the mean of every ``k`` gradients as one step
    (its step count, reset and statistics included)."""
    params, k = make_params(), 3
    grads = make_grads(18, {4: [0], 13: [2, 5]}, factor=300.0)
    kw = dict(reset_interval=3, warmup_steps=2, no_clip_steps=1) if wrapper is spike_aware else {}
    kw |= {"theta": 50.0} if wrapper is spike_aware else {"threshold": 0.5}
    means = [
        jax.tree.map(lambda *g: np.mean(g, axis=0), *grads[i : i + k])
        for i in range(0, len(grads), k)
    ]
    expected, expected_stats, _ = run(
        wrapper(optax.adamw(0.1, weight_decay=WD), **kw), params, means
    )
    tx = optax.MultiSteps(wrapper(optax.adamw(0.1, weight_decay=WD), **kw), every_k_schedule=k)
    history, stats, _ = run(tx, params, grads)
    for i, (want, want_stats) in enumerate(zip(expected, expected_stats)):
        assert_tree_close(history[k * i + k - 1], want)
        assert_tree_close(history[k * i], params if i == 0 else expected[i - 1])
        got = stats[k * i + k - 1]
        assert int(got.step) == int(want_stats.step) == i + 1
        assert bool(got.clipped) == bool(want_stats.clipped)
        np.testing.assert_allclose(float(got.norm), float(want_stats.norm), rtol=1e-5)
    assert int(stats[-1].clipped_steps) > 0  # the test exercises the clipping


@pytest.mark.parametrize("wrapper", [spike_aware, stable_update])
def test_axis_name_alone_is_checked_and_replicated_needs_it(wrapper):
    with pytest.raises(ValueError, match="axis_name must be a mapped axis name"):
        wrapper(optax.adam(1e-3), axis_name=3)
    with pytest.raises(ValueError, match="replicated only applies together with axis_name"):
        wrapper(optax.adam(1e-3), replicated=lambda path, leaf: True)
