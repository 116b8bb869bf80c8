"""The adaptive clippers, step by step against NumPy versions of the published rules."""

import functools
import math

import _references as ref
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxclip

_JITTED = {}  # per transformation, its jitted update: compiled once for all examples


def _jitted_update(tx):
    if tx not in _JITTED:
        _JITTED[tx] = jax.jit(tx.update)
    return _JITTED[tx]


def _drive(tx, norms, jit=True):
    """Feeds gradients [n_t] (global norm n_t); returns the applied factors and states."""
    state = tx.init(jnp.zeros(1))
    update = _jitted_update(tx) if jit else tx.update
    scales, states = [], []
    for n in norms:
        g = jnp.array([n], jnp.float32)
        out, state = update(g, state)
        scales.append(float(out[0]) / float(g[0]) if float(g[0]) else 1.0)
        states.append(state)
    return np.array(scales), states


# -- AutoClip ---------------------------------------------------------------------------


@pytest.mark.parametrize("percentile", [10.0, 50.0, 90.0])
def test_autoclip_matches_the_published_rule(percentile):
    norms = ref.spiky_norms(60, seed=1)
    scales, states = _drive(jaxclip.autoclip(percentile), norms)
    expected = ref.autoclip(norms, percentile)
    np.testing.assert_allclose(scales, [e["scale"] for e in expected], rtol=2e-6)
    thresholds = [float(s.stats.threshold) for s in states]
    np.testing.assert_allclose(thresholds, [e["threshold"] for e in expected], rtol=2e-6)


def test_autoclip_hand_checked():
    scales, states = _drive(jaxclip.autoclip(50.0), [5.0, 1.0, 50.0, 2.0])
    # step 1: the median of [5] is 5: PyTorch's formula scales by 5 / (5 + 1e-6);
    # step 3: the median of [5, 1, 50] is 5
    assert scales[0] == pytest.approx(5.0 / (5.0 + 1e-6), rel=1e-7)
    assert float(states[1].stats.threshold) == pytest.approx(3.0)  # median of [5, 1]
    assert scales[1] == 1.0
    assert scales[2] == pytest.approx(5.0 / (50.0 + 1e-6), rel=1e-6)
    assert float(states[3].stats.threshold) == pytest.approx(3.5)  # median of [5, 1, 50, 2]


def test_autoclip_bounded_history_uses_the_latest_norms():
    norms = [10.0, 20.0, 30.0, 1.0, 2.0, 3.0]
    _, states = _drive(jaxclip.autoclip(50.0, history=3), norms)
    assert float(states[-1].stats.threshold) == pytest.approx(2.0)  # median of [1, 2, 3]
    assert float(states[2].stats.threshold) == pytest.approx(20.0)


AUTOCLIP_MAX = jaxclip.autoclip(100.0, history=32)
AUTOCLIP_MAX_NO_EPS = jaxclip.autoclip(100.0, history=32, eps=0.0)


@given(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=30))
def test_autoclip_percentile_100_never_clips(norms):
    # the threshold is the largest norm so far, never below the current one
    scales, states = _drive(AUTOCLIP_MAX, norms)
    for n, scale, state in zip(norms, scales, states):
        assert float(state.stats.threshold) >= np.float32(n)
        # only PyTorch's eps can touch the gradient: n / (n + 1e-6) at most
        assert scale >= np.float32(n) / (np.float32(n) + 1e-6) * (1 - 1e-6)
    scales, states = _drive(AUTOCLIP_MAX_NO_EPS, norms)
    np.testing.assert_array_equal(scales, 1.0)
    assert int(states[-1].stats.clipped_steps) == 0


# -- ZClip ------------------------------------------------------------------------------

ZCLIP_OPTIONS = [
    {},
    {"clip_option": "mean"},
    {"mode": "percentile"},
    {"skip_update_on_spike": True},
    {"clip_factor": 0.7},
    {"max_norm": 1.5},
    {"alpha": 0.9, "z_thresh": 2.0, "warmup_steps": 10},
]


