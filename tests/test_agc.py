"""AGC: unit-wise clipping relative to the weights, against Optax and NumPy."""

import _references as ref
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import np_norm

import jaxclip


def _agc_tree(seed):
    rng = np.random.default_rng(seed)
    params = {
        "dense": {"kernel": rng.normal(size=(6, 4)), "bias": rng.normal(size=(4,)) * 0.01},
        "conv": rng.normal(size=(3, 3, 2, 5)) * 0.1,
        "scale": np.array(0.5),
        "zero": np.zeros((3, 2)),
    }
    grads = jax.tree.map(lambda p: rng.normal(size=np.shape(p)) * 0.05, params)
    as32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)  # noqa: E731
    return as32(params), as32(grads)


@pytest.mark.parametrize("clipping", [0.001, 0.01, 0.1, 1.0])
def test_agc_agrees_with_optax_and_the_paper(clipping):
    params, grads = _agc_tree(8)
    tx = jaxclip.agc(clipping)
    ours, stats = jax.jit(tx.update)(grads, tx.init(params), params)
    theirs, _ = optax.adaptive_grad_clip(clipping).update(grads, optax.EmptyState(), params)
    chex.assert_trees_all_close(ours, theirs, rtol=1e-6)
    for got, g, w in zip(jax.tree.leaves(ours), jax.tree.leaves(grads), jax.tree.leaves(params)):
        np.testing.assert_allclose(got, ref.agc(g, w, clipping), rtol=1e-5, atol=1e-12)
    assert float(stats.threshold) == pytest.approx(clipping)


def test_agc_statistics_over_many_leaves_match_a_numpy_rule():
    # 20 small leaves of one shape (reduced as a stack) beside leaves of their own
    rng = np.random.default_rng(4)
    shapes = [(3, 4)] * 20 + [(40, 50), (7,), (2, 3, 2, 5)]
    params = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    grads = [
        jnp.asarray(rng.normal(size=s) * rng.choice([0.001, 1.0]), jnp.float32) for s in shapes
    ]
    clipping, eps = 0.05, 1e-3
    tx = jaxclip.agc(clipping)
    out, stats = jax.jit(tx.update)(grads, tx.init(params), params)

    ratios, clipped, units = [], 0, 0
    for g, w in zip(grads, params):
        g64, w64 = np.asarray(g, np.float64), np.asarray(w, np.float64)
        axis = None if g64.ndim <= 1 else (0,) if g64.ndim == 2 else (0, 1, 2)
        g_norm = np.sqrt(np.sum(g64**2, axis=axis))
        w_star = np.maximum(np.sqrt(np.sum(w64**2, axis=axis)), eps)
        ratios.append(np.ravel(g_norm / w_star))
        clipped += int(np.sum(g_norm > clipping * w_star))
        units += np.size(g_norm)
    expected = [ref.agc(g, w, clipping) for g, w in zip(grads, params)]
    for got, want in zip(out, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
    before = np_norm([np.asarray(g, np.float64) for g in grads])
    assert float(stats.norm) == pytest.approx(before, rel=1e-6)
    assert float(stats.scale) == pytest.approx(np_norm(expected) / before, rel=1e-5)
    assert 0 < clipped < units
    assert float(stats.extra["clipped_fraction"]) == pytest.approx(clipped / units)
    assert float(stats.extra["max_ratio"]) == pytest.approx(
        np.max(np.concatenate(ratios)), rel=1e-6
    )
    assert bool(stats.clipped) and bool(stats.finite)


def test_agc_exclusion_by_path_function_and_mask():
    params, grads = _agc_tree(9)
    spike = jax.tree.map(lambda g: g * 1000, grads)
    for exclude in (
        "dense/",
        ["dense/kernel", "dense/bias"],
        lambda path, p: path.startswith("dense"),
        {"dense": {"kernel": True, "bias": True}, "conv": False, "scale": False, "zero": False},
    ):
        tx = jaxclip.agc(0.01, exclude=exclude)
        out, _ = tx.update(spike, tx.init(params), params)
        chex.assert_trees_all_equal(out["dense"], spike["dense"])
        assert float(jnp.abs(out["conv"]).max()) < float(jnp.abs(spike["conv"]).max())


def test_agc_needs_params():
    tx = jaxclip.agc()
    with pytest.raises(ValueError, match="call update\\(grads, state, params\\)"):
        tx.update({"w": jnp.ones(2)}, tx.init(None))


@pytest.mark.parametrize(
    "shape",
    [(6,), (1, 6), (1, 1, 1, 8), (4, 6), (5, 3, 4), (3, 3, 2, 4), ()],
    ids=["vector", "row", "squeezed-4d", "dense", "multi-head", "conv", "scalar"],
)
def test_agc_units_are_optax_s_for_every_rank(shape):
    """Rank 2 and 3 (multi-head kernels) reduce axis 0, rank 4 axes (0, 1, 2), and
    what squeezes to a vector is one unit, as in optax.adaptive_grad_clip."""
    rng = np.random.default_rng(len(shape))
    params = {"p": jnp.asarray(rng.normal(size=shape), jnp.float32)}
    grads = {"p": jnp.asarray(rng.normal(size=shape) * 3, jnp.float32)}
    ours = jaxclip.agc(0.05)
    theirs = optax.adaptive_grad_clip(0.05)
    want, _ = theirs.update(grads, theirs.init(params), params)
    got, _ = jax.jit(ours.update)(grads, ours.init(params), params)
    np.testing.assert_allclose(got["p"], want["p"], rtol=2e-6)
    # and against the unit norms written out by hand
    g, w = np.asarray(grads["p"], np.float64), np.asarray(params["p"], np.float64)
    axes = {0: None, 1: None, 2: (0,), 3: (0,), 4: (0, 1, 2)}[len(shape)]
    if sum(n != 1 for n in shape) <= 1:
        axes = None
    g_norm = np.sqrt(np.sum(g**2, axis=axes, keepdims=axes is not None))
    limit = 0.05 * np.maximum(np.sqrt(np.sum(w**2, axis=axes, keepdims=axes is not None)), 1e-3)
    np.testing.assert_allclose(got["p"], g * np.minimum(1, limit / g_norm), rtol=2e-6)
