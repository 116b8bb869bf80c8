"""Ghost clipping against per-example gradients from jax.vmap(jax.grad(...))."""

import warnings

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import float64_enabled
from flax import nnx

import jaxclip
from jaxclip import ghost_clipped_sum, per_example_norms
from jaxclip.ghost import _ghost_sum, _plan

# --- the reference: vmap(grad), clip, sum, in float64 NumPy --------------------------


def per_example_grads(loss_fn, params, batch, has_aux=False):
    grads = jax.jit(jax.vmap(jax.grad(loss_fn, has_aux=has_aux), (None, 0)))(params, batch)
    return [np.asarray(g, np.float64) for g in jax.tree.leaves(grads[0] if has_aux else grads)]


def reference(grads, clip_norm, weights=None):
    """The clipped sum of per-example gradients ``grads`` (leaves with a batch axis)."""
    size = grads[0].shape[0]
    norms = np.sqrt(sum(np.sum(g.reshape(size, -1) ** 2, axis=1) for g in grads))
    w = np.ones(size) if weights is None else np.asarray(weights, np.float64)
    keep = w != 0
    scales = np.where(norms > clip_norm, clip_norm / np.where(norms > 0, norms, 1), 1.0)
    coef = np.where(keep, w * scales, 0.0)
    mask = lambda g: np.where(keep.reshape(-1, *[1] * (g.ndim - 1)), g, 0)  # noqa: E731
    return {
        "norms": norms,
        "total": [np.tensordot(coef, mask(g), 1) for g in grads],
        "num_examples": int(keep.sum()),
        "clipped": int(np.sum(keep & (norms > clip_norm))),
        "norm_sum": float(norms[keep].sum()),
        "scale_sum": float(scales[keep].sum()),
        "max_norm": float(norms[keep].max()) if keep.any() else 0.0,
    }


def assert_matches(out, ref, clip_norm, rtol=1e-5):
    # relative to the largest element: a leaf whose gradient is zero in exact
    # arithmetic (a key bias, under softmax) holds rounding noise only
    scale = max(np.abs(w).max() for w in ref["total"])
    for got, want in zip(jax.tree.leaves(out.total), ref["total"]):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=rtol * scale)
    assert int(out.num_examples) == ref["num_examples"]
    assert int(out.clipped) == ref["clipped"]
    np.testing.assert_allclose(float(out.norm_sum), ref["norm_sum"], rtol=rtol)
    np.testing.assert_allclose(float(out.scale_sum), ref["scale_sum"], rtol=rtol)
    np.testing.assert_allclose(float(out.max_norm), ref["max_norm"], rtol=rtol)
    np.testing.assert_allclose(float(out.clip_norm), clip_norm, rtol=1e-7)
    assert bool(out.finite)


def check_model(loss_fn, params, batch, *, rtol=1e-5, modes=("auto",), **kwargs):
    """Norms and the clipped sum, with a clip norm between the norms."""
    grads = per_example_grads(loss_fn, params, batch)
    want = reference(grads, np.inf)["norms"]
    middle = np.sort(want)[len(want) // 2 - 1 : len(want) // 2 + 1]
    c = float(np.mean(middle))  # half the examples are clipped, none is at the bound
    for mode in modes:
        ghost = jax.jit(
            lambda p, b, mode=mode: _ghost_sum(
                loss_fn, p, b, c, mode=mode, with_norms=True, **kwargs
            )
        )
        out, norms = ghost(params, batch)
        np.testing.assert_allclose(np.asarray(norms, np.float64), want, rtol=rtol)
        assert_matches(out, reference(grads, c, kwargs.get("weights")), c, rtol)
    return out


def key(i):
    return jax.random.PRNGKey(i)


# --- models --------------------------------------------------------------------------


def mlp():
    ks = jax.random.split(key(0), 3)
    params = {
        "w1": jax.random.normal(ks[0], (5, 16)) / 2,
        "b1": jnp.full(16, 0.1),
        "w2": jax.random.normal(ks[1], (16, 3)) / 4,
        "b2": jnp.ones(3),
    }

    def loss(p, ex):
        h = jax.nn.relu(ex["x"] @ p["w1"] + p["b1"])
        return -jax.nn.log_softmax(h @ p["w2"] + p["b2"])[ex["y"]]

    batch = {"x": jax.random.normal(ks[2], (6, 5)), "y": jnp.arange(6) % 3}
    return loss, params, batch


VOCAB, LEN, DIM, HEADS = 11, 6, 8, 2


def layer_norm(x, scale, bias):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-5) * scale + bias


