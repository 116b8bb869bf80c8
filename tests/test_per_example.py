"""Per-example clipping and DP-SGD aggregation against NumPy and Optax."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxclip


def _per_example(batch=6, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(
            rng.normal(size=(batch, 4, 3)) * rng.uniform(0.1, 3, (batch, 1, 1)), jnp.float32
        ),
        "b": jnp.asarray(rng.normal(size=(batch, 3)), jnp.float32),
        "s": jnp.asarray(rng.normal(size=(batch,)), jnp.float32),
    }


def np_clip_sum(grads, c):
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
    batch = leaves[0].shape[0]
    norms = np.sqrt(sum((x.reshape(batch, -1) ** 2).sum(1) for x in leaves))
    scales = np.minimum(1.0, c / np.where(norms > 0, norms, 1.0))
    sums = [np.tensordot(scales, x, axes=(0, 0)) for x in leaves]
    return sums, norms, scales


@pytest.mark.parametrize("c", [0.0, 0.5, 2.0, 100.0])
def test_clip_and_sum_matches_numpy(c):
    grads = _per_example()
    out = jax.jit(jaxclip.clip_and_sum)(grads, c)
    sums, norms, scales = np_clip_sum(grads, c)
    for got, want in zip(jax.tree.leaves(out.total), sums):
        # a float32 sum of six terms of order 1, in whatever order XLA adds them
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=6 * 2 * 2**-24)
    assert int(out.num_examples) == 6 and int(out.clipped) == int(np.sum(norms > c))
    assert float(out.max_norm) == pytest.approx(norms.max(), rel=1e-6)
    assert float(out.scale_sum) == pytest.approx(scales.sum(), rel=1e-6)


def test_agrees_with_optax():
    grads = _per_example(batch=8, seed=1)
    ours = jaxclip.clip_and_sum(grads, 1.0)
    total, clipped = optax.per_example_global_norm_clip(jax.tree.leaves(grads), 1.0)
    for got, want in zip(jax.tree.leaves(ours.total), total):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert int(ours.clipped) == int(clipped)


class PerExampleClipTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_mean_and_sum(self):
        grads = _per_example()
        sums, norms, _ = np_clip_sum(grads, 1.0)
        for reduce, divisor in (("mean", 6), ("sum", 1)):
            tx = jaxclip.per_example_clip(1.0, reduce=reduce)
            out, state = self.variant(tx.update)(grads, tx.init(None))
            for got, want in zip(jax.tree.leaves(out), sums):
                np.testing.assert_allclose(got, want / divisor, rtol=2e-6, atol=1e-7)
            assert float(state.stats.extra["clipped_fraction"]) == pytest.approx(np.mean(norms > 1))
            assert float(state.stats.norm) == pytest.approx(norms.mean(), rel=1e-6)
            assert float(state.stats.threshold) == 1.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_chains_with_an_optimizer(self):
        tx = optax.chain(jaxclip.per_example_clip(1.0), optax.sgd(0.5))
        params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), _per_example())
        updates, state = self.variant(tx.update)(_per_example(), tx.init(params), params)
        sums, _, _ = np_clip_sum(_per_example(), 1.0)
        for got, want in zip(jax.tree.leaves(updates), sums):
            np.testing.assert_allclose(got, -0.5 * want / 6, rtol=2e-6, atol=1e-7)
        assert int(jaxclip.get_stats(state).step) == 1


def test_noise_has_the_right_scale_and_is_reproducible():
    batch, dim, z, c = 4, 20_000, 1.3, 0.7
    grads = {"w": jnp.zeros((batch, dim))}
    tx = jaxclip.per_example_clip(c, noise_multiplier=z, seed=3)
    update = jax.jit(tx.update)
    out1, state = update(grads, tx.init(None))
    noise = np.asarray(out1["w"]) * batch  # the sum's noise
    assert np.std(noise) == pytest.approx(z * c, rel=0.03)
    assert abs(np.mean(noise)) < 4 * z * c / math.sqrt(dim)
    assert float(state.stats.extra["noise_std"]) == pytest.approx(z * c)
    again, _ = update(grads, tx.init(None))
    np.testing.assert_array_equal(again["w"], out1["w"])  # same seed, same noise
    out2, _ = update(grads, state)
    assert not np.allclose(out2["w"], out1["w"])  # the key moves on


def np_adaptive(norm_batches, c, gamma, eta):
    out = []
    for norms in norm_batches:
        out.append(c)
        b = np.mean(norms <= c)
        c = c * math.exp(-eta * (b - gamma))
    return out


def test_adaptive_clip_norm_follows_the_published_rule():
    rng = np.random.default_rng(5)
    norm_batches = [np.exp(rng.normal(0.0, 0.5, 16)) for _ in range(40)]
    tx = jaxclip.per_example_clip(0.1, target_quantile=0.7, quantile_learning_rate=0.3)
    state = tx.init(None)
    update = jax.jit(tx.update)
    used = []
    for norms in norm_batches:
        grads = {"g": jnp.asarray(norms[:, None] * np.array([[0.6, 0.8]]), jnp.float32)}
        _, state = update(grads, state)
        used.append(float(state.stats.threshold))
    np.testing.assert_allclose(used, np_adaptive(norm_batches, 0.1, 0.7, 0.3), rtol=2e-5)


def test_adaptive_clip_norm_settles_at_the_quantile():
    rng = np.random.default_rng(6)
    tx = jaxclip.per_example_clip(0.05, target_quantile=0.5, quantile_learning_rate=0.2)

    def body(state, key):
        norms = jnp.exp(jax.random.normal(key, (64,)) * 0.5 + 1.0)
        _, state = tx.update({"g": norms[:, None]}, state)
        return state, state.clip_norm

    keys = jax.random.split(jax.random.PRNGKey(int(rng.integers(100))), 400)
    _, cs = jax.lax.scan(body, tx.init(None), keys)
    assert float(np.median(cs[200:])) == pytest.approx(math.exp(1.0), rel=0.1)


def test_noise_split_with_adaptive_clipping():
    z, batch = 1.1, 40
    tx = jaxclip.per_example_clip(1.0, noise_multiplier=z, target_quantile=0.5)
    _, state = jax.jit(tx.update)({"g": jnp.ones((batch, 3))}, tx.init(None))
    sigma_b = batch / 20
    z_sum = (z**-2 - (2 * sigma_b) ** -2) ** -0.5
    assert float(state.stats.extra["noise_std"]) == pytest.approx(z_sum * 1.0, rel=1e-6)
    assert z_sum > z


def test_microbatches_give_the_same_sum():
    rng = np.random.default_rng(7)
    params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.zeros(3)}
    batch = {
        "x": jnp.asarray(rng.normal(size=(24, 5)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(24, 3)) * 3, jnp.float32),
    }

    def loss(p, ex):
        return jnp.sum((ex["x"] @ p["w"] + p["b"] - ex["y"]) ** 2)

    whole = jaxclip.clip_and_sum(jax.vmap(jax.grad(loss), (None, 0))(params, batch), 1.0)
    for size in (None, 24, 8, 1):
        part = jax.jit(
            lambda p, b, size=size: jaxclip.clipped_gradient_sum(
                jax.grad(loss), p, b, 1.0, microbatch_size=size
            )
        )(params, batch)
        chex.assert_trees_all_close(part.total, whole.total, rtol=1e-5)
        assert int(part.num_examples) == 24 and int(part.clipped) == int(whole.clipped)
    # the transform takes the microbatched sum in place of per-example gradients
    tx = jaxclip.per_example_clip(1.0)
    from_sum, _ = tx.update(part, tx.init(params))
    from_grads, _ = tx.update(jax.vmap(jax.grad(loss), (None, 0))(params, batch), tx.init(params))
    chex.assert_trees_all_close(from_sum, from_grads, rtol=1e-5)
    assert float(jaxclip.per_example_clip_norm(tx.init(params))) == 1.0


def test_bad_input():
    with pytest.raises(ValueError, match="same leading batch axis"):
        jaxclip.clip_and_sum({"a": jnp.ones((3, 2)), "b": jnp.ones((4, 2))}, 1.0)
    with pytest.raises(ValueError, match="microbatch_size must be a positive int dividing"):
        jaxclip.clipped_gradient_sum(jax.grad(jnp.sum), 1.0, jnp.ones(10), 1.0, microbatch_size=3)
    with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
        jaxclip.per_example_clip(1.0, noise_multiplier=-1.0)
    with pytest.raises(ValueError, match="target_quantile must be <= 1"):
        jaxclip.per_example_clip(1.0, target_quantile=2.0)
    with pytest.raises(ValueError, match="reduce must be one of"):
        jaxclip.per_example_clip(1.0, reduce="max")


def test_nonfinite_examples():
    grads = {"g": jnp.array([[3.0, 4.0], [jnp.nan, 1.0], [0.3, 0.4]])}
    out, state = jaxclip.per_example_clip(1.0).update(
        grads, jaxclip.per_example_clip(1.0).init(None)
    )
    assert bool(jnp.all(jnp.isnan(out["g"]))) and not bool(state.stats.finite)
    tx = jaxclip.per_example_clip(1.0, nonfinite="skip")
    out, _ = tx.update(grads, tx.init(None))
    np.testing.assert_array_equal(out["g"], [0.0, 0.0])
    tx = jaxclip.per_example_clip(1.0, nonfinite="zero")
    out, _ = tx.update(grads, tx.init(None))
    np.testing.assert_allclose(out["g"], [(0.6 + 0.0 + 0.3) / 3, (0.8 + 1.0 + 0.4) / 3], rtol=1e-6)
