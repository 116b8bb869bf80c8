"""Trees that mix float16, bfloat16, float32 and (with x64) float64 leaves, for every clipper.

Hypothesis draws the trees (up to 5 leaves of up to 18 elements, values that every
dtype of the tree represents), the hyperparameters and, for the adaptive clippers,
a stream of steps; parameters given to ``init`` (and AGC's weights) may have other
dtypes than the gradients. Each step is checked against a NumPy float64
transcription of the clipper's documented rule, computed from the values as
rounded to their leaf dtypes:

- every output leaf keeps its dtype and shape, and equals the reference to the
  leaf dtype's precision (float16 1e-3, bfloat16 1e-2, float32 1e-5 and float64
  1e-12, relative), or to the precision of the accumulation or state dtype when
  that is coarser (a float32 norm or rule state for a float64 leaf);
- the statistics (``norm``, ``scale``, ``clipped``) equal the reference, in the
  dtype of the statistics (float64 when ``init`` saw a float64 leaf, or None with
  x64 on). ``clipped`` is checked wherever the reference's decision is not within
  rounding of its boundary; rules whose later steps jump with that decision
  (quantile tracking, ZClip, spike skipping) only draw streams clear of it.

Updates run op by op (``jax.disable_jit``): hypothesis draws a new tree structure
per example, and compiling each would dominate. ``test_*_jitted`` run fixed trees
under ``jax.jit``. Each property runs 10 examples by default and 100 with --slow.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, NamedTuple

import _references as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import float64_enabled, np_norm
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import jaxclip

F16, BF16, F32, F64 = (np.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64))
LOW = (F16, BF16, F32)
TOL = {F16: 1e-3, BF16: 1e-2, F32: 1e-5, F64: 1e-12}
TINY = {d: float(jnp.finfo(d).tiny) for d in TOL}
# few shapes, so that the op-by-op compile cache serves most examples
SHAPES = [(), (5,), (2, 3), (2, 1, 2, 3)]
# AGC's unit axes by rank: also a leaf that squeezes to a vector, and rank 3
AGC_SHAPES = [(), (5,), (1, 4), (2, 3), (3, 1, 2), (2, 1, 2, 3)]
# (examples, x64 modes drawn from): the default run keeps x64 on, which halves the
# op-by-op compiles (trees without float64 leaves are still drawn); --slow draws both
BUDGETS = [
    pytest.param((8, (True,)), id="fast"),
    pytest.param((100, (False, True)), id="thorough", marks=pytest.mark.slow),
]


def run_property(budget: tuple, cases: Any, check: Any) -> None:
    examples, x64_modes = budget
    strategy = cases(x64_modes)
    settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )(given(strategy)(check))()


# -- trees ---------------------------------------------------------------------------------


class Spec(NamedTuple):
    """A tree: per leaf a dtype and a shape; values from ``seed``, around 10^exponent."""

    x64: bool
    leaves: tuple[tuple[np.dtype, tuple[int, ...]], ...]
    seed: int
    exponent: float

    @property
    def dtypes(self) -> list[np.dtype]:
        return [d for d, _ in self.leaves]

    def build(self, step: int = 0, factor: float = 1.0, dtypes: Any = None) -> dict:
        """The tree of one step: fresh values, times ``factor``, rounded to each dtype."""
        rng = np.random.default_rng([self.seed, step])
        dtypes = self.dtypes if dtypes is None else dtypes
        out = {}
        for i, ((_, shape), dtype) in enumerate(zip(self.leaves, dtypes)):
            spread = 10 ** rng.uniform(-0.5, 0.5)  # leaves of different sizes
            values = rng.standard_normal(shape) * 10**self.exponent * spread * factor
            out[f"l{i}"] = jnp.asarray(values, dtype)
        return out


@st.composite
def specs(draw, x64_modes, shapes=SHAPES, exponents=(-2.0, 2.0), max_leaves=5):
    """Float16 holds every value: at most 10^2.5 * ~5 sigma * the stream's factors
    (< 20) stays far below 65504, and subnormal values are kept as they round."""
    x64 = draw(st.sampled_from(x64_modes))
    dtypes = (*LOW, F64) if x64 else LOW
    n = draw(st.integers(1, max_leaves))
    leaves = tuple((draw(st.sampled_from(dtypes)), draw(st.sampled_from(shapes))) for _ in range(n))
    seed = draw(st.integers(0, 2**32 - 1))
    exponent = draw(st.floats(*exponents))
    return Spec(x64, leaves, seed, exponent)


def x64_context(x64: bool):
    return float64_enabled() if x64 else contextlib.nullcontext()


def np_leaves(tree: Any) -> list[np.ndarray]:
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


# initial parameters: None, the gradient tree itself, or zeros of one dtype
INITS = st.sampled_from(["none", "same", "float32", "float64"])


def init_params(kind: str, tree: Any, x64: bool) -> Any:
    if kind == "none":
        return None
    if kind == "same":
        return tree
    dtype = F64 if kind == "float64" and x64 else F32
    return jax.tree.map(lambda x: jnp.zeros(x.shape, dtype), tree)


def stats_dtype(params: Any, x64: bool) -> np.dtype:
    """The documented dtype of the statistics (and of the rules' state)."""
    if params is None:
        return F64 if x64 else F32
    return F64 if any(np.dtype(x.dtype) == F64 for x in jax.tree.leaves(params)) else F32


def global_tol(dtypes: list) -> float:
    """A global norm accumulates in float64 when a leaf is float64, else float32."""
    return TOL[F64] if F64 in dtypes else TOL[F32]


def unit_tol(dtypes: list) -> float:
    """Per-leaf norms accumulate in each leaf's own accumulation dtype."""
    return TOL[F64] if all(d == F64 for d in dtypes) else TOL[F32]


# -- comparisons ---------------------------------------------------------------------------


class Expected(NamedTuple):
    out: list[np.ndarray]  # per leaf, float64
    norm: float
    scale: float
    clipped: bool
    margin: float  # relative distance of the closest decision to its boundary


def run(tx, steps: list, init: Any, params: Any = None) -> list[tuple[Any, Any]]:
    """(updates, state) after each step, op by op."""
    out = []
    with jax.disable_jit():
        state = tx.init(init)
        for g in steps:
            updates, state = tx.update(g, state, params)
            out.append((updates, state))
    return out


def check_outputs(out: Any, tree: Any, expected: list, tol: float, exact: bool = False) -> None:
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    for o, x, e in zip(jax.tree.leaves(out), jax.tree.leaves(tree), expected):
        assert o.dtype == x.dtype, (o.dtype, x.dtype)
        assert o.shape == x.shape
        actual = np.asarray(o, np.float64)
        if exact:
            np.testing.assert_array_equal(actual, e)
        else:
            rtol = max(TOL[np.dtype(o.dtype)], tol)
            np.testing.assert_allclose(actual, e, rtol=rtol, atol=TINY[np.dtype(o.dtype)])


def check_stats(stats: jaxclip.ClipStats, expected: Expected, dtype: np.dtype, tol: float) -> None:
    tol = max(tol, TOL[dtype])
    assert np.dtype(stats.norm.dtype) == dtype and np.dtype(stats.scale.dtype) == dtype
    assert float(stats.norm) == pytest.approx(expected.norm, rel=tol, abs=1e-30)
    assert float(stats.scale) == pytest.approx(expected.scale, rel=tol, abs=tol)
    if expected.margin > 10 * tol:
        assert bool(stats.clipped) == expected.clipped


def margin(values: Any, boundary: Any) -> float:
    """The smallest relative distance between ``values`` and their ``boundary``."""
    v = np.atleast_1d(np.asarray(values, np.float64)).ravel()
    b = np.broadcast_to(np.asarray(boundary, np.float64), v.shape)
    if v.size == 0:
        return math.inf
    d = np.abs(v - b) / np.maximum(np.maximum(np.abs(v), np.abs(b)), 1e-300)
    return float(np.min(d))


RATIOS = st.one_of(st.floats(0.2, 0.8), st.floats(1.25, 5.0))

# -- clip_by_global_norm -----------------------------------------------------------------


@st.composite
def global_cases(draw, x64_modes):
    return draw(specs(x64_modes)), draw(RATIOS), draw(INITS)


def check_global_norm(case):
    spec, ratio, init = case
    with x64_context(spec.x64):
        tree = spec.build()
        xs = np_leaves(tree)
        n = np_norm(xs)
        assume(n > 0)
        max_norm = float(ratio * n)
        s = max_norm / n if n > max_norm else 1.0
        params = init_params(init, tree, spec.x64)
        ((out, stats),) = run(jaxclip.clip_by_global_norm(max_norm), [tree], params)
        tol = global_tol(spec.dtypes)
        check_outputs(out, tree, [x * s for x in xs], tol)
        expected = Expected([], n, s, n > max_norm, margin(n, max_norm))
        check_stats(stats, expected, stats_dtype(params, spec.x64), tol)
        assert float(stats.threshold) == pytest.approx(max_norm, rel=max(tol, TOL[F32]))


@pytest.mark.parametrize("budget", BUDGETS)
def test_clip_by_global_norm(budget):
    run_property(budget, global_cases, check_global_norm)


# -- clip_by_norm --------------------------------------------------------------------------


@st.composite
def by_norm_cases(draw, x64_modes):
    axis = draw(st.sampled_from([None, 0]))
    shapes = SHAPES if axis is None else [s for s in SHAPES if s]
    return draw(specs(x64_modes, shapes=shapes)), axis, draw(st.floats(0.3, 3.0)), draw(INITS)


def check_by_norm(case):
    spec, axis, ratio, init = case
    with x64_context(spec.x64):
        tree = spec.build()
        xs = np_leaves(tree)
        units = np.concatenate([np.ravel(n) for n in ref.clip_by_norm(xs, 1.0, axis)[1]])
        max_norm = float(ratio * np.median(units))
        outs = ref.clip_by_norm(xs, max_norm, axis)[0]
        params = init_params(init, tree, spec.x64)
        ((out, stats),) = run(jaxclip.clip_by_norm(max_norm, axis=axis), [tree], params)
        # each leaf's norm (and so its scale) in that leaf's accumulation dtype
        for o, x, e in zip(jax.tree.leaves(out), jax.tree.leaves(tree), outs):
            check_outputs(o, x, [e], unit_tol([np.dtype(x.dtype)]))
        n = np_norm(xs)
        clipped = bool(np.any(units > max_norm))
        expected = Expected([], n, np_norm(outs) / n, clipped, margin(units, max_norm))
        tol = unit_tol(spec.dtypes)
        check_stats(stats, expected, stats_dtype(params, spec.x64), tol)
        max_unit = float(stats.extra["max_unit_norm"])
        assert max_unit == pytest.approx(float(np.max(units)), rel=max(tol, TOL[F32]))


@pytest.mark.parametrize("budget", BUDGETS)
def test_clip_by_norm(budget):
    run_property(budget, by_norm_cases, check_by_norm)


# -- clip_by_value -------------------------------------------------------------------------


@st.composite
def by_value_cases(draw, x64_modes):
    spec = draw(specs(x64_modes))
    statistics = draw(st.sampled_from(["full", "light"]))
    upper = draw(st.floats(0.05, 1.5))
    # None: symmetric; no bound so small that it is subnormal (flushed to zero on CPU)
    lower = draw(st.one_of(st.none(), st.just(0.0), st.floats(-1.5, -1e-3)))
    return spec, statistics, upper, lower, draw(INITS)


def rounded(value: float, dtype: np.dtype) -> float:
    """A bound rounded to a leaf dtype, as the docstring says."""
    return float(np.asarray(value, dtype).astype(np.float64))


def check_by_value(case):
    spec, statistics, upper, lower, init = case
    with x64_context(spec.x64):
        tree = spec.build()
        xs = np_leaves(tree)
        top = max(float(np.max(np.abs(x), initial=0.0)) for x in xs)
        hi = upper * top
        lo = None if lower is None else lower * top
        tx = jaxclip.clip_by_value(hi, lo, statistics=statistics)
        params = init_params(init, tree, spec.x64)
        ((out, stats),) = run(tx, [tree], params)
        expected_out = []
        for x, d in zip(xs, spec.dtypes):
            bound_lo = -rounded(hi, d) if lo is None else rounded(lo, d)
            expected_out.append(np.clip(x, bound_lo, rounded(hi, d)))
        # an element-wise clip is exact in every dtype
        check_outputs(out, tree, expected_out, 0.0, exact=True)
        n = np_norm(xs)
        changed = sum(int(np.sum(e != x)) for e, x in zip(expected_out, xs))
        if statistics == "full":
            scale = np_norm(expected_out) / n if n > 0 else 1.0
        else:
            after = max(float(np.max(np.abs(e), initial=0.0)) for e in expected_out)
            scale = after / top if top > 0 else 1.0
        expected = Expected([], n, scale, changed > 0, math.inf)
        tol = global_tol(spec.dtypes)
        dtype = stats_dtype(params, spec.x64)
        check_stats(stats, expected, dtype, tol)
        threshold = max(abs(hi), abs(lo) if lo is not None else 0.0)
        assert float(stats.threshold) == pytest.approx(threshold, rel=max(tol, TOL[dtype]))
        if statistics == "full":
            size = sum(x.size for x in xs)
            assert float(stats.extra["clipped_fraction"]) == pytest.approx(changed / size)
        else:
            assert float(stats.extra["max_abs"]) == pytest.approx(top, rel=max(tol, TOL[dtype]))


@pytest.mark.parametrize("budget", BUDGETS)
def test_clip_by_value(budget):
    run_property(budget, by_value_cases, check_by_value)


# -- streams for the adaptive clippers -----------------------------------------------------


@st.composite
def factors(draw, steps, spike_from=0):
    """Per step a factor around 1, or from ``spike_from`` on possibly a spike (x 8 to 20)."""
    out = []
    for i in range(steps):
        spike = i >= spike_from and draw(st.integers(0, 3)) == 0
        out.append(draw(st.floats(8.0, 20.0)) if spike else draw(st.floats(0.6, 1.6)))
    return out


def build_stream(spec: Spec, multipliers: list) -> list[dict]:
    return [spec.build(step=i, factor=f) for i, f in enumerate(multipliers)]


def stream_norms(trees: list) -> list[float]:
    return [np_norm(np_leaves(t)) for t in trees]


def check_global_stream(spec, trees, results, expected, params, state_tol):
    """A global-norm rule: every step scaled by one factor."""
    dtype = stats_dtype(params, spec.x64)
    tol = max(global_tol(spec.dtypes), state_tol)
    for tree, (out, state), e in zip(trees, results, expected):
        check_outputs(out, tree, [x * e.scale for x in np_leaves(tree)], tol)
        stats = jaxclip.get_stats(state) if not hasattr(state, "inner") else state.stats
        check_stats(stats, e, dtype, tol)


# -- autoclip ------------------------------------------------------------------------------


@st.composite
def autoclip_cases(draw, x64_modes):
    steps = draw(st.integers(1, 5))
    spec = draw(specs(x64_modes, exponents=(-2.0, 1.0)))
    return spec, draw(factors(steps)), draw(st.floats(0.0, 100.0)), draw(INITS)


def check_autoclip(case):
    spec, multipliers, percentile, init = case
    with x64_context(spec.x64):
        trees = build_stream(spec, multipliers)
        norms = stream_norms(trees)
        params = init_params(init, trees[0], spec.x64)
        results = run(jaxclip.autoclip(percentile, history=8), trees, params)
        expected = [
            Expected([], n, r["scale"], r["scale"] < 1, margin(n + 1e-6, r["threshold"]))
            for n, r in zip(norms, ref.autoclip(norms, percentile))
        ]
        dtype = stats_dtype(params, spec.x64)
        check_global_stream(spec, trees, results, expected, params, TOL[dtype])
        for (_, state), r in zip(results, ref.autoclip(norms, percentile)):
            tol = max(global_tol(spec.dtypes), TOL[dtype])
            assert float(state.stats.threshold) == pytest.approx(r["threshold"], rel=tol)


@pytest.mark.parametrize("budget", BUDGETS)
def test_autoclip(budget):
    run_property(budget, autoclip_cases, check_autoclip)


# -- zclip ---------------------------------------------------------------------------------


@st.composite
def zclip_cases(draw, x64_modes):
    warmup = draw(st.integers(1, 3))
    spec = draw(specs(x64_modes, exponents=(-2.0, 1.0)))
    multipliers = draw(factors(warmup + 3, spike_from=warmup))
    variant = draw(st.sampled_from(["adaptive_scaling", "mean", "percentile"]))
    kwargs = dict(
        alpha=draw(st.floats(0.5, 0.99)),
        warmup_steps=warmup,
        mode="percentile" if variant == "percentile" else "zscore",
        clip_option="mean" if variant == "mean" else "adaptive_scaling",
        skip_update_on_spike=draw(st.booleans()),
    )
    cap = draw(st.one_of(st.none(), st.floats(0.5, 5.0)))  # times the first norm
    return spec, multipliers, kwargs, cap, draw(INITS)


def zclip_margins(norms: list, steps: list, kwargs: dict, max_norm: Any) -> list[float]:
    """Per step, the relative distance of the norm to the spike boundary and to the cap."""
    out, previous = [], None
    zt, eps = 2.5, 1e-6
    for t, (n, step) in enumerate(zip(norms, steps)):
        m = math.inf if max_norm is None else margin(n, max_norm)
        if t >= kwargs["warmup_steps"]:  # compared with the previous step's statistics
            std = math.sqrt(previous["var"])
            if kwargs["mode"] == "zscore":
                boundary = previous["mean"] + zt * (std + eps)
            else:
                boundary = previous["mean"] + zt * std
            m = min(m, margin(n, boundary))
        out.append(m)
        previous = step
    return out


def check_zclip(case):
    spec, multipliers, kwargs, cap, init = case
    with x64_context(spec.x64):
        trees = build_stream(spec, multipliers)
        norms = stream_norms(trees)
        max_norm = None if cap is None else float(cap * norms[0])
        reference = ref.zclip(norms, max_norm=max_norm, **kwargs)
        params = init_params(init, trees[0], spec.x64)
        dtype = stats_dtype(params, spec.x64)
        margins = zclip_margins(norms, reference, kwargs, max_norm)
        # a spike decision within rounding would change the rest of the stream
        assume(min(margins) > 1e-3)
        results = run(jaxclip.zclip(max_norm=max_norm, **kwargs), trees, params)
        expected = [
            Expected([], n, r["scale"], r["scale"] < 1, m)
            for n, r, m in zip(norms, reference, margins)
        ]
        check_global_stream(spec, trees, results, expected, params, TOL[dtype] * 10)
        for (_, state), r in zip(results, reference):
            assert bool(state.stats.extra["spike"]) == r["spike"]


@pytest.mark.parametrize("budget", BUDGETS)
def test_zclip(budget):
    run_property(budget, zclip_cases, check_zclip)


# -- quantile_clip -------------------------------------------------------------------------


@st.composite
def quantile_cases(draw, x64_modes):
    spec = draw(specs(x64_modes, exponents=(-2.0, 1.0)))
    multipliers = draw(factors(4))
    kwargs = dict(
        target_quantile=draw(st.floats(0.0, 1.0)),
        learning_rate=draw(st.floats(0.0, 0.5)),
        update=draw(st.sampled_from(["geometric", "arithmetic"])),
    )
    return spec, multipliers, kwargs, draw(st.floats(0.3, 3.0)), draw(INITS)


def check_quantile(case):
    spec, multipliers, kwargs, ratio, init = case
    with x64_context(spec.x64):
        trees = build_stream(spec, multipliers)
        norms = stream_norms(trees)
        initial = float(ratio * norms[0])
        reference = ref.quantile(
            norms,
            kwargs["target_quantile"],
            kwargs["learning_rate"],
            initial,
            kwargs["update"],
        )
        margins = [margin(n, r["threshold"]) for n, r in zip(norms, reference)]
        assume(min(margins) > 1e-3)  # the threshold's next value jumps with the decision
        params = init_params(init, trees[0], spec.x64)
        tx = jaxclip.quantile_clip(initial_threshold=initial, **kwargs)
        results = run(tx, trees, params)
        expected = [
            Expected([], n, r["scale"], r["scale"] < 1, m)
            for n, r, m in zip(norms, reference, margins)
        ]
        dtype = stats_dtype(params, spec.x64)
        check_global_stream(spec, trees, results, expected, params, TOL[dtype])
        for (_, state), r in zip(results, reference):
            assert float(state.stats.threshold) == pytest.approx(r["threshold"], rel=1e-5)


@pytest.mark.parametrize("budget", BUDGETS)
def test_quantile_clip(budget):
    run_property(budget, quantile_cases, check_quantile)


# -- adagc ---------------------------------------------------------------------------------


@st.composite
def adagc_cases(draw, x64_modes):
    warmup = draw(st.integers(1, 2))
    spec = draw(specs(x64_modes, exponents=(-2.0, 1.0)))
    multipliers = draw(factors(warmup + 3, spike_from=warmup))
    kwargs = dict(
        lambda_rel=draw(st.floats(1.0, 1.5)),
        beta=draw(st.floats(0.5, 0.99)),
        warmup_steps=warmup,
        scope=draw(st.sampled_from(["leaf", "global"])),
    )
    ratio = draw(st.floats(0.3, 3.0))
    init = draw(st.sampled_from(["same", "float32", "float64"]))  # AdaGC needs the shapes
    return spec, multipliers, kwargs, ratio, init


def check_adagc(case):
    spec, multipliers, kwargs, ratio, init = case
    with x64_context(spec.x64):
        trees = build_stream(spec, multipliers)
        norms = stream_norms(trees)
        kwargs = dict(kwargs)  # the drawn dict stays as hypothesis reports it
        scope = kwargs.pop("scope")
        kwargs["warmup_max_norm"] = float(ratio * norms[0])
        if scope == "leaf":
            units = [[np_norm([x]) for x in np_leaves(t)] for t in trees]
        else:
            units = [[n] for n in norms]
        reference = ref.adagc(units, eps=1e-6, **kwargs)
        params = init_params(init, trees[0], spec.x64)
        dtype = stats_dtype(params, spec.x64)
        results = run(jaxclip.adagc(scope=scope, **kwargs), trees, params)
        gamma = None
        for t, (tree, (out, state), r, u) in enumerate(zip(trees, results, reference, units)):
            xs = np_leaves(tree)
            scales = np.broadcast_to(r["scales"], (len(xs),))
            outs = [x * s for x, s in zip(xs, scales)]
            # "leaf": unit norms in each leaf's accumulation dtype (the warmup's global
            # norm combines them, and gamma keeps it); "global": the tree's; the rule in
            # the state's dtype
            tol = unit_tol(spec.dtypes) if scope == "leaf" else global_tol(spec.dtypes)
            check_outputs(out, tree, outs, max(tol, TOL[dtype]) * 10)
            if t < kwargs["warmup_steps"]:
                m = margin(norms[t] + 1e-6, kwargs["warmup_max_norm"])
            else:
                m = margin(u, kwargs["lambda_rel"] * gamma)
            gamma = r["gamma"]
            n = norms[t]
            expected = Expected([], n, np_norm(outs) / n, bool(np.any(scales < 1)), m)
            tol = unit_tol(spec.dtypes) if scope == "leaf" else global_tol(spec.dtypes)
            check_stats(state.stats, expected, dtype, tol * 10)
            assert np.dtype(state.gamma.dtype) == dtype


@pytest.mark.parametrize("budget", BUDGETS)
def test_adagc(budget):
    run_property(budget, adagc_cases, check_adagc)


# -- agc: gradients and weights of independent dtypes --------------------------------------


@st.composite
def agc_cases(draw, x64_modes):
    spec = draw(specs(x64_modes, shapes=AGC_SHAPES))
    x64 = spec.x64
    weight_dtypes = [draw(st.sampled_from((*LOW, F64) if x64 else LOW)) for _ in spec.leaves]
    clipping = draw(st.floats(0.01, 1.0))
    offset = draw(st.floats(-1.0, 1.0))  # gradients around 10^offset * clipping * weights
    init = draw(st.sampled_from(["none", "params"]))
    return spec, weight_dtypes, clipping, offset, init


def agc_expected(gs: list, ws: list, clipping: float, eps: float = 1e-3):
    """(outputs, unit gradient norms, unit limits) from _references.agc."""
    outs, norms, limits = [], [], []
    for g, w in zip(gs, ws):
        # one unit (None): every axis, as _references.agc would otherwise infer axes
        axis = ref.agc_unit_axes(g.shape) or tuple(range(g.ndim))
        outs.append(ref.agc(g, w, clipping, eps, axis=axis))
        norms.append(np.ravel(ref.unit_norms(g, axis)))
        limits.append(np.ravel(clipping * np.maximum(ref.unit_norms(w, axis), eps)))
    return outs, np.concatenate(norms), np.concatenate(limits)


def check_agc(case):
    spec, weight_dtypes, clipping, offset, init = case
    with x64_context(spec.x64):
        weights = spec.build(step=1, dtypes=weight_dtypes)
        grads = Spec(spec.x64, spec.leaves, spec.seed, spec.exponent + offset).build(
            factor=clipping
        )
        gs, ws = np_leaves(grads), np_leaves(weights)
        outs, norms, limits = agc_expected(gs, ws, clipping)
        params = None if init == "none" else weights
        tx = jaxclip.agc(clipping)
        with jax.disable_jit():
            out, stats = tx.update(grads, tx.init(params), weights)
        for o, g, w, e in zip(jax.tree.leaves(out), jax.tree.leaves(grads), weight_dtypes, outs):
            # the gradient's unit norms in its accumulation dtype, the weight's in its own
            check_outputs(o, g, [e], unit_tol([np.dtype(g.dtype), w]))
        n = np_norm(gs)
        clipped = bool(np.any(norms > limits))
        expected = Expected([], n, np_norm(outs) / n, clipped, margin(norms, limits))
        tol = unit_tol(spec.dtypes + weight_dtypes)
        check_stats(stats, expected, stats_dtype(params, spec.x64), tol)


@pytest.mark.parametrize("budget", BUDGETS)
def test_agc(budget):
    run_property(budget, agc_cases, check_agc)


# -- skip_on_spike -------------------------------------------------------------------------


@st.composite
def skip_cases(draw, x64_modes):
    spec = draw(specs(x64_modes, exponents=(-2.0, 1.0)))
    multipliers = draw(factors(6, spike_from=2))
    return spec, multipliers, draw(st.floats(0.3, 3.0)), draw(INITS)


def check_skip_on_spike(case):
    spec, multipliers, ratio, init = case
    with x64_context(spec.x64):
        trees = build_stream(spec, multipliers)
        norms = stream_norms(trees)
        max_norm = float(ratio * norms[0])
        skips = ref.skip_on_spike(norms, window=4, factor=3.0)
        # the distance of each norm to its window's boundary, once the window counts
        margins = []
        for i, n in enumerate(norms):
            recent = norms[max(0, i - 4) : i]
            if len(recent) >= 2:
                margins.append(margin(n, np.mean(recent) + 3.0 * np.std(recent, ddof=1)))
        assume(min(margins, default=math.inf) > 1e-3)
        params = init_params(init, trees[0], spec.x64)
        tx = jaxclip.skip_on_spike(jaxclip.clip_by_global_norm(max_norm), window=4, factor=3.0)
        results = run(tx, trees, params)
        dtype = stats_dtype(params, spec.x64)
        tol = max(global_tol(spec.dtypes), TOL[dtype])
        for tree, (out, state), n, skip in zip(trees, results, norms, skips):
            s = 0.0 if skip else min(1.0, max_norm / n)
            check_outputs(out, tree, [x * s for x in np_leaves(tree)], tol)
            expected = Expected([], n, 0.0 if skip else 1.0, skip, math.inf)
            check_stats(state.stats, expected, dtype, tol)


@pytest.mark.parametrize("budget", BUDGETS)
def test_skip_on_spike(budget):
    run_property(budget, skip_cases, check_skip_on_spike)


# -- per_example_clip ----------------------------------------------------------------------

BATCH = 3
EXAMPLE_SHAPES = [(BATCH,), (BATCH, 2, 3)]


@st.composite
def per_example_cases(draw, x64_modes):
    spec = draw(specs(x64_modes, shapes=EXAMPLE_SHAPES))
    reduce = draw(st.sampled_from(["mean", "sum"]))
    return spec, reduce, draw(st.floats(0.3, 3.0)), draw(INITS)


def check_per_example(case):
    spec, reduce, ratio, init = case
    with x64_context(spec.x64):
        tree = spec.build()
        xs = np_leaves(tree)
        norms = ref.per_example_clip(xs, 1.0)[1]
        example = jax.tree.map(lambda x: x[0], tree)
        params = init_params(init, example, spec.x64)
        # the state holds C in the statistics' dtype
        clip_norm = float(np.asarray(ratio * np.median(norms), stats_dtype(params, spec.x64)))
        sums, norms, scales = ref.per_example_clip(xs, clip_norm)
        divisor = BATCH if reduce == "mean" else 1
        tx = jaxclip.per_example_clip(clip_norm, reduce=reduce)
        ((out, state),) = run(tx, [tree], params)
        # each leaf's part of an example's norm in that leaf's accumulation dtype
        tol = unit_tol(spec.dtypes)
        assert jax.tree.structure(out) == jax.tree.structure(tree)
        for o, x, s in zip(jax.tree.leaves(out), xs, sums):
            dtype = np.dtype(o.dtype)
            assert o.shape == x.shape[1:]
            # a sum: relative to the sum of the terms' magnitudes
            magnitude = np.tensordot(scales, np.abs(x), axes=(0, 0)) / divisor
            np.testing.assert_allclose(
                np.asarray(o, np.float64),
                s / divisor,
                rtol=max(TOL[dtype], tol),
                atol=max(TOL[dtype], tol) * float(np.max(magnitude)) + TINY[dtype],
            )
        for o, x in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
            assert o.dtype == x.dtype
        clipped = bool(np.any(norms > clip_norm))
        expected = Expected([], float(np.mean(norms)), float(np.mean(scales)), clipped, 0.0)
        expected = expected._replace(margin=margin(norms, clip_norm))
        check_stats(state.stats, expected, stats_dtype(params, spec.x64), tol)


@pytest.mark.parametrize("budget", BUDGETS)
def test_per_example_clip(budget):
    run_property(budget, per_example_cases, check_per_example)


# -- AGC with mixed-precision weights: a regression ----------------------------------------

AGC_LAYOUTS = {
    "f64-f32-f64-f32": [(F64, (2, 3)), (F32, (5,)), (F64, (3, 1, 2)), (F32, (2, 1, 2, 3))],
    "f32-f64-f32-f64": [(F32, (2, 3)), (F64, (5,)), (F32, (3, 1, 2)), (F64, (2, 1, 2, 3))],
    "f32-f32-f64-f64": [(F32, (2, 3)), (F32, ()), (F64, (1, 4)), (F64, (3, 1, 2))],
}


@pytest.mark.parametrize(
    "layout, jit",
    [(name, True) for name in AGC_LAYOUTS] + [("f64-f32-f64-f32", False)],
    ids=[f"{name}-jit" for name in AGC_LAYOUTS] + ["f64-f32-f64-f32-op_by_op"],
)
def test_agc_float32_gradients_with_mixed_float64_float32_params_regression(layout, jit):
    """agc(0.1) with float32 gradients and parameters mixing float64 and float32 leaves
    (x64 on, four leaves) once failed with "Incompatible shapes for broadcasting"."""
    rng = np.random.default_rng(7)
    leaves = AGC_LAYOUTS[layout]
    with float64_enabled():
        params = {
            f"p{i}": jnp.asarray(rng.standard_normal(s), d) for i, (d, s) in enumerate(leaves)
        }
        # a mix of units above and below 0.1 * ||W_unit||
        grads = {
            k: jnp.asarray(rng.standard_normal(p.shape) * rng.choice([0.01, 0.5]), jnp.float32)
            for k, p in params.items()
        }
        tx = jaxclip.agc(0.1)
        if jit:
            out, stats = jax.jit(tx.update)(grads, tx.init(params), params)
        else:
            with jax.disable_jit():
                out, stats = tx.update(grads, tx.init(params), params)
        gs, ws = np_leaves(grads), np_leaves(params)
        outs, norms, limits = agc_expected(gs, ws, 0.1)
    for k, o, e in zip(grads, jax.tree.leaves(out), outs):
        assert o.dtype == jnp.float32 and o.shape == grads[k].shape
        np.testing.assert_allclose(np.asarray(o, np.float64), e, rtol=1e-5, atol=1e-30)
    assert np.dtype(stats.norm.dtype) == F64  # the parameters hold a float64 leaf
    assert float(stats.norm) == pytest.approx(np_norm(gs), rel=1e-6)
    assert float(stats.scale) == pytest.approx(np_norm(outs) / np_norm(gs), rel=1e-5)
    assert bool(stats.clipped) == bool(np.any(norms > limits))


# -- jitted, on fixed mixed trees ----------------------------------------------------------


def mixed_tree(x64: bool, seed: int = 0, factor: float = 1.0) -> dict:
    dtypes = [F16, BF16, F32, F64 if x64 else F32]
    shapes = [(2, 3), (5,), (3, 1, 2), (2, 1, 2, 3)]
    return Spec(x64, tuple(zip(dtypes, shapes)), seed, 0.0).build(factor=factor)


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
def test_clip_by_global_norm_jitted_keeps_dtypes(x64):
    with x64_context(x64):
        tree = mixed_tree(x64)
        xs = np_leaves(tree)
        n = np_norm(xs)
        tx = jaxclip.clip_by_global_norm(0.5 * n)
        out, stats = jax.jit(tx.update)(tree, tx.init(tree))
        check_outputs(out, tree, [x * 0.5 for x in xs], global_tol([F64] if x64 else [F32]))
        expected = Expected([], n, 0.5, True, 0.5)
        check_stats(stats, expected, F64 if x64 else F32, global_tol([F64] if x64 else [F32]))


@pytest.mark.parametrize("scope", ["leaf", "global"])
def test_adagc_jitted_with_float32_params_for_float64_gradients(scope):
    """init with float32 parameters, gradients float64 and lower: float32 statistics
    and gamma, outputs in each leaf's dtype."""
    with float64_enabled():
        trees = [mixed_tree(True, seed=i, factor=f) for i, f in enumerate([1.0, 1.1, 12.0])]
        params = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trees[0])
        kwargs = dict(lambda_rel=1.04, beta=0.9, warmup_steps=1, warmup_max_norm=100.0)
        tx = jaxclip.adagc(scope=scope, **kwargs)
        update = jax.jit(tx.update)
        state = tx.init(params)
        outs = []
        for tree in trees:
            out, state = update(tree, state)
            outs.append(out)
        if scope == "leaf":
            units = [[np_norm([x]) for x in np_leaves(t)] for t in trees]
        else:
            units = [[np_norm(np_leaves(t))] for t in trees]
        reference = ref.adagc(units, eps=1e-6, **kwargs)
    assert np.dtype(state.gamma.dtype) == F32 and np.dtype(state.stats.norm.dtype) == F32
    for tree, out, r in zip(trees, outs, reference):
        xs = np_leaves(tree)
        scales = np.broadcast_to(r["scales"], (len(xs),))
        check_outputs(out, tree, [x * s for x, s in zip(xs, scales)], 1e-5)
    assert bool(state.stats.clipped)
