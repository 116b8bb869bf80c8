"""Checks that need several devices; run by tests/test_distributed.py in a subprocess.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice/checks.py NAME

Each check compares a sharded run with a single-device run of the same steps and
raises AssertionError on any difference beyond float32 rounding.
"""

from __future__ import annotations

import functools
import os
import re
import sys

if "jax" in sys.modules:
    raise RuntimeError("checks.py must set XLA_FLAGS before jax is imported")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxclip

try:
    shard_map = jax.shard_map
except AttributeError:  # jax < 0.8
    from jax.experimental.shard_map import shard_map

RTOL = 2e-6


def close(a, b, what, atol=1e-7):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=RTOL, atol=atol, err_msg=what
        )


def gradient_stream(steps, seed=0):
    """Gradients shaped like a small model, with spikes every few steps."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        scale = 30.0 if t % 5 == 4 else 1.0
        out.append(
            {
                "w": jnp.asarray(rng.normal(size=(16, 6)) * 0.3 * scale, jnp.float32),
                "v": jnp.asarray(rng.normal(size=(24,)) * 0.2, jnp.float32),
                "b": jnp.asarray(rng.normal(size=(5,)) * 0.1, jnp.float32),
            }
        )
    return out


# w: rows split over the devices; v: split; b: replicated (whole on every device)
SPECS = {"w": P("d", None), "v": P("d"), "b": P()}
IS_REPLICATED = lambda path, leaf: path == "b"  # noqa: E731


# with JAXCLIP_CHECK_CLIPPERS=some (the fast suite): a clipper of every kind, not every option
SOME = (
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_norm_columns",
    "clip_by_value_light_asymmetric",
    "autoclip",
    "zclip",
    "adagc",
    "agc",
    "skip_on_spike",
)


def clippers(axis_name, replicated):
    """Every norm-based clipper, with the given mapping (all stateful over steps), or those
    in SOME."""
    everything = _every_clipper(axis_name, replicated)
    if os.environ.get("JAXCLIP_CHECK_CLIPPERS", "all") == "some":
        return {name: everything[name] for name in SOME}
    return everything


def _every_clipper(axis_name, replicated):
    kw = {"axis_name": axis_name, "replicated": replicated}
    return {
        "clip_by_global_norm": jaxclip.clip_by_global_norm(1.0, **kw),
        "clip_by_global_norm_ord1": jaxclip.clip_by_global_norm(2.0, ord=1, **kw),
        "clip_by_global_norm_inf": jaxclip.clip_by_global_norm(0.5, ord=float("inf"), **kw),
        "clip_by_global_norm_ord3": jaxclip.clip_by_global_norm(1.0, ord=3, **kw),
        "clip_by_norm": jaxclip.clip_by_norm(0.8, **kw),
        "clip_by_norm_columns": jaxclip.clip_by_norm(0.3, axis=0, **kw),
        "clip_by_value": jaxclip.clip_by_value(0.25, **kw),
        "clip_by_value_light": jaxclip.clip_by_value(0.25, statistics="light", **kw),
        "clip_by_value_light_asymmetric": jaxclip.clip_by_value(
            0.25, min_value=-0.1, statistics="light", **kw
        ),
        "autoclip": jaxclip.autoclip(30.0, history=16, **kw),
        "zclip": jaxclip.zclip(warmup_steps=3, **kw),
        "quantile_clip": jaxclip.quantile_clip(**kw),
        "adagc": jaxclip.adagc(warmup_steps=3, **kw),
        "adagc_global": jaxclip.adagc(warmup_steps=3, scope="global", **kw),
        "agc": jaxclip.agc(0.05, **kw),
        "skip_on_spike": jaxclip.skip_on_spike(
            jaxclip.clip_by_global_norm(1.0, **kw), window=4, **kw
        ),
    }


def single_device_run(tx, stream, params):
    state = tx.init(params)
    update = jax.jit(tx.update)
    outs = []
    for g in stream:
        out, state = update(g, state, params)
        outs.append(out)
    return outs, state


def check_shard_map():
    """Gradient shards in shard_map, clipped with axis_name, equal a one-device run."""
    mesh = jax.make_mesh((8,), ("d",))
    stream = gradient_stream(8)
    params = jax.tree.map(lambda g: jnp.ones_like(g) * 0.5, stream[0])
    put = lambda tree: {  # noqa: E731
        k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in tree.items()
    }
    for name, tx in clippers("d", IS_REPLICATED).items():
        reference, ref_state = single_device_run(clippers(None, None)[name], stream, params)
        state = tx.init(params)  # the state only holds scalars and per-unit values

        @functools.partial(
            shard_map, mesh=mesh, in_specs=(SPECS, P(), SPECS), out_specs=(SPECS, P())
        )
        def step(g, state, p, tx=tx):
            return tx.update(g, state, p)

        step = jax.jit(step)
        for g, want in zip(stream, reference):
            out, state = step(put(g), state, put(params))
            close(out, want, f"shard_map {name}: updates")
        close(state, ref_state, f"shard_map {name}: state")
        print(f"shard_map {name}: ok")


def check_pmap():
    """Shards with a leading device axis under pmap, clipped with axis_name."""
    n = jax.local_device_count()
    stream = gradient_stream(6, seed=1)
    params = jax.tree.map(lambda g: jnp.ones_like(g) * 0.5, stream[0])

    def shard(tree):
        return {
            "w": tree["w"].reshape(n, -1, tree["w"].shape[1]),
            "v": tree["v"].reshape(n, -1),
            "b": jnp.broadcast_to(tree["b"], (n, *tree["b"].shape)),
        }

    def unshard(tree):
        return {
            "w": tree["w"].reshape(-1, tree["w"].shape[-1]),
            "v": tree["v"].reshape(-1),
            "b": tree["b"][0],
        }

    for name in ("clip_by_global_norm", "clip_by_norm", "zclip", "adagc", "agc"):
        tx = clippers("i", IS_REPLICATED)[name]
        reference, ref_state = single_device_run(clippers(None, None)[name], stream, params)
        state = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), tx.init(params))
        step = jax.pmap(tx.update, axis_name="i")
        for g, want in zip(stream, reference):
            out, state = step(shard(g), state, shard(params))
            close(unshard(out), want, f"pmap {name}: updates")
        for i in range(n):  # every replica holds the same state
            close(jax.tree.map(lambda x, i=i: x[i], state), ref_state, f"pmap {name}: state {i}")
        print(f"pmap {name}: ok")


def check_jit_2d_mesh():
    """Under jit with NamedSharding on a data x model mesh: same results, and no collective
    larger than one value per unit (the gradient itself never moves)."""
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    specs = {"w": P("data", "model"), "v": P("model"), "b": P()}
    stream = gradient_stream(6, seed=2)
    params = jax.tree.map(lambda g: jnp.ones_like(g) * 0.5, stream[0])
    put = lambda tree: {  # noqa: E731
        k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()
    }
    for name, tx in clippers(None, None).items():
        reference, ref_state = single_device_run(tx, stream, params)
        state = tx.init(params)
        update = jax.jit(tx.update)
        hlo = update.lower(put(stream[0]), state, put(params)).compile().as_text()
        collective = r" (all-reduce|all-gather|all-to-all|collective-permute)(-start)?\("
        for line in hlo.splitlines():
            # all-reduces of partial sums; unit norms gathered or moved for the statistics
            # and the scales (a compiler may move the few values of a sharded vector)
            if re.search(collective, line):
                shapes = re.split(collective, line.split("=")[1])[0]
                # a norm's partial sums: scalars, or one value per unit (w has 6 columns)
                sizes = [
                    int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                    for dims in re.findall(r"\[([0-9,]*)\]", shapes)
                ]
                assert sizes and max(sizes) <= 6, (name, line)
        for g, want in zip(stream, reference):
            out, state = update(put(g), state, put(params))
            close(out, want, f"jit {name}: updates")
        close(state, ref_state, f"jit {name}: state")
        print(f"jit 2-D mesh {name}: ok")


def check_training():
    """A sharded MLP (parameters split over 'd', as in FSDP) trained with adaptive clipping."""
    mesh = jax.make_mesh((8,), ("d",))
    rng = np.random.default_rng(3)
    params = {
        "w1": jnp.asarray(rng.normal(size=(16, 32)) * 0.5, jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(32, 8)) * 0.5, jnp.float32),
        "b2": jnp.zeros(8, jnp.float32),
    }
    specs = {"w1": P("d", None), "w2": P("d", None), "b2": P()}
    batches = [
        (
            jnp.asarray(rng.normal(size=(512, 16)), jnp.float32),
            jnp.asarray(rng.normal(size=(512, 8)) * (20.0 if t % 4 == 3 else 1.0), jnp.float32),
        )
        for t in range(10)
    ]

    def loss_fn(p, x, y, count=512):
        h = jnp.tanh(x @ p["w1"])
        return jnp.sum((h @ p["w2"] + p["b2"] - y) ** 2) / count

    names = ("clip_by_global_norm", "zclip", "adagc", "autoclip", *WRAPPERS)
    if os.environ.get("JAXCLIP_CHECK_CLIPPERS", "all") == "some":
        names = ("clip_by_global_norm", "zclip", *WRAPPERS)  # the rest: shard_map check
    for name in names:
        make = functools.partial(_training_optimizer, name)
        # one device: the same step, compiled once (op by op, each step's branches
        # would compile again)
        tx = make(False)

        @jax.jit
        def step1(p, s, x, y, tx=tx):
            g = jax.grad(loss_fn)(p, x, y)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        p1, s1 = params, tx.init(params)
        for x, y in batches:
            p1, s1 = step1(p1, s1, x, y)

        # eight devices, as in FSDP: the batch and the weight matrices are split over
        # 'd'; the forward pass gathers the weights, so autodiff scatters their
        # gradients, and the clipper sees gradient shards
        tx = make(True)
        state_specs = _like_params(tx.init(params), params, specs)

        @functools.partial(
            shard_map,
            mesh=mesh,
            in_specs=(specs, state_specs, P("d"), P("d")),
            out_specs=(specs, state_specs),
        )
        def step(p, s, x, y, tx=tx):
            def local_loss(p):
                full = {
                    k: jax.lax.all_gather(v, "d", tiled=True) if k != "b2" else v
                    for k, v in p.items()
                }
                return loss_fn(full, x, y)

            g = jax.grad(local_loss)(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        step = jax.jit(step)
        p8 = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
        s8 = jax.tree.map(
            lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)),
            tx.init(params),
            state_specs,
        )
        split = NamedSharding(mesh, P("d"))
        for x, y in batches:
            p8, s8 = step(p8, s8, jax.device_put(x, split), jax.device_put(y, split))
        # Adam divides by the root of tiny second moments, which magnifies rounding
        # differences in the smallest gradient entries: compare to 1e-6
        close(p8, p1, f"training {name}: parameters", atol=1e-6)
        stats8, stats1 = jaxclip.get_stats(s8), jaxclip.get_stats(s1)
        if "max_ratio" in stats1.extra:
            # g**2 / v with v of a moment just reset: the rounding of g, squared and divided
            # by the tiny v, moves it by about 1e-4
            np.testing.assert_allclose(stats8.extra["max_ratio"], stats1.extra["max_ratio"], 1e-3)
            assert float(stats1.extra["max_ratio"]) > 3.0  # SPAM clipped
            del stats8.extra["max_ratio"], stats1.extra["max_ratio"]
        close(stats8, stats1, f"training {name}: statistics", atol=1e-6)
        assert int(stats1.clipped_steps) > 0, name
        print(f"training {name}: ok")


# the wrappers of the Adam itself, made to clip, reset and warm up within the ten steps
WRAPPERS = {
    "spike_aware": lambda **kw: jaxclip.spike_aware(
        optax.adam(0.05), theta=3.0, reset_interval=4, warmup_steps=2, no_clip_steps=1, **kw
    ),
    "stable_update": lambda **kw: jaxclip.stable_update(optax.adam(0.05), threshold=0.8, **kw),
}


def _training_optimizer(name, mapped):
    kw = {"axis_name": "d", "replicated": lambda path, leaf: path == "b2"} if mapped else {}
    if name in WRAPPERS:
        return WRAPPERS[name](**kw)
    clipper = clippers("d", kw["replicated"])[name] if mapped else clippers(None, None)[name]
    return optax.chain(clipper, optax.adam(0.05))


def _like_params(state, params, specs):
    """Specs for an optimizer state: a parameter's spec for leaves of its shape, else P()."""
    by_shape = {params[k].shape: specs[k] for k in params if params[k].ndim > 1}
    return jax.tree.map(lambda x: by_shape.get(x.shape, P()), state)