@pytest.mark.parametrize("options", ZCLIP_OPTIONS, ids=lambda o: ",".join(o) or "defaults")
def test_zclip_matches_the_published_rule(options):
    norms = ref.spiky_norms(120, seed=2)
    scales, states = _drive(jaxclip.zclip(**options), norms)
    expected = ref.zclip(norms, **options)
    np.testing.assert_allclose(scales, [e["scale"] for e in expected], rtol=1e-5)
    spikes = [bool(s.stats.extra["spike"]) for s in states]
    assert spikes == [e["spike"] for e in expected]
    assert any(spikes)
    for s, e in zip(states, expected):
        if e["mean"] is not None:
            assert float(s.rule.mean) == pytest.approx(e["mean"], rel=1e-5)
            assert float(s.rule.var) == pytest.approx(e["var"], rel=1e-4)


def test_zclip_hand_checked():
    tx = jaxclip.zclip(warmup_steps=3)
    scales, states = _drive(tx, [1.0, 2.0, 3.0, 10.0])
    # warmup [1, 2, 3]: mean 2, population variance 2/3; nothing clipped
    np.testing.assert_array_equal(scales[:3], 1.0)
    assert float(states[2].rule.mean) == pytest.approx(2.0)
    assert float(states[2].rule.var) == pytest.approx(2 / 3)
    # n = 10: z = 8 / sqrt(2/3) = 9.80 > 2.5; c = 2 + 2.5^2 * std / z = 2 + 6.25 * (2/3) / 8
    c = 2.0 + 6.25 * (2 / 3) / 8.0
    assert scales[3] == pytest.approx(c / 10.0, rel=1e-5)
    assert float(states[3].stats.extra["z"]) == pytest.approx(8 / math.sqrt(2 / 3), rel=1e-5)
    # the EMA is fed c, and the variance uses the updated mean
    mean = 0.97 * 2.0 + 0.03 * c
    assert float(states[3].rule.mean) == pytest.approx(mean, rel=1e-6)
    assert float(states[3].rule.var) == pytest.approx(0.97 * 2 / 3 + 0.03 * (c - mean) ** 2)


ZCLIP_DEFAULT = jaxclip.zclip()


@given(st.lists(st.floats(1e-3, 1e4), min_size=1, max_size=25))
def test_zclip_never_clips_during_warmup_without_a_cap(norms):
    scales, states = _drive(ZCLIP_DEFAULT, norms)
    np.testing.assert_array_equal(scales, 1.0)
    assert all(float(s.stats.extra["warmup"]) == 1.0 for s in states)


# -- quantile tracking ------------------------------------------------------------------


@pytest.mark.parametrize("update", ["geometric", "arithmetic"])
def test_quantile_clip_matches_the_published_rule(update):
    norms = ref.spiky_norms(80, seed=3)
    tx = jaxclip.quantile_clip(0.7, 0.1, initial_threshold=0.5, update=update)
    scales, states = _drive(tx, norms)
    expected = ref.quantile(norms, 0.7, 0.1, 0.5, update)
    np.testing.assert_allclose(scales, [e["scale"] for e in expected], rtol=2e-6)
    thresholds = [float(s.stats.threshold) for s in states]
    np.testing.assert_allclose(thresholds, [e["threshold"] for e in expected], rtol=2e-5)


@pytest.mark.parametrize("q", [0.3, 0.5, 0.9])
def test_quantile_clip_settles_near_the_target_quantile(q):
    rng = np.random.default_rng(4)
    norms = np.exp(rng.normal(1.0, 0.5, 3000))
    tx = jaxclip.quantile_clip(q, learning_rate=0.05, initial_threshold=0.1)

    def body(state, n):
        _, state = tx.update(jnp.array([n]), state)
        return state, state.stats.threshold

    _, thresholds = jax.lax.scan(body, tx.init(None), jnp.asarray(norms, jnp.float32))
    late = np.asarray(thresholds[1000:])
    below = np.mean(norms[1000:] <= late)
    assert below == pytest.approx(q, abs=0.05)
    assert np.median(late) == pytest.approx(np.quantile(norms, q), rel=0.1)


