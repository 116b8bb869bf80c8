"""Robust norms: values against a float64 NumPy reference, range rescue, gradients."""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import float64_enabled, np_norm

import jaxclip
from jaxclip import _norms

ORDS = [1, 2, 3, 2.5, math.inf]


def _random_tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "dense": {"kernel": rng.normal(size=(7, 5)) * scale, "bias": rng.normal(size=(5,)) * scale},
        "conv": rng.normal(size=(3, 3, 2, 4)) * scale,
        "scalar": np.array(rng.normal() * scale),
    }


def _as(tree, dtype):
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


@pytest.mark.parametrize("p", ORDS)
@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1.0, 1e12, 1e30])
def test_global_norm_matches_float64_reference(p, scale):
    raw = _random_tree(0, scale=scale)
    tree = _as(raw, jnp.float32)
    expected = np_norm(jax.tree.leaves(tree), p)  # of the float32 values themselves
    got = float(jaxclip.global_norm(tree, ord=p))
    assert got == pytest.approx(expected, rel=2e-6)


@pytest.mark.parametrize("p", ORDS)
def test_jit_equals_eager(p):
    tree = _as(_random_tree(1), jnp.float32)
    eager = jaxclip.global_norm(tree, ord=p)
    jitted = jax.jit(lambda t: jaxclip.global_norm(t, ord=p))(tree)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)


def test_float16_does_not_overflow():
    grads = {"a": jnp.array([300.0], jnp.float16), "b": jnp.array([400.0], jnp.float16)}
    assert float(optax.tree.norm(grads)) == math.inf  # the defect this avoids
    norm = jaxclip.global_norm(grads)
    assert norm.dtype == jnp.float32
    assert float(norm) == 500.0


def test_float32_overflow_is_rescued():
    grads = {"a": jnp.array([1e20], jnp.float32), "b": jnp.array([1e20], jnp.float32)}
    assert float(jaxclip.global_norm(grads)) == pytest.approx(math.sqrt(2) * 1e20, rel=1e-6)
    four = [jnp.full((4,), 1e20, jnp.float32)]
    assert float(jaxclip.global_norm(four)) == pytest.approx(2e20, rel=1e-6)


@pytest.mark.parametrize("p", [2, 3, 2.5])
def test_float32_underflow_is_rescued(p):
    tiny = [jnp.full((4,), 1e-30, jnp.float32)]
    got = float(jaxclip.global_norm(tiny, ord=p))
    assert got > 0
    assert got == pytest.approx(4 ** (1 / p) * 1e-30, rel=1e-6)


def test_mixed_magnitudes_are_exact():
    tree = [jnp.array([1e20, 3e19]), jnp.array([1e-30, 4e19])]
    assert float(jaxclip.global_norm(tree)) == pytest.approx(
        np_norm(jax.tree.leaves(tree)), rel=1e-6
    )


def test_bfloat16_many_leaves_keeps_precision():
    leaves = [jnp.asarray([math.sqrt(0.1)], jnp.bfloat16) for _ in range(300)]
    expected = np_norm(leaves)  # of the bfloat16 values
    assert expected == pytest.approx(5.48, abs=0.01)
    assert float(jaxclip.global_norm(leaves)) == pytest.approx(expected, rel=1e-6)


def test_mixed_dtypes_accumulate_in_float32():
    tree = {
        "h": jnp.array([3.0, 250.0], jnp.float16),
        "b": jnp.array([1e30], jnp.bfloat16),
        "f": jnp.array([4.0], jnp.float32),
    }
    norm = jaxclip.global_norm(tree)
    assert norm.dtype == jnp.float32
    assert float(norm) == pytest.approx(np_norm(jax.tree.leaves(tree)), rel=1e-6)