def check_ghost():
    """ghost_clipped_sum on a batch split over the devices: under jit with the batch
    sharded, and in shard_map with each device's record merged (ClippedSum.across)."""
    mesh = jax.make_mesh((8,), ("d",))
    rng = np.random.default_rng(4)
    params = {
        "w1": jnp.asarray(rng.normal(size=(6, 16)) * 0.5, jnp.float32),
        "b1": jnp.zeros(16, jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(16, 3)) * 0.5, jnp.float32),
    }
    scale = np.where(np.arange(64) % 5 == 0, 30.0, 1.0)[:, None]  # some examples clip
    batch = {
        "x": jnp.asarray(rng.normal(size=(64, 6)) * scale, jnp.float32),
        "y": jnp.asarray(rng.normal(size=(64, 3)), jnp.float32),
    }

    CLIP = 5.0

    def loss(p, ex):
        h = jnp.tanh(ex["x"] @ p["w1"] + p["b1"])
        return jnp.sum((h @ p["w2"] - ex["y"]) ** 2)

    reference = jax.jit(lambda p, b: jaxclip.clipped_gradient_sum(jax.grad(loss), p, b, CLIP))(
        params, batch
    )
    assert 0 < int(reference.clipped) < 64, int(reference.clipped)
    split = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("d"))), batch)
    sharded = jax.jit(lambda p, b: jaxclip.ghost_clipped_sum(loss, p, b, CLIP))(params, split)

    # the eight devices' partial sums add up in another order: equal within 1e-5 of each
    # leaf's largest magnitude
    def near(a, b, what):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * np.abs(y).max(), err_msg=what)

    near(sharded, reference, "ghost jit: record")
    norms = jax.jit(lambda p, b: jaxclip.per_example_norms(loss, p, b))(params, split)
    want = jax.vmap(lambda ex: jaxclip.global_norm(jax.grad(loss)(params, ex)))(batch)
    near(norms, want, "ghost jit: per-example norms")
    print("ghost jit, batch sharded: ok")

    @functools.partial(shard_map, mesh=mesh, in_specs=(P(), P("d")), out_specs=P())
    def per_device(p, b):
        return jaxclip.ghost_clipped_sum(loss, p, b, CLIP).across("d")

    merged = jax.jit(per_device)(params, split)
    near(merged, reference, "ghost shard_map: record")
    assert int(merged.num_examples) == 64
    print("ghost shard_map, ClippedSum.across: ok")


CHECKS = {
    "shard_map": check_shard_map,
    "pmap": check_pmap,
    "jit_2d_mesh": check_jit_2d_mesh,
    "training": check_training,
    "ghost": check_ghost,
}

if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    for name in sys.argv[1:] or CHECKS:
        CHECKS[name]()
