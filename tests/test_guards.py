"""skip_on_spike: whole-step skipping against a NumPy version of the rule."""

import _references as ref
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import np_norm

import jaxclip


def _run_skip(norms, losses, window, factor, **kwargs):
    tx = jaxclip.skip_on_spike(optax.sgd(1.0), window=window, factor=factor, **kwargs)
    state = tx.init(jnp.zeros(1))
    update = jax.jit(tx.update)
    skipped = []
    for i, n in enumerate(norms):
        loss = {} if losses is None else {"loss": jnp.float32(losses[i])}
        out, state = update(jnp.array([n], jnp.float32), state, **loss)
        skipped.append(bool(state.stats.clipped))
        if skipped[-1]:
            assert float(out[0]) == 0.0
        else:
            np.testing.assert_allclose(float(out[0]), -n, rtol=1e-6)  # NaN where n is
    return skipped, state


def test_skip_on_spike_matches_the_rule():
    norms = list(ref.spiky_norms(80, seed=10, spike_every=13, spike_size=20.0))
    norms[40] = float("nan")
    rng = np.random.default_rng(11)
    losses = list(2.0 + rng.normal(0, 0.05, 80))
    losses[57] = 9.0  # a loss spike with an ordinary norm
    skipped, state = _run_skip(norms, losses, window=16, factor=4.0)
    expected = ref.skip_on_spike(norms, losses, window=16, factor=4.0)
    assert skipped == expected
    assert skipped[40] and skipped[57] and not any(skipped[:8])
    assert int(state.stats.clipped_steps) == sum(expected)


@pytest.mark.parametrize("limit", [0, 2, 5])
def test_skip_on_spike_gives_up_after_too_many_skips_in_a_row(limit):
    """Norms that rise for good (and a run of NaN): past the limit a step is taken and
    counted, as optax.apply_if_finite does with max_consecutive_errors."""
    norms = [1.0 + 0.05 * (i % 3) for i in range(12)] + [50.0] * 8
    norms += [float("nan")] * 8 + [1.0] * 4
    skipped, state = _run_skip(norms, None, window=8, factor=3.0, max_consecutive_skips=limit)
    expected = ref.skip_on_spike(norms, window=8, factor=3.0, max_consecutive_skips=limit)
    assert skipped == expected
    unlimited = ref.skip_on_spike(norms, window=8, factor=3.0)
    forced = sum(u and not s for u, s in zip(unlimited, skipped))
    assert forced > 0 and float(state.stats.extra["forced_steps"]) == forced
    longest = max(len(run) for run in "".join("x" if s else "." for s in skipped).split("."))
    assert longest <= limit
    if limit == 0:
        assert not any(skipped)


def test_skip_on_spike_refuses_a_bad_limit():
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="max_consecutive_skips"):
            jaxclip.skip_on_spike(optax.sgd(1.0), max_consecutive_skips=bad)


def test_skip_on_spike_leaves_the_inner_state_unchanged():
    tx = jaxclip.skip_on_spike(optax.adam(0.1), window=4, factor=3.0)
    state = tx.init(jnp.zeros(1))
    for n in (1.0, 1.0, 1.1, 0.9):
        _, state = tx.update(jnp.array([n]), state)
    before = state.inner
    out, state = tx.update(jnp.array([500.0]), state)
    assert float(out[0]) == 0.0
    chex.assert_trees_all_equal(state.inner, before)
    assert int(state.norm_count) == 5  # the window keeps filling


def _spike_grads():
    rng = np.random.default_rng(12)
    return {
        "w": jnp.asarray(rng.normal(size=(6, 5)) * 3, jnp.float32),
        "b": jnp.asarray(rng.normal(size=5), jnp.float32),
    }


@pytest.mark.parametrize(
    "inner, clip_norm",
    [
        # a transformation before the clip hands it other arrays: the norm of 2 g
        (
            optax.chain(optax.scale(2.0), jaxclip.clip_by_global_norm(1.0)),
            lambda leaves: 2 * np_norm(leaves),
        ),
        # the same arrays, another norm
        (jaxclip.clip_by_global_norm(1.0, ord=1), lambda leaves: np_norm(leaves, 1)),
    ],
    ids=["changed-gradient", "other-order"],
)
def test_skip_on_spike_inner_clip_measures_what_it_receives(inner, clip_norm):
    grads = _spike_grads()
    tx = jaxclip.skip_on_spike(inner, window=4)
    _, state = jax.jit(tx.update)(grads, tx.init(grads))
    leaves = jax.tree.leaves(grads)
    assert float(jaxclip.get_stats(state.inner).norm) == pytest.approx(clip_norm(leaves), rel=1e-6)
    assert float(state.stats.norm) == pytest.approx(np_norm(leaves), rel=1e-6)