def test_float64_accumulates_in_float64():
    with float64_enabled():
        tree = [jnp.array([1e200, 1e200], jnp.float64), jnp.array([1.0], jnp.float32)]
        norm = jaxclip.global_norm(tree)
        assert norm.dtype == jnp.float64
        assert float(norm) == pytest.approx(math.sqrt(2) * 1e200, rel=1e-12)
        small = [jnp.array([1e-200, 1e-200], jnp.float64)]
        assert float(jaxclip.global_norm(small)) == pytest.approx(math.sqrt(2) * 1e-200, rel=1e-12)
        # a float32 leaf beside a float64 one is squared in float64: (1e-20)^2 is
        # below float32's range, and 1.1 squared in float32 would lose digits
        for p in (1, 2):
            tiny = [jnp.array([1e-20], jnp.float32), jnp.array([1e-18], jnp.float64)]
            x32 = float(np.float32(1e-20))
            expect = x32 + 1e-18 if p == 1 else math.sqrt(x32**2 + 1e-36)
            assert float(jaxclip.global_norm(tiny, p)) == pytest.approx(expect, rel=1e-14)
            mixed = [jnp.array([1.1], jnp.float32), jnp.array([1e-8], jnp.float64)]
            x32 = float(np.float32(1.1))
            expect = x32 + 1e-8 if p == 1 else math.sqrt(x32**2 + 1e-16)
            assert float(jaxclip.global_norm(mixed, p)) == pytest.approx(expect, rel=1e-14)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize("p", ORDS)
def test_nonfinite_elements_give_nonfinite_norm(bad, p):
    tree = [jnp.array([1.0, bad]), jnp.array([2.0])]
    norm = float(jaxclip.global_norm(tree, ord=p))
    if math.isnan(bad):
        assert math.isnan(norm)
    else:
        assert norm == math.inf


@pytest.mark.parametrize("p", ORDS)
def test_sanitized_norm_ignores_nonfinite_elements(p):
    leaves = [jnp.array([3.0, jnp.nan]), jnp.array([jnp.inf, 4.0])]
    norm, finite = _norms.global_norm_and_finite(leaves, float(p), sanitize=True)
    assert not bool(finite)
    assert float(norm) == pytest.approx(np_norm([[3.0], [4.0]], p), rel=1e-6)


def test_empty_and_none_trees():
    assert float(jaxclip.global_norm({})) == 0.0
    assert float(jaxclip.global_norm({"a": None, "b": jnp.array([3.0, 4.0])})) == 5.0
    assert float(jaxclip.global_norm([jnp.zeros((0, 3))])) == 0.0


def test_integer_leaf_is_refused_with_its_path():
    with pytest.raises(TypeError, match=r"\['layer'\]\['step'\].*int32"):
        jaxclip.global_norm({"layer": {"w": jnp.ones(2), "step": jnp.array(3)}})


@pytest.mark.parametrize("bad", [0.5, 0, -1, "fro", "nuc", float("nan")])
def test_bad_ord_is_refused(bad):
    with pytest.raises(ValueError, match="ord"):
        jaxclip.global_norm([jnp.ones(2)], ord=bad)


@pytest.mark.parametrize("p", ORDS)
def test_gradient_is_finite_at_zero(p):
    grad = jax.grad(lambda t: jaxclip.global_norm(t, ord=p))([jnp.zeros(3), jnp.zeros(2)])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grad)


def test_gradient_matches_the_analytic_one():
    x = jnp.array([3.0, -4.0])
    np.testing.assert_allclose(jax.grad(jaxclip.global_norm)(x), [0.6, -0.8], rtol=1e-6)
    # through the rescue branch, too
    big = jnp.array([3e20, -4e20])
    np.testing.assert_allclose(jax.grad(jaxclip.global_norm)(big), [0.6, -0.8], rtol=1e-6)


@pytest.mark.parametrize("p", ORDS)
def test_leaf_norms(p):
    tree = _as(_random_tree(2), jnp.float32)
    norms = jaxclip.leaf_norms(tree, ord=p)
    for got, leaf in zip(jax.tree.leaves(norms), jax.tree.leaves(tree)):
        assert got.shape == ()
        assert float(got) == pytest.approx(np_norm([leaf], p), rel=2e-6)


