"""Contracts on how the norms are computed, not only what they compute.

The only tests that read jaxprs or compiled programs, or patch private helpers:
they pin down the costs the benchmarks page relies on (docs/benchmarks.md).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import np_norm

import jaxclip
from jaxclip import _norms


def _top_level_primitives(fn, *args):
    return [eqn.primitive.name for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns]


def test_common_case_is_one_reduction_per_leaf():
    """The rescue runs in a cond branch: outside it, one sum per leaf, no max."""
    tree = [jnp.ones((4, 4)), jnp.ones(3), jnp.ones(())]
    top = _top_level_primitives(jaxclip.global_norm, tree)
    assert top.count("reduce_sum") == 3
    assert "reduce_max" not in top
    assert top.count("cond") == 1
    top = _top_level_primitives(lambda t: jaxclip.leaf_norms(t, axis=0), [jnp.ones((4, 4))] * 3)
    assert top.count("reduce_sum") == 3 and "reduce_max" not in top
    assert top.count("cond") == 1


def test_no_leaf_is_copied_to_be_measured():
    """Leaves are reduced where they lie: no concatenation of leaves (a copy of the
    tree on every call); only the per-leaf results may be joined."""
    tree = [jnp.full((8, 8), 0.5) for _ in range(70)]
    for fn in (jaxclip.global_norm, jaxclip.leaf_norms):
        jaxpr = jax.make_jaxpr(fn)(tree).jaxpr
        joined = [e for e in jaxpr.eqns if e.primitive.name == "concatenate"]
        assert all(e.outvars[0].aval.size <= len(tree) for e in joined)
    np.testing.assert_allclose(jaxclip.global_norm(tree), 0.5 * 8 * np.sqrt(len(tree)), rtol=1e-6)


def _scratch_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_rescue_branches_reserve_no_leaf_sized_scratch():
    """A rescue seldom runs, but the scratch its branch needs is reserved on every
    call: it must read the leaves in place, not write leaf-sized copies. The
    bound is the scratch of a plain norm compiled alike plus an eighth of a leaf."""
    tree = {f"w{i}": jnp.full((512, 512), 0.5) for i in range(4)}
    tree["wide"] = jnp.full((256, 1024), 0.5)
    plain = _scratch_bytes(lambda t: jnp.sqrt(sum(jnp.sum(x * x) for x in t.values())), tree)
    bound = plain + 512 * 512 * 4 / 8
    assert _scratch_bytes(jaxclip.global_norm, tree) <= bound
    for tx in (jaxclip.clip_by_global_norm(1.0), jaxclip.zclip(), jaxclip.clip_by_norm(1.0)):
        assert _scratch_bytes(tx.update, tree, tx.init(tree)) <= bound


def _count_rescues(monkeypatch):
    """A list that grows by one each time a rescue runs: only a rescue looks for the
    largest magnitudes (for p other than inf)."""
    ran = []
    max_abs = _norms._max_abs

    def counted(*args):
        jax.debug.callback(lambda: ran.append(1))
        return max_abs(*args)

    monkeypatch.setattr(_norms, "_max_abs", counted)
    return ran


def _units_with(value):
    """Leaves whose units include some whose every element is ``value``: a bias, one
    of many alike small leaves, rows of a matrix."""
    tree = {
        "kernel": jnp.ones((64, 8)).at[::4].set(value),
        "bias": jnp.full((8,), value),
        "alike": [jnp.full((4,), float(i + 1)) for i in range(20)],
    }
    tree["alike"][3] = jnp.full((4,), value)
    return tree


@pytest.mark.parametrize("axis", [None, -1])
@pytest.mark.parametrize("p", [1, 2, 3])
def test_clippers_take_all_zero_units_in_one_pass(monkeypatch, p, axis):
    """A clipper's unit whose sum of powers is zero (a frozen bias, unused embedding
    rows) costs no second pass: its scale is 1 whether its elements are zero or
    too small to square. A unit whose sum merely lost digits is measured again."""
    ran = _count_rescues(monkeypatch)
    tx = jaxclip.clip_by_norm(1e-3, ord=p, axis=axis)
    clip = jax.jit(lambda t: tx.update(t, tx.init(t))[0])
    small = 1e-18 if p != 1 else 1e-30  # squares in float32's subnormal range
    for value, rescued in [(0.0, False), (1e-30, False), (small, p == 2)]:
        ran.clear()
        tree = _units_with(value)
        out = clip(tree)
        jax.effects_barrier()
        assert bool(ran) == rescued, (value, p, axis)
        for leaf, got in zip(jax.tree.leaves(tree), jax.tree.leaves(out)):
            x = np.asarray(leaf, np.float64)
            norm = np_norm([x], p) if axis is None else np.sum(np.abs(x) ** p, -1) ** (1 / p)
            scale = np.minimum(1.0, 1e-3 / np.maximum(norm, 1e-300))
            want = x * (scale if axis is None else scale[:, None] if x.ndim == 2 else scale)
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-37)


def test_empty_leaves_need_no_second_pass(monkeypatch):
    ran = _count_rescues(monkeypatch)
    tree = {"empty": jnp.zeros((0, 5)), "w": jnp.ones((3, 5)), "b": jnp.ones((5,))}
    cols = jax.jit(lambda t: jaxclip.leaf_norms(t, axis=0))(tree)
    jax.effects_barrier()
    assert not ran
    np.testing.assert_array_equal(cols["empty"], np.zeros(5))
    np.testing.assert_allclose(cols["w"], np.full(5, 3**0.5), rtol=1e-6)


@pytest.mark.skipif(
    tuple(int(v) for v in jax.__version__.split(".")[:2]) < (0, 8),
    reason="the XLA of jax 0.7 writes the wide copy whatever the barrier",
)
def test_a_bfloat16_clip_writes_no_wide_copy_of_the_gradient():
    """``_norms.widened``: the norm's float32 cast stays inside its reduction, so the
    clip's scratch holds no float32 copy of the gradient (half a leaf is the bound)."""
    tree = {f"w{i}": jnp.full((512, 512), 0.5, jnp.bfloat16) for i in range(4)}
    tx = jaxclip.clip_by_global_norm(1.0)
    assert _scratch_bytes(tx.update, tree, tx.init(tree)) <= 512 * 512 * 4 / 2


