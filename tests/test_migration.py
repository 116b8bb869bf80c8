"""The migration guide's translations, against NumPy versions of the other libraries' rules.

Every ```python block of docs/migration.md that follows ``<!-- equivalence: NAME -->`` is
run (the page's blocks in order, in one namespace, as a reader would) and checked by the
function registered under NAME below; a block without a check, or a check without a block,
fails ``test_every_translation_is_checked``. The checks also rebuild each block's
transform with other hyperparameters, by running the block's own statements with the
hyperparameter variables replaced, so the expression in the guide is what is tested.

The references are written here from each library's documented rule, in float64; they do
not import PyTorch, Keras, Lightning or Transformers. The PyTorch reference is itself
checked against tests/data/torch_clip_grad_norm.npz, outputs recorded from
torch.nn.utils.clip_grad_norm_ (tests/test_torch_parity.py compares jaxclip with the same
recording). Where the other library is Optax, its transforms are compared as well.
"""

import ast
import functools
import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxclip

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "migration.md"
BLOCK = re.compile(r"(?:<!-- equivalence: ([\w-]+) -->\n)?```python\n(.*?)```", re.S)

RTOL = 1e-5  # float32 results against float64 references
SCALES = (1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 1e2, 1e3)


# -- the guide ----------------------------------------------------------------------------


@functools.cache
def _guide() -> dict[str, tuple[str, dict]]:
    """NAME -> (the block's code, the namespace after running the page up to that block)."""
    namespace: dict = {}
    out = {}
    for index, match in enumerate(BLOCK.finditer(GUIDE.read_text())):
        name, code = match.group(1), match.group(2)
        exec(compile(code, f"docs/migration.md, block {index + 1}", "exec"), namespace)
        if name:
            assert name not in out, f"two blocks named {name}"
            out[name] = (code, dict(namespace))
    return out


def block(name: str) -> dict:
    """The namespace right after the guide's block ``name`` ran."""
    return dict(_guide()[name][1])


def rebuild(name: str, target: str = "clip", **hyper):
    """``target`` as the guide's block ``name`` computes it, with other hyperparameters.

    Runs the block's statements again with the variables in ``hyper`` set to the given
    values (arrays, possibly traced); the statements assigning those variables, and bare
    expressions such as ``print(...)``, are left out.
    """
    code, namespace = _guide()[name]
    namespace = dict(namespace)
    namespace.update(hyper)
    kept = []
    for statement in ast.parse(code).body:
        assigned = {
            node.id
            for node in ast.walk(statement)
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)
        }
        if not (assigned & set(hyper)) and not isinstance(statement, ast.Expr):
            kept.append(statement)
    exec(compile(ast.Module(body=kept, type_ignores=[]), f"rebuilt {name}", "exec"), namespace)
    return namespace[target]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _rebuilt_step(name, static, hyper, grads, params):
    """The update and the ``clipped`` flag of the block's transform, its hyperparameters
    traced: one compilation serves every value (``static`` holds the Python values)."""
    clip = rebuild(name, **dict(static), **hyper)
    state = clip.init(params if params is not None else grads)
    updates, state = clip.update(grads, state, params)
    return updates, jaxclip.get_stats(state).clipped


def _rebuilt_update(name, static, hyper, grads, params):
    return _rebuilt_step(name, static, hyper, grads, params)[0]


def assert_block_matches(name, rule, values, trees, static=(), params=None):
    """For each dict of hyperparameter values, the block's transform equals ``rule``.

    ``rule(tree, **hyperparameters)`` returns the expected float64 leaves, whether the
    rule changed the gradient (compared with ``ClipStats.clipped``) and, optionally, an
    absolute tolerance per leaf (for sums, whose rounding error scales with the summed
    magnitudes); for every value some trees are clipped and some are not.
    """
    trees = list(trees)
    for hyper in values:
        traced = {k: jnp.asarray(v, jnp.float32) for k, v in hyper.items()}
        seen = set()
        for tree in trees:
            args = (tree,) if params is None else (tree, params)
            expected, changed, *atol = rule(*args, **hyper, **dict(static))
            out, clipped = _rebuilt_step(name, tuple(static), traced, tree, params)
            assert bool(clipped) == changed, (hyper, "clipped")
            for k, want in expected.items():
                np.testing.assert_allclose(
                    np.asarray(out[k], np.float64),
                    want,
                    rtol=RTOL,
                    atol=atol[0][k] if atol else 0,
                    err_msg=(hyper, k),
                )
            seen.add(changed)
        assert seen == {True, False}, f"{hyper}: need clipped and unclipped cases"


