"""One process of a multi-process training run, or the single-process reference.

    python multihost.py --process-id 0 --num-processes 2 --port 12345 --out p0.npz
    python multihost.py --num-processes 0 --out reference.npz   # one process, one device
    python multihost.py ... --reference-out reference.npz   # the reference after the run

Each process has 2 CPU devices; together they form a 2 x 2 (data x model) mesh.
The run trains a small sharded MLP for a few steps with each clipper and saves the
final parameters and clipping statistics, gathered to every process.
"""

from __future__ import annotations

import argparse
import os
import sys

if "jax" in sys.modules:
    raise RuntimeError("multihost.py must set XLA_FLAGS before jax is imported")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxclip

STEPS = 6
SPECS = {"w1": P(None, "model"), "w2": P("model", None), "b2": P()}


def data():
    rng = np.random.default_rng(0)
    params = {
        "w1": (rng.normal(size=(8, 16)) * 0.5).astype(np.float32),
        "w2": (rng.normal(size=(16, 4)) * 0.5).astype(np.float32),
        "b2": np.zeros(4, np.float32),
    }
    batches = []
    for t in range(STEPS):
        x = rng.normal(size=(32, 8)).astype(np.float32)
        y = (rng.normal(size=(32, 4)) * (25.0 if t % 3 == 2 else 1.0)).astype(np.float32)
        batches.append((x, y))
    return params, batches


def loss_fn(p, x, y):
    return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] + p["b2"] - y) ** 2)


CLIPPERS = {
    "clip_by_global_norm": lambda: jaxclip.clip_by_global_norm(1.0),
    "zclip": lambda: jaxclip.zclip(warmup_steps=2),
}


def train(name, put, gather):
    params, batches = data()
    tx = optax.chain(CLIPPERS[name](), optax.sgd(0.1, momentum=0.9))
    p = {k: put(v, SPECS[k]) for k, v in params.items()}
    state = tx.init(p)

    @jax.jit
    def step(p, state, x, y):
        g = jax.grad(loss_fn)(p, x, y)
        u, state = tx.update(g, state, p)
        return optax.apply_updates(p, u), state

    norms = []
    for x, y in batches:
        p, state = step(p, state, put(x, P("data", None)), put(y, P("data", None)))
        norms.append(gather(jaxclip.get_stats(state).norm))
    out = {f"{name}/{k}": gather(v) for k, v in p.items()}
    out[f"{name}/norms"] = np.array(norms)
    out[f"{name}/threshold"] = gather(jaxclip.get_stats(state).threshold)
    return out


def unsharded():
    """``put`` and ``gather`` for the reference: one device, no sharding."""

    def put(v, spec):
        return jnp.asarray(v)

    def gather(v):
        return np.asarray(v)

    return put, gather


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--reference-out",
        help="after the sharded run, also write the reference (one device, no sharding) here",
    )
    args = parser.parse_args()

    if args.num_processes == 0:  # the reference: one process, one device, no sharding
        put, gather = unsharded()
    else:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
        assert jax.process_count() == args.num_processes and jax.device_count() == 4
        from jax.experimental import multihost_utils

        # automatic sharding: XLA places the model's intermediate values
        auto = (jax.sharding.AxisType.Auto,) * 2
        mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=auto)

        def put(v, spec):
            sharding = NamedSharding(mesh, spec)
            return jax.make_array_from_callback(v.shape, sharding, lambda index: v[index])

        def gather(v):
            return np.asarray(multihost_utils.process_allgather(v, tiled=True))

    results = {}
    for name in CLIPPERS:
        results.update(train(name, put, gather))
    np.savez(args.out, **results)
    if args.reference_out:  # on this process's first device alone
        with jax.default_device(jax.local_devices()[0]):
            reference = {}
            for name in CLIPPERS:
                reference.update(train(name, *unsharded()))
        np.savez(args.reference_out, **reference)
    if args.num_processes:
        jax.distributed.shutdown()
    print("done", args.process_id)


if __name__ == "__main__":
    main()