# -- AdaGC ------------------------------------------------------------------------------


def _adagc_grads(steps, seed):
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        w = rng.normal(size=(3, 2)) * 0.3
        b = rng.normal(size=(2,)) * 0.05
        if t % 7 == 6:
            w = w * 40.0
        if t % 11 == 10:
            b = b * 100.0
        out.append({"w": w.astype(np.float32), "b": b.astype(np.float32)})
    return out


def test_adagc_matches_the_published_rule():
    grads = _adagc_grads(40, seed=5)
    tx = jaxclip.adagc(warmup_steps=5)
    state = tx.init(grads[0])
    update = jax.jit(tx.update)
    unit_norms = [[np.linalg.norm(g["b"]), np.linalg.norm(g["w"])] for g in grads]
    expected = ref.adagc(unit_norms, warmup_steps=5)
    for g, e in zip(grads, expected):
        out, state = update(g, state)
        got = [
            np.linalg.norm(out["b"]) / np.linalg.norm(g["b"]),
            np.linalg.norm(out["w"]) / np.linalg.norm(g["w"]),
        ]
        np.testing.assert_allclose(got, e["scales"], rtol=1e-5)
        np.testing.assert_allclose(np.sort(state.gamma), np.sort(e["gamma"]), rtol=1e-5)
    assert int(state.stats.clipped_steps) > 0


def test_adagc_global_scope_matches_the_rule_on_the_global_norm():
    norms = ref.spiky_norms(50, seed=6)
    scales, states = _drive(jaxclip.adagc(warmup_steps=5, scope="global"), norms)
    expected = ref.adagc([[n] for n in norms], warmup_steps=5)
    np.testing.assert_allclose(scales, [e["scales"][0] for e in expected], rtol=1e-5)
    np.testing.assert_allclose(
        [float(s.gamma[0]) for s in states], [e["gamma"][0] for e in expected], rtol=1e-5
    )


def test_adagc_hand_checked():
    params = {"w": jnp.zeros(2), "b": jnp.zeros(1)}
    tx = jaxclip.adagc(warmup_steps=1)
    state = tx.init(params)
    _, state = tx.update({"w": jnp.array([0.3, 0.4]), "b": jnp.array([0.2])}, state)
    np.testing.assert_allclose(np.sort(state.gamma), [0.2, 0.5], rtol=1e-6)
    out, state = tx.update({"w": jnp.array([3.0, 4.0]), "b": jnp.array([0.2])}, state)
    np.testing.assert_allclose(out["w"], np.array([3.0, 4.0]) * 0.52 / (5 + 1e-6), rtol=1e-6)
    np.testing.assert_array_equal(out["b"], np.float32([0.2]))  # 0.2 <= 1.04 * 0.2
    np.testing.assert_allclose(np.sort(state.gamma), [0.2, 0.99 * 0.5 + 0.01 * 0.52], rtol=1e-6)


def test_adagc_warmup_clips_globally():
    tx = jaxclip.adagc(warmup_steps=3, warmup_max_norm=1.0)
    out, state = tx.update(
        {"a": jnp.array([30.0]), "b": jnp.array([40.0])},
        tx.init({"a": jnp.zeros(1), "b": jnp.zeros(1)}),
    )
    np.testing.assert_allclose([out["a"][0], out["b"][0]], [0.6, 0.8], rtol=1e-5)
    np.testing.assert_allclose(np.sort(state.gamma), [0.6, 0.8], rtol=1e-5)
    assert float(state.stats.threshold) == 1.0


ADAGC_INJECTED = optax.inject_hyperparams(jaxclip.adagc)(
    lambda_rel=1.0, beta=0.9, warmup_steps=3, scope="global"
)


