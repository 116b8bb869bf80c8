"""Shared pieces of the benchmarks: model-like trees, interleaved timing, the machine."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def transformer_tree(d_model: int, layers: int, vocab: int, dtype=jnp.float32, seed: int = 0):
    """Leaves shaped like a transformer's: embeddings, attention, MLP, norms, biases."""
    rng = np.random.default_rng(seed)

    def leaf(*shape):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.02, dtype)

    tree = {"embed": leaf(vocab, d_model), "final_norm": leaf(d_model)}
    for i in range(layers):
        tree[f"layer{i:03d}"] = {
            "attn": {k: leaf(d_model, d_model) for k in ("q", "k", "v", "o")},
            "mlp": {"up": leaf(d_model, 4 * d_model), "down": leaf(4 * d_model, d_model)},
            "mlp_bias": leaf(4 * d_model),
            "norm1": leaf(d_model),
            "norm2": leaf(d_model),
        }
    return tree


def leaf_specs(n_leaves: int, dtype: str) -> dict[str, jax.ShapeDtypeStruct]:
    """``n_leaves`` shapes as a transformer has them (d_model 128): an embedding,
    then per layer four attention matrices, two MLP matrices, a bias, two norms."""
    d = 128
    layer = [(d, d)] * 4 + [(d, 4 * d), (4 * d, d), (4 * d,), (d,), (d,)]
    shapes = [(1000, d), (d,)]
    while len(shapes) < n_leaves:
        shapes += layer
    return {f"leaf{i:04d}": jax.ShapeDtypeStruct(s, dtype) for i, s in enumerate(shapes[:n_leaves])}


def training_run(tx: Any, params: Any, grads: Any) -> Callable[[], Any]:
    """One jitted training step with ``tx`` (``tx`` an optax transformation), as a
    zero-argument function: each call applies ``grads`` to its own copy of
    ``params``, which it donates with the optimizer state, as a training loop does,
    and returns the new parameters."""

    def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    jitted = jax.jit(step, donate_argnums=(0, 1))
    box = {"params": jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))(params)}
    box["state"] = jax.jit(tx.init)(box["params"])

    def run() -> Any:
        box["params"], box["state"] = jitted(box["params"], box["state"], grads)
        return box["params"]

    return run


def tree_megabytes(tree: Any) -> float:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 1e6


def interleaved(
    fns: dict[str, Callable[[], Any]], rounds: int = 20, warmup: int = 2, keep_samples: bool = False
) -> dict[str, dict[str, Any]]:
    """Times each zero-argument function once per round, round after round; medians in ms.

    Interleaving spreads slow drifts of the machine (frequency, other load)
    over every contender instead of penalising whichever ran last, and a fresh
    order each round keeps one contender from always running right after
    another: a call that frees a lot of memory slows down the next one. With
    ``keep_samples`` each entry also holds every time measured (``samples_ms``).
    """
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    shuffle = np.random.default_rng(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            fn = fns[name]
            start = time.perf_counter()
            jax.block_until_ready(fn())
            samples[name].append((time.perf_counter() - start) * 1e3)
    out: dict[str, dict[str, Any]] = {}
    for name, times in samples.items():
        out[name] = {
            "median_ms": statistics.median(times),
            "min_ms": min(times),
            "iqr_ms": float(np.subtract(*np.percentile(times, [75, 25]))),
        }
        if keep_samples:
            out[name]["samples_ms"] = times
    return out


# Peak memory bandwidth in GB/s from the vendors' data sheets, by the start of JAX's
# device_kind; --peak-gbps gives it for any other device.
PEAK_GBPS = {
    "NVIDIA H200": 4800,
    "NVIDIA H100 80GB HBM3": 3350,  # SXM
    "NVIDIA H100 PCIe": 2000,
    "NVIDIA A100-SXM4-80GB": 2039,
    "NVIDIA A100-SXM4-40GB": 1555,
    "NVIDIA A100 80GB PCIe": 1935,
    "NVIDIA A100-PCIE-40GB": 1555,
    "NVIDIA L4": 300,
    "NVIDIA A10G": 600,
    "Tesla V100-SXM2": 900,
    "Tesla T4": 320,
}


def on_accelerator() -> bool:
    return jax.devices()[0].platform != "cpu"


def peak_gbps(device_kind: str, given: float | None) -> float | None:
    """The device's peak memory bandwidth: ``given``, else from PEAK_GBPS, else None."""
    if given is not None:
        return given
    for kind, gbps in PEAK_GBPS.items():
        if device_kind.startswith(kind):
            return float(gbps)
    return None


def cores() -> int:
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str]:
    device = jax.devices()[0]
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "cpu_count": str(os.cpu_count()),
    }


def write(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