def transformer():
    ks = jax.random.split(key(1), 8)
    n = lambda k, s, f=0.3: jax.random.normal(k, s) * f  # noqa: E731
    params = {
        "tok": n(ks[0], (VOCAB, DIM)),
        "pos": n(ks[1], (LEN, DIM)),
        "ln1": {"scale": 1 + n(ks[2], (DIM,), 0.1), "bias": jnp.zeros(DIM)},
        "qkv": n(ks[3], (DIM, 3, HEADS, DIM // HEADS)),
        "out": n(ks[4], (HEADS, DIM // HEADS, DIM)),
        "mlp": {"w": n(ks[5], (DIM, 16)), "b": jnp.zeros(16), "v": n(ks[6], (16, DIM))},
        "ln2": {"scale": jnp.ones(DIM), "bias": jnp.full(DIM, 0.01)},
    }

    def loss(p, ex):
        ids = ex["ids"]
        h = p["tok"][ids] + p["pos"][jnp.arange(LEN)]
        x = layer_norm(h, **p["ln1"])
        q, k, v = jnp.einsum("td,dchk->cthk", x, p["qkv"])
        logits = jnp.einsum("thk,shk->hts", q, k) / np.sqrt(DIM // HEADS)
        mask = jnp.tril(jnp.ones((LEN, LEN), bool))
        att = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
        h = h + jnp.einsum("hts,shk,hkd->td", att, v, p["out"])
        x = layer_norm(h, **p["ln2"])
        h = h + jax.nn.gelu(x @ p["mlp"]["w"] + p["mlp"]["b"]) @ p["mlp"]["v"]
        out = h @ p["tok"].T  # tied output embedding
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out[:-1]), ids[1:, None], 1))

    batch = {"ids": jax.random.randint(ks[7], (5, LEN), 0, VOCAB)}
    return loss, params, batch


def rnn():
    ks = jax.random.split(key(2), 4)
    params = {
        "wx": jax.random.normal(ks[0], (3, 8)) * 0.5,
        "wh": jax.random.normal(ks[1], (8, 8)) * 0.3,
        "wo": jax.random.normal(ks[2], (8,)) * 0.5,
    }

    def loss(p, ex):
        def step(h, x):
            h = jnp.tanh(x @ p["wx"] + h @ p["wh"])
            return h, h @ p["wo"]

        _, ys = jax.lax.scan(step, jnp.zeros(8), ex["x"])
        return jnp.mean((ys - ex["y"]) ** 2)

    batch = {"x": jax.random.normal(ks[3], (4, 5, 3)), "y": jnp.linspace(-1, 1, 20).reshape(4, 5)}
    return loss, params, batch


def cnn():
    ks = jax.random.split(key(3), 4)
    params = {
        "conv": jax.random.normal(ks[0], (4, 1, 3, 3)) * 0.5,
        "cb": jnp.full((4, 1, 1), 0.1),
        "dense": jax.random.normal(ks[1], (4 * 6 * 6, 2)) * 0.1,
    }

    def loss(p, ex):
        x = ex["img"][None, None]
        y = jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "VALID")[0] + p["cb"]
        out = jax.nn.relu(y).reshape(-1) @ p["dense"]
        return -jax.nn.log_softmax(out)[ex["label"]]

    batch = {"img": jax.random.normal(ks[2], (4, 8, 8)), "label": jnp.array([0, 1, 1, 0])}
    return loss, params, batch


# --- exactness ------------------------------------------------------------------------


def test_mlp_matches_vmap_grad():
    loss, params, batch = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the MLP takes no fallback
        out = check_model(loss, params, batch)
    c = float(out.clip_norm)
    want = jax.jit(lambda p, b: jaxclip.clipped_gradient_sum(jax.grad(loss), p, b, c))(
        params, batch
    )
    for field in ("num_examples", "clipped", "norm_sum", "scale_sum", "max_norm", "clip_norm"):
        np.testing.assert_allclose(getattr(out, field), getattr(want, field), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out.total), jax.tree.leaves(want.total)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert bool(out.finite) == bool(want.finite)


def test_transformer_matches_vmap_grad():
    loss, params, batch = transformer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_model(loss, params, batch, modes=("gram",))


def test_transformer_paths():
    loss, params, batch = transformer()
    plan = _plan(loss, params, batch, mode="gram")
    # the token embedding: a lookup and the tied output layer, cross terms included
    assert sorted(plan["['tok']"]) == [("dot_general", "gram"), ("gather", "index")]
    assert plan["['pos']"] == [("gather", "index")]
    assert plan["['qkv']"] == [("dot_general", "gram")]
    assert plan["['ln1']['scale']"] == [("mul", "elementwise")]
    assert not any(kind == "fallback" for uses in plan.values() for _, kind in uses)


def test_rnn_scan_takes_the_gram_path_step_by_step():
    """An RNN's weights, read by the body of a scan, are used once per step: each use
    takes the Gram form and one Gram over all the steps holds their cross terms."""
    loss, params, batch = rnn()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        check_model(loss, params, batch, modes=("auto", "gram"))
    plan = _plan(loss, params, batch)
    assert plan["['wh']"] == [("dot_general", "gram")] * 5  # five steps
    assert plan["['wx']"] == [("dot_general", "gram")] * 5


def test_reversed_scan_with_several_outputs():
    _, params, batch = rnn()

    def reversed_loss(p, ex):
        def step(h, x):
            h = jnp.tanh(x @ p["wx"] + h @ p["wh"])
            return h, (h, h @ p["wo"])

        h, (hs, ys) = jax.lax.scan(step, jnp.zeros(8), ex["x"], reverse=True)
        return jnp.sum(h**2) + jnp.sum(hs[::2] ** 3) + jnp.mean((ys - ex["y"]) ** 2)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_model(reversed_loss, params, batch)


def test_scans_that_cannot_be_unrolled_fall_back_exactly():
    """A scan longer than the unrolling limit, and one carrying a parameter."""
    loss, params, batch = rnn()
    long_batch = {"x": jnp.tile(batch["x"], (1, 60, 1)), "y": jnp.tile(batch["y"], (1, 60))}
    with pytest.warns(UserWarning, match=r"\['wh'\]"):
        check_model(loss, params, long_batch)  # 300 steps
    assert _plan(loss, params, long_batch)["['wh']"] == [("scan", "fallback")]

    def carried(p, ex):
        def step(carry, x):
            w, h = carry
            return (w * 0.9, jnp.tanh(x @ w + h)), h

        _, hs = jax.lax.scan(step, (p["wx"], jnp.zeros(8)), ex["x"])
        return jnp.sum(hs**2)

    with pytest.warns(UserWarning, match=r"\['wx'\]"):
        check_model(carried, {"wx": params["wx"]}, batch)


def test_cnn_convolution_falls_back_exactly():
    loss, params, batch = cnn()
    with pytest.warns(UserWarning, match=r"\['conv'\]"):
        check_model(loss, params, batch)
    plan = _plan(loss, params, batch)
    assert plan["['conv']"] == [("conv_general_dilated", "fallback")]
    assert plan["['dense']"] == [("dot_general", "gram")]


def test_custom_derivatives_and_reshaped_weights_fall_back_exactly():
    @jax.custom_vjp
    def scaled(w, x):
        return w * x

    scaled.defvjp(lambda w, x: (w * x, (w, x)), lambda res, g: (g * res[1], g * res[0]))

    params = {
        "a": jax.random.normal(key(15), (4,)),
        "m": jax.random.normal(key(16), (2, 6)) * 0.5,
        "s": jnp.linspace(-1.0, 1.0, 3),
    }

    def loss(p, ex):
        h = scaled(p["a"], ex["x"])  # custom_vjp on a parameter
        h = h @ p["m"].reshape(4, 3)  # a reshaped weight: not a plain dot use
        return jnp.sum(jax.nn.softplus(h * jax.nn.relu(p["s"])) ** 2)  # custom_jvp (relu)

    batch = {"x": jax.random.normal(key(17), (6, 4))}
    with pytest.warns(UserWarning, match=r"\['a'\], \['m'\], \['s'\]"):
        check_model(loss, params, batch)


def shared_weight_model():
    """One matrix as x @ W and as h @ W.T, and in an elementwise penalty; another
    with a batch (block) axis in an einsum."""
    params = {
        "w": jax.random.normal(key(4), (6, 4)) * 0.5,
        "u": jax.random.normal(key(5), (3, 2, 4)) * 0.5,
    }

    def loss(p, ex):
        h = jnp.tanh(ex["x"] @ p["w"])  # (T, 4)
        back = h @ p["w"].T  # (T, 6)
        heads = jnp.einsum("gtk,gjk->gtj", jnp.broadcast_to(h, (3, *h.shape)), p["u"])
        return jnp.sum(back * ex["x"]) + jnp.sum(heads**2) + 0.1 * jnp.sum(p["w"] * p["w"])

    return loss, params, {"x": jax.random.normal(key(6), (5, 3, 6))}


def test_shared_weight_in_both_layouts():
    """Every cross term between the uses of one leaf counts."""
    loss, params, batch = shared_weight_model()
    plan = _plan(loss, params, batch, mode="gram")
    assert sorted(plan["['w']"]) == [
        ("dot_general", "gram"),
        ("dot_general", "gram"),
        ("mul", "elementwise"),
        ("mul", "elementwise"),
    ]
    assert plan["['u']"] == [("dot_general", "gram")]
    check_model(loss, params, batch, modes=("gram", "outer"))


def test_flax_linen():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, ids):
            embed = nn.Embed(VOCAB, DIM)
            h = nn.LayerNorm()(embed(ids))
            h = h + nn.MultiHeadDotProductAttention(num_heads=2)(h)
            h = nn.Dense(DIM)(nn.gelu(nn.Dense(12)(h)))
            return embed.attend(h)

    model = Model()
    ids = jax.random.randint(key(7), (4, LEN), 0, VOCAB)
    params = model.init(key(8), ids[0])

    def loss(p, ex):
        logits = model.apply(p, ex["ids"])
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(LEN), ex["ids"]])

    batch = {"ids": ids}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_model(loss, params, batch)  # small layers: mostly formed explicitly