CHECKS = {}


def check(name: str):
    """Registers the check of the guide's block ``name``."""

    def register(fn):
        CHECKS[name] = fn
        return fn

    return register


def test_every_translation_is_checked():
    assert set(_guide()) == set(CHECKS), (
        f"blocks without a check: {sorted(set(_guide()) - set(CHECKS))}; "
        f"checks without a block: {sorted(set(CHECKS) - set(_guide()))}"
    )


# -- gradients and references -------------------------------------------------------------

SHAPES = [(), (3,), (4, 5), (2, 3, 2), (7,), (3, 8)]


def random_trees(seed, shapes=None, batch=None, count=3):
    """Pytrees of float32 gradients whose norms span about 1e-3 to 1e4.

    One random structure per seed (so a jitted update compiles once), values drawn anew.
    """
    rng = np.random.default_rng(seed)
    chosen = shapes or [SHAPES[i] for i in rng.choice(len(SHAPES), 4, replace=False)]
    lead = () if batch is None else (batch,)
    for scale in SCALES:
        for _ in range(count):
            yield {
                f"leaf{i}": (rng.standard_normal(lead + s) * scale * rng.uniform(0.5, 2)).astype(
                    np.float32
                )
                for i, s in enumerate(chosen)
            }


def at_norm(seed, norm, shapes=((3,), (4, 5))):
    """A float32 tree whose global L2 norm is ``norm``, to float32 rounding."""
    rng = np.random.default_rng(seed)
    tree = {f"leaf{i}": rng.standard_normal(s) for i, s in enumerate(shapes)}
    n = math.sqrt(sum(np.sum(v**2) for v in tree.values()))
    return {k: (v * norm / n).astype(np.float32) for k, v in tree.items()}


def assert_torch_epsilon(name, hyper_name, value):
    """PyTorch's + 1e-6 clips a norm just below max_norm; a norm a little lower is kept.

    A norm 3e-7 below max_norm is clipped only with the epsilon (the NumPy rule clips it
    too); one 3e-6 below is kept either way.
    """
    assert 0.1 <= value <= 1.0, "the margins assume a threshold near 1"
    for norm, expect in ((value - 3e-7, True), (value - 3e-6, False)):
        tree = at_norm(0, norm)
        _, changed, _ = torch_clip_grad_norm(tree, value)
        assert changed == expect
        out, clipped = _rebuilt_step(name, (), {hyper_name: jnp.float32(value)}, tree, None)
        assert bool(clipped) == expect, (name, norm)
        if expect:
            for k in tree:
                assert np.all(np.abs(out[k]) <= np.abs(tree[k]))
                assert np.any(np.abs(out[k]) < np.abs(tree[k]))


def pnorm(x, p) -> float:
    a = np.abs(np.ravel(np.asarray(x, np.float64)))
    if a.size == 0:
        return 0.0
    if p == math.inf:
        return float(a.max())
    return float(np.sum(a**p) ** (1.0 / p))