@given(
    st.lists(st.floats(1e-3, 1e3), min_size=12, max_size=40),
    st.floats(1.0, 2.0),
    st.floats(0.5, 0.999),
)
def test_adagc_gamma_grows_by_at_most_beta_plus_one_minus_beta_lambda(norms, lam, beta):
    state = ADAGC_INJECTED.init(jnp.zeros(1))
    state.hyperparams["lambda_rel"] = jnp.float32(lam)
    state.hyperparams["beta"] = jnp.float32(beta)
    update = _jitted_update(ADAGC_INJECTED)
    gammas = []
    for n in norms:
        _, state = update(jnp.array([n], jnp.float32), state)
        gammas.append(float(state.inner_state.gamma[0]))
    gammas = np.array(gammas)
    bound = beta + (1 - beta) * lam
    after = gammas[3:] / gammas[2:-1]
    assert np.all(after <= bound * (1 + 1e-6))


def test_adagc_stacked_layers_keep_per_layer_gammas():
    # two layers stacked on axis 0 behave like two separate leaves
    rng = np.random.default_rng(7)
    stacked, separate = [], []
    for t in range(12):
        layers = rng.normal(size=(2, 3, 2)).astype(np.float32)
        if t == 9:
            layers[1] *= 50.0
        stacked.append({"layers": jnp.asarray(layers), "head": jnp.ones(2) * 0.1})
        separate.append(
            {"l0": jnp.asarray(layers[0]), "l1": jnp.asarray(layers[1]), "head": jnp.ones(2) * 0.1}
        )
    tx_stacked = jaxclip.adagc(
        warmup_steps=4, layer_axis=lambda path, x: 0 if path == "layers" else None
    )
    tx_separate = jaxclip.adagc(warmup_steps=4)
    s1, s2 = tx_stacked.init(stacked[0]), tx_separate.init(separate[0])
    assert s1.gamma.shape == (3,) and s2.gamma.shape == (3,)
    update1, update2 = jax.jit(tx_stacked.update), jax.jit(tx_separate.update)
    for a, b in zip(stacked, separate):
        out1, s1 = update1(a, s1)
        out2, s2 = update2(b, s2)
        np.testing.assert_allclose(out1["layers"][0], out2["l0"], rtol=1e-6)
        np.testing.assert_allclose(out1["layers"][1], out2["l1"], rtol=1e-6)
    np.testing.assert_allclose(np.sort(s1.gamma), np.sort(s2.gamma), rtol=1e-6)


def test_adagc_state_must_match_the_gradient():
    tx = jaxclip.adagc()
    state = tx.init({"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match="has 2 units but the state was built for 1"):
        tx.update({"w": jnp.zeros(3), "b": jnp.zeros(1)}, state)
    with pytest.raises(ValueError, match="layer_axis=2 does not fit leaf"):
        jaxclip.adagc(layer_axis=2).init({"w": jnp.zeros((3, 2))})


# -- common behaviour -------------------------------------------------------------------

ALL = {
    "autoclip": lambda: jaxclip.autoclip(history=64),
    "zclip": lambda: jaxclip.zclip(warmup_steps=5),
    "quantile_clip": lambda: jaxclip.quantile_clip(),
    "adagc": lambda: jaxclip.adagc(warmup_steps=5),
    "adagc_global": lambda: jaxclip.adagc(warmup_steps=5, scope="global"),
    "agc": lambda: jaxclip.agc(0.05),
    "skip_on_spike": lambda: jaxclip.skip_on_spike(jaxclip.clip_by_global_norm(1.0), window=8),
}


def _model_grads(params, t):
    rng = np.random.default_rng(t)
    scale = 50.0 if t % 9 == 8 else 1.0
    return jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=p.shape) * scale, jnp.bfloat16), params
    )