def test_flax_nnx():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(5, 12, rngs=rngs)
            self.norm = nnx.LayerNorm(12, rngs=rngs)
            self.l2 = nnx.Linear(12, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.relu(self.norm(self.l1(x))))

    graphdef, params = nnx.split(Model(nnx.Rngs(0)), nnx.Param)

    def loss(p, ex):
        out = nnx.merge(graphdef, p)(ex["x"])
        return jnp.sum((out - ex["y"]) ** 2)

    batch = {"x": jax.random.normal(key(9), (6, 4, 5)), "y": jnp.ones((6, 4, 3))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_model(loss, params, batch)


def test_equinox():
    model = eqx.nn.Sequential(
        [
            eqx.nn.Linear(5, 10, key=key(10)),
            eqx.nn.Lambda(jax.nn.tanh),
            eqx.nn.LayerNorm(10),
            eqx.nn.Linear(10, 2, key=key(11)),
        ]
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(p, ex):
        out = jax.vmap(eqx.combine(p, static))(ex["x"])  # a sequence of 3 positions
        return jnp.mean((out - ex["y"]) ** 2)

    batch = {"x": jax.random.normal(key(12), (5, 3, 5)), "y": jnp.zeros((5, 3, 2))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_model(loss, params, batch, modes=("gram",))


def test_under_jit_with_microbatches_and_aux():
    loss, params, batch = mlp()
    aux_loss = lambda p, ex: (loss(p, ex), {"x": ex["x"]})  # noqa: E731
    c = 0.8
    fn = jax.jit(lambda p, b: ghost_clipped_sum(aux_loss, p, b, c, has_aux=True, microbatch_size=2))
    out = fn(params, batch)
    want = reference(per_example_grads(loss, params, batch), c)
    assert_matches(out, want, c)
    norms = jax.jit(lambda p, b: per_example_norms(aux_loss, p, b, has_aux=True))(params, batch)
    np.testing.assert_allclose(norms, want["norms"], rtol=1e-5)


def test_padding_weights():
    loss, params, batch = mlp()
    # the padding examples hold NaN: they must neither count nor contribute
    padded = {"x": batch["x"].at[jnp.array([1, 4])].set(jnp.nan), "y": batch["y"]}
    weights = jnp.array([1.0, 0.0, 0.5, 1.0, 0.0, 2.0])
    keep = np.asarray(weights) != 0
    c = 0.8
    fn = jax.jit(lambda p, b, w: ghost_clipped_sum(loss, p, b, c, weights=w, microbatch_size=3))
    out = fn(params, padded, weights)
    assert_matches(out, reference(per_example_grads(loss, params, batch), c, weights), c)
    assert int(out.num_examples) == 4
    padded_grads = per_example_grads(loss, params, padded)
    assert np.isnan(reference(padded_grads, c)["norms"][~keep]).all()


def test_float64():
    with float64_enabled():
        loss, params, batch = shared_weight_model()
        params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
        batch = jax.tree.map(lambda x: x.astype(jnp.float64), batch)
        out = check_model(loss, params, batch, rtol=1e-10, modes=("gram",))
        assert jax.tree.leaves(out.total)[0].dtype == jnp.float64
        assert out.norm_sum.dtype == jnp.float64


def test_nonfinite_zero_matches_clip_and_sum():
    loss, params, batch = mlp()
    # example 2's gradient is partly NaN (its log-probability of label 0 is -inf)
    params = dict(params, b2=params["b2"].at[0].set(-jnp.inf))
    grads = jax.jit(jax.vmap(jax.grad(loss), (None, 0)))(params, batch)
    want = jax.jit(lambda g: jaxclip.clip_and_sum(g, 1.0, nonfinite="zero"))(grads)
    out = jax.jit(lambda p, b: ghost_clipped_sum(loss, p, b, 1.0, nonfinite="zero"))(params, batch)
    for a, b in zip(jax.tree.leaves(out.total), jax.tree.leaves(want.total)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.norm_sum, want.norm_sum, rtol=1e-5)
    assert int(out.clipped) == int(want.clipped)


def test_feeds_per_example_clip():
    loss, params, batch = mlp()
    tx = jaxclip.per_example_clip(0.5)
    state = tx.init(params)

    @jax.jit
    def both(p, b):
        grads = jax.vmap(jax.grad(loss), (None, 0))(p, b)
        return tx.update(grads, state)[0], tx.update(ghost_clipped_sum(loss, p, b, 0.5), state)[0]

    want, got = both(params, batch)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bad_inputs():
    loss, params, batch = mlp()
    with pytest.raises(ValueError, match="scalar loss"):
        per_example_norms(lambda p, ex: ex["x"] @ p["w1"], params, batch)
    with pytest.raises(ValueError, match="has_aux=True"):
        per_example_norms(lambda p, ex: (loss(p, ex), 0.0), params, batch)
    with pytest.raises(ValueError, match="pair"):
        per_example_norms(loss, params, batch, has_aux=True)
    with pytest.raises(ValueError, match="same leading batch axis"):
        ghost_clipped_sum(loss, params, {"x": batch["x"], "y": batch["y"][:4]}, 1.0)
    with pytest.raises(TypeError, match=r"\['b1'\] has dtype int32"):
        ghost_clipped_sum(loss, dict(params, b1=jnp.zeros(16, jnp.int32)), batch, 1.0)
    with pytest.raises(ValueError, match="microbatch_size"):
        ghost_clipped_sum(loss, params, batch, 1.0, microbatch_size=4)
    with pytest.raises(ValueError, match="weights"):
        ghost_clipped_sum(loss, params, batch, 1.0, weights=jnp.ones(5))
    with pytest.raises(ValueError, match="clip_norm"):
        ghost_clipped_sum(loss, params, batch, -1.0)
    with pytest.raises(ValueError, match="nonfinite"):
        ghost_clipped_sum(loss, params, batch, 1.0, nonfinite="skip")