def f64(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def torch_clip_grad_norm(tree, max_norm, norm_type=2.0):
    """torch.nn.utils.clip_grad_norm_: the norm of the per-tensor norms, then every
    gradient times min(1, max_norm / (total + 1e-6)). Returns (leaves, changed, total)."""
    total = pnorm([pnorm(g, norm_type) for g in tree.values()], norm_type)
    coef = min(max_norm / (total + 1e-6), 1.0)
    return {k: g * coef for k, g in f64(tree).items()}, coef < 1.0, total


def torch_rule(tree, max_norm, norm_type=2.0):
    return torch_clip_grad_norm(tree, max_norm, norm_type)[:2]


def clamp(tree, bound):
    """clip_grad_value_, Keras clipvalue, optax.clip: every element into [-bound, bound]."""
    leaves = f64(tree)
    out = {k: np.clip(g, -bound, bound) for k, g in leaves.items()}
    return out, any(np.any(np.abs(g) > bound) for g in leaves.values())


def keras_clipnorm(tree, clipnorm):
    """Keras clipnorm: each variable g becomes g * clipnorm / max(||g||, clipnorm)."""
    leaves = f64(tree)
    out = {k: g * clipnorm / max(pnorm(g, 2), clipnorm) for k, g in leaves.items()}
    return out, any(pnorm(g, 2) > clipnorm for g in leaves.values())


def keras_global_clipnorm(tree, global_clipnorm):
    """Keras global_clipnorm: scale = clipnorm * min(1 / n, 1 / clipnorm), no epsilon."""
    n = pnorm([pnorm(g, 2) for g in tree.values()], 2)
    scale = global_clipnorm * min(1.0 / n if n else math.inf, 1.0 / global_clipnorm)
    return {k: g * scale for k, g in f64(tree).items()}, scale < 1.0


def optax_global_norm_rule(tree, max_norm):
    """optax.clip_by_global_norm: unchanged when ||g|| < max_norm, else g / ||g|| * max_norm."""
    n = pnorm([pnorm(g, 2) for g in tree.values()], 2)
    if n < max_norm:
        return f64(tree), False
    return {k: g / n * max_norm for k, g in f64(tree).items()}, True


def block_rms(tree, threshold):
    """optax.clip_by_block_rms: each leaf divided by max(1, rms / threshold)."""
    leaves = f64(tree)
    rms = {k: math.sqrt(np.mean(g**2)) for k, g in leaves.items()}
    out = {k: g / max(1.0, rms[k] / threshold) for k, g in leaves.items()}
    return out, any(r > threshold for r in rms.values())


def unit_axes(ndim):
    """The units of adaptive gradient clipping in JAX layouts (Brock et al. 2021)."""
    if ndim <= 1:
        return None
    if ndim == 2:
        return (0,)
    if ndim in (3, 4):
        return (0, 1, 2)
    return tuple(range(ndim - 1))


def agc_rule(grads, params, clipping, eps):
    """Each unit's gradient scaled to at most clipping * max(||W_unit||, eps)."""
    out, changed = {}, False
    for k, g in f64(grads).items():
        w = np.asarray(params[k], np.float64)
        axes = unit_axes(g.ndim)
        g_norm = np.sqrt(np.sum(g**2, axis=axes, keepdims=axes is not None))
        w_norm = np.sqrt(np.sum(w**2, axis=axes, keepdims=axes is not None))
        limit = clipping * np.maximum(w_norm, eps)
        over = g_norm > limit
        out[k] = np.where(over, g * limit / np.where(over, g_norm, 1.0), g)
        changed |= bool(np.any(over))
    return out, changed


def per_example_rule(tree, clip_norm):
    """DP-SGD: each example's global L2 norm clipped to clip_norm, then the sum.

    Returns the sums, the number of examples clipped, and per leaf an absolute tolerance
    for a float32 sum: a few float32 ulps of the largest sum of magnitudes.
    """
    leaves = f64(tree)
    batch = next(iter(leaves.values())).shape[0]
    norms = np.sqrt(sum(np.sum(g.reshape(batch, -1) ** 2, axis=1) for g in leaves.values()))
    factor = np.minimum(1.0, clip_norm / np.where(norms > 0, norms, 1.0))
    total = {k: np.tensordot(factor, g, axes=(0, 0)) for k, g in leaves.items()}
    atol = {
        k: 1e-6 * float(np.max(np.tensordot(factor, np.abs(g), axes=(0, 0))))
        for k, g in leaves.items()
    }
    return total, int(np.sum(norms > clip_norm)), atol


def test_torch_reference_reproduces_recorded_pytorch():
    """The NumPy reading of clip_grad_norm_ gives PyTorch's recorded outputs and norms."""
    data = np.load(ROOT / "tests" / "data" / "torch_clip_grad_norm.npz")
    cases = json.loads(str(data["meta"]))["cases"]
    for i, case in enumerate(cases):
        grads = {f"leaf{j}": data[f"{i}_in_{j}"] for j in range(case["leaves"])}
        out, _, total = torch_clip_grad_norm(grads, case["max_norm"], case["norm_type"])
        assert total == pytest.approx(case["total_norm"], rel=1e-6)
        for j in range(case["leaves"]):
            np.testing.assert_allclose(out[f"leaf{j}"], data[f"{i}_out_{j}"], rtol=2e-6, atol=0)
    assert {c["norm_type"] for c in cases} == {1.0, 2.0, 3.0, math.inf}


# -- PyTorch ------------------------------------------------------------------------------


@check("torch-clip-grad-norm")
def _():
    ns = block("torch-clip-grad-norm")
    assert isinstance(ns["tx"], optax.GradientTransformation)
    for norm_type in (ns["norm_type"], 1.0, 3.0, math.inf):
        assert_block_matches(
            "torch-clip-grad-norm",
            torch_rule,
            [{"max_norm": ns["max_norm"]}, {"max_norm": 0.05}, {"max_norm": 20.0}],
            random_trees(0),
            static=(("norm_type", norm_type),),
        )
    assert_torch_epsilon("torch-clip-grad-norm", "max_norm", ns["max_norm"])


@check("torch-clip-grad-value")
def _():
    ns = block("torch-clip-grad-value")
    values = [{"clip_value": v} for v in (ns["clip_value"], 0.01, 5.0)]
    assert_block_matches(
        "torch-clip-grad-value", lambda t, clip_value: clamp(t, clip_value), values, random_trees(1)
    )


# -- Keras --------------------------------------------------------------------------------


@check("keras-clipnorm")
def _():
    ns = block("keras-clipnorm")
    assert isinstance(ns["tx"], optax.GradientTransformation)
    values = [{"clipnorm": v} for v in (ns["clipnorm"], 0.1, 30.0)]
    assert_block_matches("keras-clipnorm", keras_clipnorm, values, random_trees(2))
    # each variable on its own: the one over the threshold is clipped, the other left alone
    grads = {"big": np.array([30.0, 40.0], np.float32), "small": np.array([0.3, 0.4], np.float32)}
    out = _rebuilt_update("keras-clipnorm", (), {"clipnorm": jnp.float32(1.0)}, grads, None)
    np.testing.assert_allclose(out["big"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(out["small"], grads["small"])


@check("keras-global-clipnorm")
def _():
    ns = block("keras-global-clipnorm")
    values = [{"global_clipnorm": v} for v in (ns["global_clipnorm"], 0.1, 30.0)]
    assert_block_matches("keras-global-clipnorm", keras_global_clipnorm, values, random_trees(3))
    # the non-finite behaviour the guide describes
    hyper = {"global_clipnorm": jnp.float32(ns["global_clipnorm"])}
    with_inf = {"g": np.array([1.0, np.inf], np.float32)}
    out = _rebuilt_update("keras-global-clipnorm", (), hyper, with_inf, None)
    assert out["g"][0] == 0.0 and np.isnan(out["g"][1])
    with_nan = {"g": np.array([1.0, np.nan], np.float32)}
    out = _rebuilt_update("keras-global-clipnorm", (), hyper, with_nan, None)
    assert np.all(np.isnan(out["g"]))


@check("keras-clipvalue")
def _():
    ns = block("keras-clipvalue")
    values = [{"clipvalue": v} for v in (ns["clipvalue"], 0.02, 3.0)]
    assert_block_matches(
        "keras-clipvalue", lambda t, clipvalue: clamp(t, clipvalue), values, random_trees(4)
    )


# -- PyTorch Lightning --------------------------------------------------------------------


@check("lightning-norm")
def _():
    ns = block("lightning-norm")
    values = [{"gradient_clip_val": v} for v in (ns["gradient_clip_val"], 0.05, 8.0)]
    assert_block_matches(
        "lightning-norm",
        lambda t, gradient_clip_val: torch_rule(t, gradient_clip_val),  # norm_type: 2
        values,
        random_trees(5),
    )
    assert_torch_epsilon("lightning-norm", "gradient_clip_val", ns["gradient_clip_val"])


@check("lightning-value")
def _():
    ns = block("lightning-value")
    values = [{"gradient_clip_val": v} for v in (ns["gradient_clip_val"], 0.01, 4.0)]
    assert_block_matches(
        "lightning-value",
        lambda t, gradient_clip_val: clamp(t, gradient_clip_val),
        values,
        random_trees(6),
    )


# -- Hugging Face -------------------------------------------------------------------------


@check("hf-trainer")
def _():
    ns = block("hf-trainer")
    values = [{"max_grad_norm": v} for v in (ns["max_grad_norm"], 0.1, 10.0)]
    assert_block_matches(
        "hf-trainer", lambda t, max_grad_norm: torch_rule(t, max_grad_norm), values, random_trees(7)
    )
    assert_torch_epsilon("hf-trainer", "max_grad_norm", ns["max_grad_norm"])

    # grad_norm: the pre-clip norm of the accumulated (averaged) gradient, once per
    # optimizer step, read through optax.MultiSteps
    tx, k = ns["tx"], ns["gradient_accumulation_steps"]
    rng = np.random.default_rng(8)
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for optimizer_step in range(1, 4):
        micro = [
            {n: (rng.standard_normal(p.shape) * 3).astype(np.float32) for n, p in params.items()}
            for _ in range(k)
        ]
        for i, g in enumerate(micro):
            _, state = update(g, state, params)
            stats = jaxclip.get_stats(state)
            assert int(stats.step) == optimizer_step - (i < k - 1)
        mean = {n: np.mean([np.float64(g[n]) for g in micro], axis=0) for n in params}
        _, clipped, want = torch_clip_grad_norm(mean, ns["max_grad_norm"])
        assert clipped
        assert float(stats.norm) == pytest.approx(want, rel=1e-5)
        assert jaxclip.stats_dict(state)["clip/norm"] == pytest.approx(want, rel=1e-5)


# -- Optax --------------------------------------------------------------------------------


def assert_same_as_optax(name, hyper_name, values, make_theirs, trees, rtol=2e-6):
    """The block's transform against the Optax transform it replaces."""
    for value in values:
        theirs = make_theirs(value)
        hyper = {hyper_name: jnp.float32(value)}
        for tree in trees:
            ours = _rebuilt_update(name, (), hyper, tree, None)
            g = jax.tree.map(jnp.asarray, tree)
            expected, _ = theirs.update(g, theirs.init(g))
            for k in tree:
                np.testing.assert_allclose(ours[k], expected[k], rtol=rtol, atol=0)


@check("optax-clip-by-global-norm")
def _():
    ns = block("optax-clip-by-global-norm")
    assert isinstance(ns["tx"], optax.GradientTransformation)
    values = (ns["max_norm"], 0.1, 30.0)
    assert_block_matches(
        "optax-clip-by-global-norm",
        optax_global_norm_rule,
        [{"max_norm": v} for v in values],
        random_trees(9),
    )
    assert_same_as_optax(
        "optax-clip-by-global-norm",
        "max_norm",
        values,
        optax.clip_by_global_norm,
        random_trees(9, count=1),
    )


@check("optax-float16")
def _():
    ns = block("optax-float16")
    assert float(ns["theirs"]["a"][0]) == 0.0 and float(ns["theirs"]["b"][0]) == 0.0
    assert ns["ours"]["a"].dtype == jnp.float16
    np.testing.assert_allclose(np.float64(ns["ours"]["a"]), [0.6], rtol=1e-3)
    np.testing.assert_allclose(np.float64(ns["ours"]["b"]), [0.8], rtol=1e-3)
    assert float(ns["stats"].norm) == 500.0


@check("optax-clip")
def _():
    ns = block("optax-clip")
    values = (ns["max_delta"], 0.03, 7.0)
    assert_block_matches(
        "optax-clip",
        lambda t, max_delta: clamp(t, max_delta),
        [{"max_delta": v} for v in values],
        random_trees(11),
    )
    assert_same_as_optax("optax-clip", "max_delta", values, optax.clip, random_trees(11, count=1))


@check("optax-clip-by-block-rms")
def _():
    ns = block("optax-clip-by-block-rms")
    shapes = [(4, 8)] * 3  # the block's leaves: all of 4 x 8 elements
    assert ns["leaf_size"] == 4 * 8
    values = (ns["threshold"], 0.02, 5.0)
    assert_block_matches(
        "optax-clip-by-block-rms",
        block_rms,
        [{"threshold": v} for v in values],
        random_trees(13, shapes=shapes),
    )
    assert_same_as_optax(
        "optax-clip-by-block-rms",
        "threshold",
        values,
        optax.clip_by_block_rms,
        random_trees(13, shapes=shapes, count=1),
    )


@check("optax-adaptive-grad-clip")
def _():
    ns = block("optax-adaptive-grad-clip")
    rng = np.random.default_rng(15)
    params = {
        "bias": rng.standard_normal(5).astype(np.float32),
        "kernel": rng.standard_normal((6, 5)).astype(np.float32),
        "conv": rng.standard_normal((3, 3, 2, 4)).astype(np.float32),
        "zeros": np.zeros((4, 3), np.float32),  # zero weights: the limit is clipping * eps
    }
    trees = [
        {k: (rng.standard_normal(p.shape) * scale).astype(np.float32) for k, p in params.items()}
        for scale in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)
        for _ in range(2)
    ]
    values = [
        {"clipping": ns["clipping"], "eps": ns["eps"]},
        {"clipping": 0.1, "eps": 1e-3},
        {"clipping": 0.5, "eps": 1e-2},
    ]
    assert_block_matches("optax-adaptive-grad-clip", agc_rule, values, trees, params=params)
    p = jax.tree.map(jnp.asarray, params)
    for hyper in values:
        theirs = optax.adaptive_grad_clip(hyper["clipping"], hyper["eps"])
        traced = {k: jnp.float32(v) for k, v in hyper.items()}
        for tree in trees[::3]:
            ours = _rebuilt_update("optax-adaptive-grad-clip", (), traced, tree, params)
            g = jax.tree.map(jnp.asarray, tree)
            expected, _ = theirs.update(g, theirs.init(p), p)
            for k in tree:
                np.testing.assert_allclose(ours[k], expected[k], rtol=2e-6, atol=0)


@check("optax-per-example-global-norm-clip")
def _():
    ns = block("optax-per-example-global-norm-clip")
    expected, clipped, _ = per_example_rule({"0": ns["per_example_grads"][0]}, ns["l2_norm_clip"])
    np.testing.assert_allclose(ns["total"][0], expected["0"], rtol=RTOL)
    assert int(ns["num_clipped"]) == clipped == 1

    @jax.jit
    def rebuilt(per_example_grads, l2_norm_clip):
        out = rebuild(
            "optax-per-example-global-norm-clip",
            target="out",
            per_example_grads=per_example_grads,
            l2_norm_clip=l2_norm_clip,
        )
        return out.total, out.clipped

    counts = set()
    for clip_norm in (ns["l2_norm_clip"], 0.05, 40.0):
        for tree in random_trees(16, batch=6, count=1):
            total, n_clipped = rebuilt(tree, jnp.float32(clip_norm))
            want, want_clipped, atol = per_example_rule(tree, clip_norm)
            for k in tree:
                np.testing.assert_allclose(np.float64(total[k]), want[k], rtol=RTOL, atol=atol[k])
            assert int(n_clipped) == want_clipped
            counts.add(want_clipped)
            # Optax's own function takes a list of arrays
            theirs, num = optax.per_example_global_norm_clip(list(tree.values()), clip_norm)
            for k, t in zip(tree, theirs):
                np.testing.assert_allclose(total[k], t, rtol=RTOL, atol=atol[k])
            assert int(num) == want_clipped
    assert 0 in counts and 6 in counts, "cases with no example and with every example clipped"


@check("optax-dp-aggregate")
def _():
    ns = block("optax-dp-aggregate")
    c, z = ns["l2_norm_clip"], ns["noise_multiplier"]

    # without noise: the mean of the clipped per-example gradients
    batch = 5
    values = [{"l2_norm_clip": v} for v in (c, 0.05, 40.0)]
    trees = list(random_trees(17, batch=batch, count=2))
    params = {k: np.zeros(v.shape[1:], np.float32) for k, v in trees[0].items()}

    def mean_of_clipped(tree, params, l2_norm_clip, noise_multiplier):
        total, n_clipped, atol = per_example_rule(tree, l2_norm_clip)
        mean = {k: v / batch for k, v in total.items()}
        return mean, n_clipped > 0, {k: v / batch for k, v in atol.items()}

    assert_block_matches(
        "optax-dp-aggregate",
        mean_of_clipped,
        values,
        trees,
        static=(("noise_multiplier", 0.0),),
        params=params,
    )

    # the block's own transform: Gaussian noise of std l2_norm_clip * noise_multiplier on
    # the sum, then the division by the batch size; fresh noise at every step
    clip, batch, size = ns["clip"], 4, 20_000
    grads = {"w": jnp.zeros((batch, size))}
    state = clip.init({"w": jnp.zeros(size)})
    update = jax.jit(clip.update)
    first, state = update(grads, state)
    second, state = update(grads, state)
    for out in (first, second):
        w = np.float64(out["w"])
        assert np.std(w) == pytest.approx(c * z / batch, rel=0.03)
        assert abs(np.mean(w)) < 4 * c * z / batch / math.sqrt(size)
    assert abs(np.corrcoef(first["w"], second["w"])[0, 1]) < 0.05
    assert float(jaxclip.get_stats(state).extra["noise_std"]) == pytest.approx(c * z, rel=1e-6)


# registered above; parametrized here, once every check exists
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_translation(name):
    CHECKS[name]()
