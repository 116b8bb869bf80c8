"""diagnose: per-leaf health of a gradient, inside and outside jit."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import np_norm

import jaxclip


def _grads():
    return {
        "embed": jnp.full((10, 4), 1e-9),
        "layer": {"w": jnp.full((4, 4), 2.0), "b": jnp.array([1.0, jnp.inf, -jnp.inf])},
        "head": jnp.array([jnp.nan, 3.0], jnp.float16),
        "out": jnp.full((3,), 5e3),
        "norm": jnp.ones(3),
    }


@pytest.mark.parametrize("jit", [True, False])
def test_report_contents(jit):
    grads = _grads()
    report = (jax.jit(jaxclip.diagnose) if jit else jaxclip.diagnose)(grads)
    assert float(report.leaf_norms["layer"]["w"]) == pytest.approx(8.0)
    assert float(report.leaf_norms["embed"]) == pytest.approx(np_norm([grads["embed"]]))
    assert int(report.nan_count["head"]) == 1 and int(report.inf_count["head"]) == 0
    assert int(report.inf_count["layer"]["b"]) == 2 and int(report.nan_count["layer"]["b"]) == 0
    assert report.nonfinite() == ["head", "layer/b"]
    finite = [np_norm([grads[k]]) for k in ("embed", "norm", "out")] + [8.0]
    assert float(report.median_leaf_norm) == pytest.approx(float(np.median(finite)), rel=1e-6)
    assert math.isnan(float(report.global_norm))
    assert report.exploding(ratio=1e3) == ["out"]
    assert report.vanishing(ratio=1e3) == ["embed"]


def test_text_names_the_problems():
    text = jaxclip.diagnose(_grads()).text()
    assert "head" in text and "1 NaN" in text
    assert "2 inf" in text
    assert "exploding" in text and "vanishing" in text
    assert "non-finite leaves: head, layer/b" in text
    # the median says which norms it is taken over, and every column has a header
    assert "median of the finite leaf norms" in text.splitlines()[0]
    assert text.splitlines()[1].split() == ["leaf", "norm", "notes"]


def test_healthy_gradient():
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([300.0, 400.0], jnp.float16)}
    report = jaxclip.diagnose(grads)
    assert report.nonfinite() == [] and report.exploding() == [] and report.vanishing() == []
    assert float(report.global_norm) == pytest.approx(math.sqrt(25 + 250000))
    assert float(report.leaf_norms["b"]) == 500.0  # no float16 overflow


def test_report_is_a_pytree_that_leaves_jit():
    report = jax.jit(jaxclip.diagnose)({"a": jnp.ones(2)})
    leaves = jax.tree.leaves(report)
    assert all(isinstance(x, jax.Array) for x in leaves)
    assert jaxclip.diagnose({}).text().startswith("global norm 0")


def test_many_leaves():
    grads = [jnp.full((3,), float(i + 1)) for i in range(40)]
    grads[17] = grads[17].at[1].set(jnp.nan)
    report = jax.jit(jaxclip.diagnose)(grads)
    assert report.nonfinite() == ["17"]
    np.testing.assert_allclose(
        [float(n) for i, n in enumerate(report.leaf_norms) if i != 17],
        [math.sqrt(3) * (i + 1) for i in range(40) if i != 17],
        rtol=1e-6,
    )


def test_integer_leaf_is_refused():
    with pytest.raises(TypeError, match=r"\['ids'\]"):
        jaxclip.diagnose({"ids": jnp.array([1, 2])})