@pytest.mark.parametrize("p", ORDS)
def test_norms_along_axes(p):
    rng = np.random.default_rng(3)
    kernel = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    conv = jnp.asarray(rng.normal(size=(3, 3, 2, 5)), jnp.float32)
    cols = jaxclip.leaf_norms({"k": kernel}, ord=p, axis=0)["k"]
    np.testing.assert_allclose(cols, [np_norm([kernel[:, j]], p) for j in range(4)], rtol=2e-6)
    units = jaxclip.leaf_norms(conv, ord=p, axis=(0, 1, 2), keepdims=True)
    assert units.shape == (1, 1, 1, 5)
    expected = [np_norm([conv[..., j]], p) for j in range(5)]
    np.testing.assert_allclose(units.ravel(), expected, rtol=2e-6)
    rows = jaxclip.leaf_norms(kernel, ord=p, axis=-1)
    np.testing.assert_allclose(rows, [np_norm([kernel[i]], p) for i in range(6)], rtol=2e-6)


def test_slice_norms_rescue_each_slice():
    x = jnp.array([[1e20, 1e-30], [1e20, 1e-30], [0.0, 0.0]], jnp.float32)
    cols = jaxclip.leaf_norms(x, axis=0)
    np.testing.assert_allclose(cols, [math.sqrt(2) * 1e20, math.sqrt(2) * 1e-30], rtol=1e-6)
    rows = jaxclip.leaf_norms(x, axis=1)
    np.testing.assert_allclose(rows, [1e20, 1e20, 0.0], rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("side", ["overflow", "underflow"])
def test_per_unit_rescue_is_decided_for_every_dtype(dtype, side):
    """Leaves of float32 and float64 beside each other: one leaf whose columns
    leave its range, of either dtype, has every column redone, and the others
    keep theirs."""
    extreme = {
        ("float32", "overflow"): 1e25,
        ("float32", "underflow"): 1e-25,
        ("float64", "overflow"): 1e200,
        ("float64", "underflow"): 1e-200,
    }[dtype, side]
    rng = np.random.default_rng(11)
    raw = {f"{d}_{i}": rng.normal(size=(6, 3)) for d in ("float32", "float64") for i in range(3)}
    raw[f"{dtype}_1"] *= extreme
    with float64_enabled():
        tree = {k: jnp.asarray(v, k.split("_")[0]) for k, v in raw.items()}
        for run in (lambda f: f, jax.jit):
            cols = run(lambda t: jaxclip.leaf_norms(t, axis=0))(tree)
            for name, x in tree.items():
                want = [np_norm([np.asarray(x)[:, j]], 2) for j in range(3)]
                np.testing.assert_allclose(np.ravel(cols[name]), want, rtol=2e-6, err_msg=name)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("p", [1, 2, 3])
def test_rescue_at_the_top_of_the_float32_range(p, jit):
    """Elements above 2^126: dividing by the largest (which XLA does as a multiply by
    its reciprocal, subnormal here and flushed to zero on CPU) would give norm 0."""
    x = jnp.array([1.0e38, -2.0e38, 3.0], jnp.float32)
    run = jax.jit if jit else (lambda f: f)
    expected = np_norm([x], p)
    assert float(run(lambda t: jaxclip.global_norm(t, ord=p))([x])) == pytest.approx(
        expected, rel=2e-6
    )
    assert float(run(lambda t: jaxclip.leaf_norms(t, ord=p))(x)) == pytest.approx(
        expected, rel=2e-6
    )
    cols = run(lambda t: jaxclip.leaf_norms(t, ord=p, axis=0))(jnp.stack([x, x / 2]))
    np.testing.assert_allclose(cols, [np_norm([[v, v / 2]], p) for v in x.tolist()], rtol=2e-6)


def test_axis_that_a_leaf_lacks_names_the_leaf():
    with pytest.raises(ValueError, match=r"\['bias'\].*shape \(3,\)"):
        jaxclip.leaf_norms({"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}, axis=1)


@pytest.mark.parametrize("p", [2, 3, math.inf])
def test_many_small_leaves_of_mixed_dtypes(p):
    rng = np.random.default_rng(4)
    tree = {
        f"l{i}": jnp.asarray(rng.normal(size=(3, 2)) * 10.0 ** rng.uniform(-20, 20), dtype)
        for i, dtype in enumerate([jnp.float32, jnp.bfloat16] * 15)
    }
    tree["big"] = jnp.asarray(rng.normal(size=(130, 130)), jnp.float32)
    tree["f16"] = [jnp.asarray([300.0 + i], jnp.float16) for i in range(20)]
    leaves = jax.tree.leaves(tree)
    assert float(jaxclip.global_norm(tree, ord=p)) == pytest.approx(np_norm(leaves, p), rel=2e-6)
    norms = jax.tree.leaves(jaxclip.leaf_norms(tree, ord=p))
    np.testing.assert_allclose(norms, [np_norm([x], p) for x in leaves], rtol=2e-6)
    matrices = {k: v for k, v in tree.items() if k != "f16"}
    cols = jax.tree.leaves(jaxclip.leaf_norms(matrices, p, 0))
    expected = [
        [np_norm([x[:, j]], p) for j in range(x.shape[1])] for x in jax.tree.leaves(matrices)
    ]
    for got, want in zip(cols, expected):
        np.testing.assert_allclose(got, want, rtol=2e-6)


_ALIKE = jaxclip.clip_by_norm(1.0, nonfinite="zero")
# compiled once for every case below (the trees differ in values only)
_clip_alike = jax.jit(lambda g: _ALIKE.update(g, _ALIKE.init(g))[0])
_clip_alike_batched = jax.jit(jax.vmap(_clip_alike))
_grad_alike = jax.jit(jax.grad(lambda g: _clip_alike(g)["w05"][0, 0]))


@pytest.mark.parametrize("first", [1.0, math.inf, math.nan, -3e38])
def test_each_of_many_alike_leaves_is_clipped_by_its_own_norm(first):
    """Twelve alike leaves, the first holding an extreme element: each other leaf is
    clipped by its own norm, also under vmap, and its gradient reaches only it."""
    tree = {f"w{i:02d}": jnp.full((3, 4), float(i + 1)) for i in range(12)}
    tree["w00"] = tree["w00"].at[0, 0].set(first)
    out = _clip_alike(tree)
    for i in range(1, 12):
        np.testing.assert_allclose(out[f"w{i:02d}"], np.full((3, 4), 12**-0.5), rtol=1e-6)
    batched = _clip_alike_batched(jax.tree.map(lambda x: jnp.stack([x, 2 * x]), tree))
    np.testing.assert_allclose(batched["w07"], np.full((2, 3, 4), 12**-0.5), rtol=1e-6)
    first_leaf = _grad_alike(tree)
    assert float(jnp.abs(first_leaf["w05"]).sum()) > 0
    others = [v for k, v in first_leaf.items() if k not in ("w00", "w05")]
    assert all(float(jnp.abs(v).sum()) == 0 for v in others)


def test_each_leaf_gets_its_own_norm_when_shapes_interleave():
    """Interleaved shapes and dtypes, many small leaves and an all-zero bias: each
    leaf gets its own norm and scale."""
    rng = np.random.default_rng(3)
    shapes = [(130, 128), (128, 130), (130, 128), (17000,), (128, 130), (130, 128)]
    dtypes = [jnp.float32, jnp.float32, jnp.bfloat16, jnp.float32, jnp.float32, jnp.float32]
    tree = {
        f"big{i}": jnp.asarray(rng.normal(size=s) * (i + 1), d)
        for i, (s, d) in enumerate(zip(shapes, dtypes))
    }
    tree |= {f"small{i}": jnp.full((4, 4), i + 1.0) for i in range(20)}
    tree |= {f"bias{i}": jnp.full((8,), 0.5 * i) for i in range(18)}  # one all zero
    norms = jax.jit(jaxclip.leaf_norms)(tree)
    for name, leaf in tree.items():
        assert float(norms[name]) == pytest.approx(np_norm([leaf]), rel=1e-5), name
    tx = jaxclip.clip_by_norm(10.0)
    out = jax.jit(lambda g: tx.update(g, tx.init(g))[0])(tree)
    for name, leaf in tree.items():
        x = np.asarray(leaf, np.float64)
        expected = x * min(1.0, 10.0 / np_norm([leaf])) if np.any(x) else x
        tolerance = 1e-2 if leaf.dtype == jnp.bfloat16 else 1e-5
        np.testing.assert_allclose(np.asarray(out[name], np.float64), expected, rtol=tolerance)


@pytest.mark.parametrize("policy", ["propagate", "zero"])
def test_each_leaf_gets_its_own_unit_norms(policy):
    """Alike leaves in other places, many small ones, an all-zero leaf, an empty
    one and a leaf whose column sums overflow each get their own columns' norms
    and scales (agc against a NumPy reference)."""
    rng = np.random.default_rng(5)
    shapes = [(130, 128), (40, 130), (130, 128), (7, 5), (130, 128), (0, 3), (40, 130)]
    params = {f"w{i}": rng.normal(size=s) for i, s in enumerate(shapes)}
    params |= {f"small{i}": rng.normal(size=(4, 6)) for i in range(20)}
    grads = {k: rng.normal(size=v.shape) * (1 + i) for i, (k, v) in enumerate(params.items())}
    grads["w2"] = np.zeros((130, 128))
    grads["w4"] = grads["w4"] * 1e20  # squares above the float32 range
    params["w4"] = params["w4"] * 1e22
    as32 = partial(jax.tree.map, lambda x: jnp.asarray(x, jnp.float32))
    tx = jaxclip.agc(0.05, nonfinite=policy)
    out = jax.jit(lambda g, w: tx.update(g, tx.init(w), w)[0])(as32(grads), as32(params))
    for name, g in grads.items():
        g = np.asarray(np.float32(g), np.float64)
        w = np.asarray(np.float32(params[name]), np.float64)
        axis = 0 if g.ndim == 2 else None
        g_norm = np.sqrt(np.sum((g / 1e20) ** 2, axis=axis, keepdims=True)) * 1e20
        w_norm = np.sqrt(np.sum((w / 1e20) ** 2, axis=axis, keepdims=True)) * 1e20
        limit = 0.05 * np.maximum(w_norm, 1e-3)
        scale = np.where(g_norm > limit, limit / np.maximum(g_norm, 1e-300), 1.0)
        np.testing.assert_allclose(np.asarray(out[name], np.float64), g * scale, rtol=2e-5)


def test_unit_order_in_adaptive_state_is_the_leaf_order():
    """Per-unit state (adagc's gamma) is in the order of the leaves: a sharded
    leaf's pieces have other shapes than the whole, and both must read the same
    state."""
    shapes = [(130, 128), (128, 130), (130, 128), (129, 128)]
    tree = {f"w{i}": jnp.full(s, (i + 1) / math.sqrt(math.prod(s))) for i, s in enumerate(shapes)}
    tx = jaxclip.adagc(warmup_max_norm=100.0)
    _, state = jax.jit(tx.update)(tree, tx.init(tree))
    gamma = np.asarray(state.gamma)
    assert gamma.shape == (4,)
    assert np.all(np.diff(gamma) > 0), gamma  # norms 1, 2, 3, 4 in leaf order


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nonfinite_leaf_does_not_leak_into_its_neighbours(bad):
    big = jnp.full((200, 100), 0.01)
    tree = {"a": big, "b": jnp.array([bad, 1.0]), "c": 2 * big}
    tx = jaxclip.clip_by_norm(1.0)
    out = jax.jit(lambda g: tx.update(g, tx.init(g))[0])(tree)
    # norms sqrt(2) and 2 sqrt(2): both clipped to 1
    np.testing.assert_allclose(out["a"], np.full((200, 100), 0.01 / 2**0.5), rtol=1e-5)
    np.testing.assert_allclose(out["c"], np.full((200, 100), 0.01 / 2**0.5), rtol=1e-5)
    assert not np.isfinite(np.asarray(out["b"])).all()


def _exact_norm(values, p):
    """The p-norm (p = 1 or 2) of Python floats, scaled by a power of two so that
    nothing overflows or underflows, summed exactly (inf where the norm is above
    float32's range)."""
    magnitudes = [abs(v) for v in values]
    exponent = math.frexp(max(magnitudes))[1]
    scaled = [math.ldexp(v, -exponent) for v in magnitudes]
    total = math.fsum(scaled) if p == 1 else math.sqrt(math.fsum(v * v for v in scaled))
    norm = math.ldexp(total, exponent)
    return norm if norm <= float(np.finfo(np.float32).max) else math.inf


RANGE_EDGES = {
    "near the top": [2e38, -1.5e38, 5.0, 7.9],
    "just above it": [2e38, 2e38, 1.0],
    "huge beside small": [1e20, -1e20, 7.0] + [0.5] * 50,
    "smallest normals": [float(np.finfo(np.float32).tiny)] * 4,
    "tiny": [1e-30, -3e-25, 0.0, 2e-38],
}


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("case", list(RANGE_EDGES))
def test_sums_out_of_range_are_redone_exactly(case, p):
    """Every norm whose plain sum leaves float32's range, over a whole tree, per leaf
    (alone or among alike leaves) and per row or column, against exact
    arithmetic; inf, and not finite, only where the norm itself is above the range."""
    values = RANGE_EDGES[case]
    want = _exact_norm(values, p)
    x = jnp.asarray(values, jnp.float32)
    norm, finite = jax.jit(lambda v: _norms.global_norm_and_finite([v], float(p)))(x)
    np.testing.assert_allclose(float(norm), want, rtol=1e-6)
    assert bool(finite) == math.isfinite(want)
    tree = {"x": x, "y": jnp.ones(3), "alike": [x] * 20}
    norms = jax.jit(lambda t: jaxclip.leaf_norms(t, ord=p))(tree)
    np.testing.assert_allclose(float(norms["x"]), want, rtol=1e-6)
    np.testing.assert_allclose([float(n) for n in norms["alike"]], [want] * 20, rtol=1e-6)
    grid = jnp.stack([jnp.ones_like(x), x])
    rows = jax.jit(lambda g: jaxclip.leaf_norms(g, ord=p, axis=1))(grid)
    cols = jax.jit(lambda g: jaxclip.leaf_norms(g, ord=p, axis=0))(grid.T)
    ones = _exact_norm([1.0] * len(values), p)
    for got in (rows, cols):
        np.testing.assert_allclose(np.asarray(got, np.float64), [ones, want], rtol=1e-6)


@pytest.mark.parametrize("values", [[1e308, -1e308, 3.0], [1e-300] * 4 + [0.0], [5e-324, 3e-308]])
def test_float64_sums_out_of_range_are_redone_exactly(values):
    with float64_enabled():
        x = jnp.asarray(values, jnp.float64)
        norm = jax.jit(lambda t: jaxclip.leaf_norms(t))({"x": x, "y": jnp.ones(2)})["x"]
        assert norm.dtype == jnp.float64
        # subnormal elements (5e-324) read as zero on CPU
        normal = [v for v in values if abs(v) >= np.finfo(np.float64).tiny]
        want = math.sqrt(math.fsum((v / max(normal)) ** 2 for v in normal)) * max(normal)
        assert float(norm) == pytest.approx(want, rel=1e-14)


@pytest.mark.parametrize(
    "shape, axis", [((2, 784, 1024), (1, 2)), ((40, 128, 128), (1, 2)), ((3, 8, 4096), -1)]
)
def test_norms_of_large_units_keep_their_digits(shape, axis):
    """Per-unit sums keep float32's precision however many elements a unit has
    (added one after another, 800,000 squares lost 9e-6 of their sum)."""
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    got = jax.jit(lambda t: jaxclip.leaf_norms(t, axis=axis))(jnp.asarray(x))
    want = np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=axis))
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_per_unit_norms_near_the_top_of_the_range_combine_to_their_norm(dtype):
    # the largest norms' power of two must have a normal reciprocal, or XLA's
    # multiply by it flushes every term to zero
    top = float(jnp.finfo(dtype).max)
    with float64_enabled():
        norms = jnp.array([0.15 * top, 0.65 * top], dtype)
        got = float(_norms.combine_norms([norms], 2.0))
    want = float(np.hypot(0.15, 0.65)) * top
    assert got == pytest.approx(want, rel=1e-6)