@pytest.mark.parametrize("name", ALL)
def test_chained_with_adamw_bf16_jitted_and_restored(name):
    params = {"w": jnp.ones((4, 3), jnp.float32) * 0.1, "b": jnp.zeros(3, jnp.float32)}
    tx = optax.chain(ALL[name](), optax.adamw(1e-2))

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def run(params, state, start, stop):
        for t in range(start, stop):
            params, state = step(params, state, _model_grads(params, t))
        return params, state

    p_full, s_full = run(params, tx.init(params), 0, 20)
    p_half, s_half = run(params, tx.init(params), 0, 10)
    # save/restore through host memory, as a checkpoint would
    restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), s_half)
    p_resumed, s_resumed = run(jax.tree.map(jnp.asarray, p_half), restored, 10, 20)
    chex.assert_trees_all_equal(p_resumed, p_full)
    chex.assert_trees_all_equal(s_resumed, s_full)
    stats = jaxclip.get_stats(s_full)
    if name == "skip_on_spike":  # the guard's record and its inner clipper's
        assert set(stats) == {"0/stats", "0/inner"}
        stats = stats["0/stats"]
    assert int(stats.step) == 20 and bool(jnp.isfinite(stats.norm))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p_full))


@pytest.mark.parametrize("name", ALL)
def test_state_is_fixed_shape_and_vmaps_over_seeds(name):
    tx = ALL[name]()
    params = jnp.ones((2, 2))
    norms = ref.spiky_norms(12, seed=12)
    grads = jnp.stack([jnp.stack([jnp.full((2,), n), jnp.full((2,), -n)]) for n in norms])
    grads = jnp.stack([grads, grads * 0.5, grads * 2])  # three seeds

    @jax.jit
    def run(g_seq):
        def body(state, g):
            return tx.update(g, state, params)[1], None

        return jax.lax.scan(body, tx.init(params), g_seq)[0]

    batched = jax.vmap(run)(grads)
    for i in range(3):
        single = run(grads[i])
        seed_i = jax.tree.map(lambda x, i=i: x[i], batched)
        chex.assert_trees_all_close(seed_i, single, rtol=1e-5)


def test_float_hyperparameters_can_be_injected():
    norms = ref.spiky_norms(40, seed=13)
    cases = [
        (jaxclip.zclip, dict(alpha=0.9, z_thresh=2.0, warmup_steps=5), {}),
        (jaxclip.autoclip, dict(percentile=30.0, history=64), {"static_args": ("history",)}),
        (jaxclip.quantile_clip, dict(target_quantile=0.8, learning_rate=0.1), {}),
        (jaxclip.adagc, dict(lambda_rel=1.1, beta=0.9, warmup_steps=5), {}),
    ]
    for factory, kwargs, inject in cases:
        plain, _ = _drive(factory(**kwargs), norms)
        injected, _ = _drive(optax.inject_hyperparams(factory, **inject)(**kwargs), norms)
        np.testing.assert_allclose(injected, plain, rtol=1e-6, err_msg=factory.__name__)


def test_static_arguments_say_so():
    with pytest.raises(ValueError, match=r"static_args=\('history',\)"):
        optax.inject_hyperparams(jaxclip.autoclip)(percentile=10.0, history=100).init(None)
    with pytest.raises(ValueError, match=r"static_args=\('window',\)"):
        jaxclip.skip_on_spike(optax.sgd(0.1), window=jnp.array(8))


