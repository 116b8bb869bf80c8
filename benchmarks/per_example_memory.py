"""Peak memory of a DP-SGD step on a 1M-parameter MLP at batch 1024, with and without microbatches.

    python benchmarks/per_example_memory.py [--microbatch 32]

Each variant runs in a fresh process and reports its peak resident memory
(``ru_maxrss``, which includes JAX's own runtime). Without microbatches the
1024 per-example gradients alone take 1024 x 1M x 4 bytes = 4 GB.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import jax, jax.numpy as jnp, numpy as np, optax
import jaxclip

microbatch = int(sys.argv[1])
rng = np.random.default_rng(0)
def dense(n_in, n_out):
    return jnp.asarray(rng.normal(size=(n_in, n_out)) * 0.03, jnp.float32)

params = {"w1": dense(784, 1024), "b1": jnp.zeros(1024), "w2": dense(1024, 200),
          "b2": jnp.zeros(200)}
batch = {"x": jnp.asarray(rng.normal(size=(1024, 784)), jnp.float32),
         "y": jnp.asarray(rng.integers(0, 200, 1024))}

def loss(p, ex):
    logits = jnp.tanh(ex["x"] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, ex["y"])

tx = optax.chain(jaxclip.per_example_clip(1.0, noise_multiplier=1.0), optax.sgd(0.1))
state = tx.init(params)

@jax.jit
def step(params, state):
    if microbatch:
        grads = jaxclip.clipped_gradient_sum(
            jax.grad(loss), params, batch, 1.0, microbatch_size=microbatch)
    else:
        grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

jax.block_until_ready(step(params, state))
start = time.perf_counter()
params, state = jax.block_until_ready(step(params, state))
seconds = time.perf_counter() - start
n_params = sum(x.size for x in jax.tree.leaves(params))
print(json.dumps({"microbatch": microbatch, "params": int(n_params),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "step_seconds": seconds}))
"""


def run(microbatch: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(microbatch)], capture_output=True, text=True
    )
    if proc.returncode:
        return {"microbatch": microbatch, "error": proc.stderr.strip().splitlines()[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--microbatch", type=int, default=32)
    parser.add_argument("--full", action="store_true", help="also run without microbatches")
    parser.add_argument("--out", default="benchmarks/results/per_example_memory.json")
    args = parser.parse_args()
    rows = [run(args.microbatch)] + ([run(0)] if args.full else [])
    for row in rows:
        print(row)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
