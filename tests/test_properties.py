"""Property tests over random pytrees, dtypes and magnitudes from 1e-30 to 1e30."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import float64_enabled, np_norm
from hypothesis import given
from hypothesis import strategies as st

import jaxclip

SHAPES = [(), (3,), (2, 3), (4, 1, 2)]
# the magnitudes each dtype can hold (as powers of ten), and its unit roundoff
RANGE = {
    jnp.float16: (-4, 4, 2.0**-11),
    jnp.bfloat16: (-30, 30, 2.0**-8),
    jnp.float32: (-30, 30, 2.0**-24),
    jnp.float64: (-30, 30, 2.0**-53),
}


@st.composite
def specs(draw, dtypes=(jnp.float16, jnp.bfloat16, jnp.float32)):
    """A pytree of (float64 values, dtype) pairs; ``build`` makes the arrays."""
    n = draw(st.integers(0, 4))
    spec = {}
    for i in range(n):
        dtype = draw(st.sampled_from(dtypes))
        lo, hi, _ = RANGE[dtype]
        exponent = draw(st.floats(lo, hi))
        shape = draw(st.sampled_from(SHAPES))
        seed = draw(st.integers(0, 2**16))
        values = np.random.default_rng(seed).standard_normal(shape) * 10.0**exponent
        spec[f"leaf{i}"] = (values, dtype)
    if draw(st.booleans()):
        spec["nothing"] = None
    return spec


def build(spec):
    return {k: None if v is None else jnp.asarray(v[0], v[1]) for k, v in spec.items()}


def trees(**kwargs):
    return specs(**kwargs).map(build)


def _unit(tree):
    return max([RANGE[x.dtype.type][2] for x in jax.tree.leaves(tree)] or [2.0**-24])


def _tiny(tree):
    return max([float(jnp.finfo(x.dtype).tiny) for x in jax.tree.leaves(tree)] or [0.0])


def _check_global_clip(tree, ratio, jit):
    norm = np_norm(jax.tree.leaves(tree))
    max_norm = float(np.float32(norm * ratio))
    tx = jaxclip.clip_by_global_norm(max_norm)
    update = jax.jit(tx.update) if jit else tx.update
    out, stats = update(tree, tx.init(tree))
    u = _unit(tree)

    # structure and dtypes kept
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
        assert a.dtype == b.dtype and a.shape == b.shape
    # finite in, finite out
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
    assert bool(stats.finite)
    # the recorded norm is right
    assert float(stats.norm) == pytest.approx(norm, rel=1e-5, abs=1e-37)
    # clipped norm <= threshold (up to rounding to the leaf dtype)
    # rounding: the norm and scale in float32 (a few units), the product in the leaf dtype
    assert np_norm(jax.tree.leaves(out)) <= max_norm * (1 + 2 * u + 2.0**-21) + 4 * _tiny(tree)
    if norm <= max_norm:
        # unchanged below the threshold, bit for bit
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
            np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))
    else:
        # direction kept: every element scaled by the same factor
        scale = float(stats.scale)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
            want = np.asarray(b, np.float64) * scale
            got = np.asarray(a, np.float64)
            np.testing.assert_allclose(got, want, rtol=2 * u, atol=4 * _tiny(tree))
    return tx, out, stats


@given(trees(), st.floats(0.01, 100.0), st.booleans())
def test_global_clip_properties(tree, ratio, jit):
    _check_global_clip(tree, ratio, jit)


@given(trees(), st.floats(0.01, 100.0))
def test_global_clip_is_idempotent_and_jit_equals_eager(tree, ratio):
    tx, once, _ = _check_global_clip(tree, ratio, jit=True)
    eager, _ = tx.update(tree, tx.init(tree))
    for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(eager)):
        np.testing.assert_allclose(
            np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=4 * _unit(tree)
        )
    twice, _ = jax.jit(tx.update)(once, tx.init(tree))
    for a, b in zip(jax.tree.leaves(twice), jax.tree.leaves(once)):
        np.testing.assert_allclose(
            np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=4 * _unit(tree)
        )


@given(specs(dtypes=(jnp.float32, jnp.float64)), st.floats(0.01, 100.0))
def test_global_clip_properties_float64(spec, ratio):
    with float64_enabled():
        _check_global_clip(build(spec), ratio, jit=True)


@given(trees(), st.floats(0.01, 100.0), st.sampled_from([1, 2, 3, np.inf]))
def test_per_leaf_clip_properties(tree, max_norm, p):
    tx = jaxclip.clip_by_norm(max_norm, ord=p)
    out, stats = jax.jit(tx.update)(tree, tx.init(tree))
    u = _unit(tree)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
        assert a.dtype == b.dtype
        n_in = np_norm([b], p)
        n_out = np_norm([a], p)
        assert n_out <= max_norm * (1 + 4 * u) + 4 * _tiny(tree)
        if n_in <= max_norm:
            np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))
        else:
            assert n_out == pytest.approx(max_norm, rel=4 * u + 1e-6, abs=4 * _tiny(tree))
    assert bool(stats.finite)


@given(trees(), st.floats(1e-3, 1e3), st.floats(0.0, 1.0))
def test_value_clip_properties(tree, hi, frac):
    lo = -hi * frac
    tx = jaxclip.clip_by_value(hi, min_value=lo)
    out, stats = jax.jit(tx.update)(tree, tx.init(tree))
    changed = 0
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
        assert a.dtype == b.dtype
        a64 = np.asarray(a, np.float64)
        hi_d = float(np.asarray(jnp.asarray(hi, a.dtype), np.float64))
        lo_d = float(np.asarray(jnp.asarray(lo, a.dtype), np.float64))
        assert np.all((a64 <= hi_d) & (a64 >= lo_d))
        inside = (np.asarray(b, np.float64) <= hi_d) & (np.asarray(b, np.float64) >= lo_d)
        np.testing.assert_array_equal(a64[inside], np.asarray(b, np.float64)[inside])
        changed += int((~inside).sum())
    size = sum(x.size for x in jax.tree.leaves(tree))
    assert float(stats.extra["clipped_fraction"]) == pytest.approx(changed / max(size, 1))