def test_per_leaf_results_are_reduced_from_one_vector_held_apart():
    """``_norms.joined``: the global sum of 100 per-leaf sums reads them as one vector
    behind an optimization barrier (a chain of 100 additions would compile in time
    growing with its square)."""
    tree = [jnp.ones((3,)) for _ in range(100)]
    eqns = jax.make_jaxpr(jaxclip.global_norm)(tree).jaxpr.eqns
    barriers = [e for e in eqns if e.primitive.name == "optimization_barrier"]
    assert any(v.aval.shape == (100,) for e in barriers for v in e.outvars)
    assert [e.primitive.name for e in eqns].count("add") == 0


def _lowered():
    import importlib.util
    import pathlib
    import sys

    here = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(here))
    spec = importlib.util.spec_from_file_location("lowered", here / "lowered.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_census_finds_branches_loops_and_host_callbacks():
    """The counter behind benchmarks/results/lowered.md, on a program whose answer is known:
    a loop and a branch every step, a callback inside the branch and one outside."""
    lowered = _lowered()

    def f(x):
        x = jax.lax.fori_loop(0, 3, lambda i, c: c + jnp.sin(c), x)

        def loud():
            jax.debug.callback(print, x)
            return x * 2

        y = jax.lax.cond(jnp.sum(x) > 0, loud, lambda: x)
        jax.debug.callback(print, y)
        return jnp.sort(y)

    text = jax.jit(f).trace(jnp.ones(3)).lower(lowering_platforms=("cpu",)).as_text()
    counts = lowered.census(text)
    assert counts["conditionals"] == {"every_step": 1, "in_branches": 0}
    assert counts["loops"] == {"every_step": 1, "in_branches": 0}
    transfers = counts["host_transfers"]
    assert (transfers["every_step"], transfers["in_branches"]) == (1, 1)
    assert counts["custom_calls"] == {"every_step": 0, "in_branches": 0}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_programs_keep_their_recorded_branches(platform):
    """No clipper's step gains a conditional, loop, custom call or host transfer on a
    GPU or TPU beyond the counts recorded in benchmarks/results/lowered.json (regenerate
    with benchmarks/lowered.py when a change is meant)."""
    import json

    lowered = _lowered()
    recorded = json.loads(
        (lowered.pathlib.Path(lowered.__file__).parent / "results" / "lowered.json").read_text()
    )
    assert set(recorded["steps"]) == set(lowered.names())
    for name in lowered.names():
        counts = lowered.census(lowered.step_text(name, platform))
        for kind in lowered.KINDS:
            for where in ("every_step", "in_branches"):
                was = recorded["steps"][name][platform][kind][where]
                assert counts[kind][where] <= was, (name, kind, where, counts[kind][where], was)


def _sub_jaxprs(params):
    """The jaxprs inside an equation's parameters (calls, branches, loop bodies)."""
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v


def test_ghost_clipping_forms_no_per_example_gradient_of_a_dense_layer():
    """A Dense kernel read by a matrix product takes the Gram path: no (B, d_in, d_out)
    array anywhere in the program, no warning, and the norms of vmap(grad)."""
    import warnings

    from jaxclip.ghost import _plan

    d_in, d_out, size = 256, 512, 8
    params = {"w": jax.random.normal(jax.random.key(13), (d_in, d_out)) / 16, "b": jnp.zeros(d_out)}

    def loss(p, ex):
        return jnp.sum(jnp.tanh(ex["x"] @ p["w"] + p["b"]) ** 2)

    batch = {"x": jax.random.normal(jax.random.key(14), (size, d_in))}
    assert _plan(loss, params, batch) == {
        "['b']": [("add", "elementwise")],
        "['w']": [("dot_general", "gram")],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxpr = jax.make_jaxpr(lambda p, b: jaxclip.ghost_clipped_sum(loss, p, b, 1.0))(
            params, batch
        )
    shapes = set()

    def collect(j):
        for eqn in j.eqns:
            shapes.update(tuple(v.aval.shape) for v in eqn.outvars)
            for sub in _sub_jaxprs(eqn.params):
                collect(sub)

    collect(jaxpr.jaxpr)
    assert (size, d_in, d_out) not in shapes and (size, d_out, d_in) not in shapes
    assert (size, d_out) in shapes  # the output gradients are there: the walk saw inside
    norms = jax.jit(lambda p, b: jaxclip.per_example_norms(loss, p, b))(params, batch)
    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)
    squares = [np.asarray(g, np.float64).reshape(size, -1) ** 2 for g in jax.tree.leaves(grads)]
    want = np.sqrt(sum(s.sum(axis=1) for s in squares))
    np.testing.assert_allclose(norms, want, rtol=1e-5)