@pytest.mark.parametrize(
    "factory,kwargs,message",
    [
        (jaxclip.autoclip, {"percentile": 101.0}, "percentile must be <= 100"),
        (jaxclip.autoclip, {"history": 0}, "history must be >= 1"),
        (jaxclip.zclip, {"alpha": 1.0}, "alpha must be < 1"),
        (jaxclip.zclip, {"z_thresh": 0.0}, "z_thresh must be > 0"),
        (jaxclip.zclip, {"mode": "iqr"}, "mode must be one of"),
        (jaxclip.zclip, {"clip_option": "median"}, "clip_option must be one of"),
        (jaxclip.zclip, {"max_norm": -1.0}, "max_norm must be >= 0"),
        (jaxclip.quantile_clip, {"target_quantile": 1.5}, "target_quantile must be <= 1"),
        (jaxclip.quantile_clip, {"update": "linear"}, "update must be one of"),
        (jaxclip.adagc, {"beta": 1.0}, "beta must be < 1"),
        (jaxclip.adagc, {"lambda_rel": 0.0}, "lambda_rel must be > 0"),
        (jaxclip.adagc, {"scope": "layer"}, "scope must be one of"),
        (jaxclip.agc, {"clipping": 0.0}, "clipping must be > 0"),
        (jaxclip.agc, {"clipping": float("nan")}, "clipping must not be NaN"),
    ],
)
def test_bad_hyperparameters(factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        factory(**kwargs)


@pytest.mark.parametrize("name", ["autoclip", "zclip", "quantile_clip", "adagc"])
def test_nonfinite_steps_leave_the_rule_unchanged(name):
    tx = ALL[name]()
    state = tx.init(jnp.zeros(1))
    for n in (1.0, 1.2, 0.8, 1.1, 0.9, 1.0):
        _, state = tx.update(jnp.array([n]), state)
    rule_before = state.rule if hasattr(state, "rule") else state.gamma
    out, state = tx.update(jnp.array([jnp.nan]), state)
    assert bool(jnp.isnan(out[0]))
    rule_after = state.rule if hasattr(state, "rule") else state.gamma
    chex.assert_trees_all_equal(rule_after, rule_before)
    assert int(state.stats.nonfinite_steps) == 1
    tx_skip = {
        "autoclip": jaxclip.autoclip(history=64, nonfinite="skip"),
        "zclip": jaxclip.zclip(warmup_steps=5, nonfinite="skip"),
        "quantile_clip": jaxclip.quantile_clip(nonfinite="skip"),
        "adagc": jaxclip.adagc(warmup_steps=5, nonfinite="skip"),
    }[name]
    out, _ = tx_skip.update(jnp.array([jnp.inf]), tx_skip.init(jnp.zeros(1)))
    assert float(out[0]) == 0.0


@pytest.mark.parametrize("name", ALL)
def test_state_can_be_donated(name):
    """No two fields of the state share a buffer, so a training step can donate it."""
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    tx = optax.chain(ALL[name](), optax.adam(1e-3))
    state = tx.init(params)
    buffers = [id(x) for x in jax.tree.leaves(state)]
    assert len(buffers) == len(set(buffers))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state):
        updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(2):
        params, state = step(params, state)
    found = jaxclip.get_stats(state)
    records = found.values() if isinstance(found, dict) else [found]
    assert all(int(r.step) == 2 for r in records)


@given(
    st.lists(st.sampled_from([1.0, 2.0, 2.0, 3.0, 5.0]), min_size=1, max_size=25),
    st.floats(0.0, 100.0),
)
def test_autoclip_bounded_history_equals_numpy_on_the_window(norms, percentile):
    state = AUTOCLIP_WINDOW.init(None)
    state.hyperparams["percentile"] = jnp.float32(percentile)
    update = _jitted_update(AUTOCLIP_WINDOW)
    for t, n in enumerate(norms):
        _, state = update(jnp.array([n], jnp.float32), state)
        window = norms[max(0, t + 1 - 4) : t + 1]
        expected = np.percentile(window, np.float32(percentile))
        assert float(state.inner_state.stats.threshold) == pytest.approx(expected, rel=1e-5)
        np.testing.assert_array_equal(
            np.sort(state.inner_state.rule.history[: min(t + 1, 4)]),
            state.inner_state.rule.ordered[: min(t + 1, 4)],
        )


AUTOCLIP_WINDOW = optax.inject_hyperparams(jaxclip.autoclip, static_args=("history",))(
    percentile=50.0, history=4
)
