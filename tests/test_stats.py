"""ClipStats: found anywhere in an Optax state, read inside and outside jit, logged flat."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxclip

PARAMS = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
GRADS = {"w": jnp.full((2, 2), 3.0), "b": jnp.full(2, 4.0)}
NORM = math.sqrt(4 * 9 + 2 * 16)


def _run(tx, steps=1, grads=GRADS):
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    for _ in range(steps):
        _, state = update(grads, state, PARAMS)
    return state


def test_fields_and_dtypes():
    stats = _run(jaxclip.clip_by_global_norm(1.0))
    assert isinstance(stats, jaxclip.ClipStats)
    assert stats.norm.dtype == jnp.float32 and stats.norm.shape == ()
    assert stats.clipped.dtype == jnp.bool_ and stats.finite.dtype == jnp.bool_
    assert stats.step.dtype == jnp.int32
    assert float(stats.norm) == pytest.approx(NORM)
    assert float(stats.threshold) == 1.0
    assert float(stats.scale) == pytest.approx(1.0 / NORM)


def test_inside_chain_and_jit():
    tx = optax.chain(jaxclip.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = _run(tx, steps=3)
    stats = jaxclip.get_stats(state)
    assert int(stats.step) == 3 and int(stats.clipped_steps) == 3
    # readable inside jit as well
    norm = jax.jit(lambda s: jaxclip.get_stats(s).norm)(state)
    assert float(norm) == pytest.approx(NORM)


def test_inside_inject_hyperparams():
    tx = optax.chain(
        optax.inject_hyperparams(jaxclip.clip_by_global_norm)(max_norm=2.0), optax.sgd(0.1)
    )
    stats = jaxclip.get_stats(_run(tx))
    assert float(stats.threshold) == 2.0


def test_inside_masked():
    tx = optax.masked(jaxclip.clip_by_global_norm(1.0), {"w": True, "b": False})
    stats = jaxclip.get_stats(_run(tx))
    assert float(stats.norm) == pytest.approx(math.sqrt(4 * 9))


def test_inside_partition_gives_one_record_per_group():
    tx = optax.partition(
        {
            "kernels": jaxclip.clip_by_global_norm(1.0),
            "biases": jaxclip.clip_by_global_norm(10.0),
        },
        {"w": "kernels", "b": "biases"},
    )
    found = jaxclip.get_stats(_run(tx))
    assert isinstance(found, dict) and len(found) == 2
    by_threshold = {float(s.threshold): s for s in found.values()}
    assert float(by_threshold[1.0].norm) == pytest.approx(6.0)
    assert float(by_threshold[10.0].norm) == pytest.approx(math.sqrt(32))
    assert all("kernels" in k or "biases" in k for k in found)
    flat = jaxclip.stats_dict(_run(tx))
    kernel_key = next(k for k in flat if "kernels" in k and k.endswith("/norm"))
    assert flat[kernel_key] == pytest.approx(6.0)


def test_inside_multisteps_runs_once_per_accumulated_step():
    tx = optax.MultiSteps(
        optax.chain(jaxclip.clip_by_global_norm(1.0), optax.sgd(0.1)), every_k_schedule=3
    )
    state = _run(tx, steps=6)
    stats = jaxclip.get_stats(state)
    assert int(stats.step) == 2
    assert float(stats.norm) == pytest.approx(NORM, rel=1e-6)  # of the averaged gradient


def test_nested_several_records_are_keyed_by_path():
    tx = optax.chain(jaxclip.clip_by_value(3.5), jaxclip.clip_by_global_norm(1.0), optax.sgd(0.1))
    found = jaxclip.get_stats(_run(tx))
    assert set(found) == {"0", "1"}
    assert float(found["0"].extra["clipped_fraction"]) == pytest.approx(2 / 6)
    assert float(found["1"].norm) == pytest.approx(math.sqrt(4 * 9 + 2 * 3.5**2))


def test_no_record_gives_a_helpful_error():
    state = optax.adam(1e-3).init(PARAMS)
    with pytest.raises(ValueError, match="no ClipStats record"):
        jaxclip.get_stats(state)
    with pytest.raises(ValueError, match="no ClipStats record"):
        jaxclip.stats_dict(state)


def test_to_dict_is_flat_floats():
    stats = jaxclip.get_stats(_run(jaxclip.clip_by_norm(1.0)))
    d = stats.to_dict(prefix="clip/")
    assert all(isinstance(v, float) for v in d.values())
    assert d["clip/clipped"] == 1.0 and d["clip/finite"] == 1.0
    assert d["clip/step"] == 1.0
    assert d["clip/extra/clipped_fraction"] == 1.0
    assert d["clip/norm"] == pytest.approx(NORM)
    assert d["clip/extra/max_unit_norm"] == pytest.approx(6.0)


def test_to_dict_of_a_state_batched_over_seeds():
    tx = jaxclip.clip_by_global_norm(1.0)
    states = jax.vmap(tx.init)(jnp.ones((3, 2)))
    grads = jnp.array([[3.0, 4.0], [0.3, 0.4], [6.0, 8.0]])
    _, states = jax.vmap(tx.update)(grads, states)
    d = states.to_dict()
    assert [d[f"norm/{i}"] for i in range(3)] == pytest.approx([5.0, 0.5, 10.0])
    assert [d[f"clipped/{i}"] for i in range(3)] == [1.0, 0.0, 1.0]


def test_clipped_norm_is_post_clip():
    d = jaxclip.get_stats(_run(jaxclip.clip_by_global_norm(2.0))).to_dict()
    assert d["clipped_norm"] == pytest.approx(2.0)
    assert d["norm"] == pytest.approx(NORM)


def test_state_is_fixed_shape_and_checkpointable():
    tx = optax.chain(jaxclip.clip_by_global_norm(1.0), optax.adam(1e-3))
    s1 = _run(tx, steps=1)
    s2 = _run(tx, steps=2)
    assert jax.tree.structure(s1) == jax.tree.structure(s2)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        assert a.shape == b.shape and a.dtype == b.dtype
    # round trip through NumPy (what a checkpoint does) and continue
    restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), s1)
    _, cont = jax.jit(tx.update)(GRADS, restored, PARAMS)
    assert int(jaxclip.get_stats(cont).step) == 2


def test_scan_carry():
    tx = jaxclip.clip_by_global_norm(1.0)

    def body(state, g):
        _, state = tx.update(g, state)
        return state, jaxclip.get_stats(state).norm

    grads = jnp.array([[3.0, 4.0], [0.6, 0.8], [0.0, 0.0]])
    state, norms = jax.lax.scan(body, tx.init(None), grads)
    np.testing.assert_allclose(norms, [5.0, 1.0, 0.0], rtol=1e-6)
    assert int(state.clipped_steps) == 1


@pytest.mark.parametrize(
    "tx",
    [jaxclip.clip_by_global_norm(1.0), jaxclip.clip_by_norm(1.0), jaxclip.clip_by_value(1.0)],
    ids=["global_norm", "norm", "value"],
)
def test_state_can_be_donated(tx):
    tx = optax.chain(tx, optax.adam(1e-3))
    state = tx.init(PARAMS)
    buffers = [id(x) for x in jax.tree.leaves(state)]
    assert len(buffers) == len(set(buffers))
    step = jax.jit(lambda s: tx.update(GRADS, s, PARAMS)[1], donate_argnums=0)
    for _ in range(3):
        state = step(state)
    assert int(jaxclip.get_stats(state).step) == 3
