"""Checkpoint and resume every clipper with Orbax, across processes.

Imported by ``tests/test_integrations.py``, which trains each clipper for a few
steps, saves parameters and optimizer state with Orbax, and also trains the
same setup without interruption. Run as a script, this module is the other
half: in a fresh process it restores the checkpoint, trains the remaining
steps and writes the final leaves to ``.npz`` files for the test to compare::

    python tests/integrations/checkpoint_resume.py CKPT OUT_DIR START STOP [--only=a,b] [--wait]

The model, data and optimizers are defined here once, so that both processes
run the same program; the data of step ``t`` depends only on ``t``. Every
clipper's run is stepped by one jitted function, so each process compiles once.
"""

from __future__ import annotations

import functools
import os
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import jaxclip

IN, HIDDEN, OUT, BATCH = 3, 5, 2, 8
SPIKE_STEPS = (4, 9)  # steps whose targets are scaled up, so that clippers act
LEARNING_RATE = 1e-2


def _adam() -> optax.GradientTransformation:
    return optax.adam(LEARNING_RATE)


# name -> (optimizer factory, whether its update takes per-example gradients)
OPTIMIZERS: dict[str, tuple[Callable[[], optax.GradientTransformation], bool]] = {
    "clip_by_global_norm": (
        lambda: optax.chain(jaxclip.clip_by_global_norm(1.0), _adam()),
        False,
    ),
    "clip_by_norm": (lambda: optax.chain(jaxclip.clip_by_norm(0.5, axis=0), _adam()), False),
    "clip_by_value": (lambda: optax.chain(jaxclip.clip_by_value(0.2), _adam()), False),
    "autoclip": (
        lambda: optax.chain(jaxclip.autoclip(percentile=25.0, history=4), _adam()),
        False,
    ),
    "zclip": (lambda: optax.chain(jaxclip.zclip(alpha=0.8, warmup_steps=3), _adam()), False),
    "quantile_clip": (
        lambda: optax.chain(jaxclip.quantile_clip(0.5, initial_threshold=0.5), _adam()),
        False,
    ),
    "adagc": (lambda: optax.chain(jaxclip.adagc(warmup_steps=2, beta=0.9), _adam()), False),
    "agc": (lambda: optax.chain(jaxclip.agc(0.05), _adam()), False),
    "skip_on_spike": (
        lambda: jaxclip.skip_on_spike(
            optax.chain(jaxclip.clip_by_global_norm(1.0), _adam()), window=4, factor=2.0
        ),
        False,
    ),
    "per_example_clip": (
        lambda: optax.chain(
            jaxclip.per_example_clip(
                0.5, noise_multiplier=0.7, target_quantile=0.5, count_noise_std=1.0, seed=5
            ),
            _adam(),
        ),
        True,
    ),
    # the wrappers of the Adam itself: a reset at step 4 and 8, the warmup across the save
    "spike_aware": (
        lambda: jaxclip.spike_aware(
            optax.adamw(LEARNING_RATE),
            theta=4.0,
            reset_interval=4,
            warmup_steps=3,
            no_clip_steps=2,
        ),
        False,
    ),
    "stable_update": (lambda: jaxclip.stable_update(optax.adamw(LEARNING_RATE)), False),
}


def init_params() -> dict[str, Any]:
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {
        "hidden": {
            "kernel": jax.random.normal(k1, (IN, HIDDEN)) / np.sqrt(IN),
            "bias": jnp.zeros(HIDDEN),
        },
        "out": {
            "kernel": jax.random.normal(k2, (HIDDEN, OUT)) / np.sqrt(HIDDEN),
            "bias": jnp.zeros(OUT),
        },
    }


def batch(t: int) -> tuple[np.ndarray, np.ndarray]:
    """The inputs and targets of step ``t``."""
    rng = np.random.default_rng(1000 + t)
    x = rng.normal(size=(BATCH, IN)).astype(np.float32)
    y = rng.normal(size=(BATCH, OUT)).astype(np.float32)
    if t in SPIKE_STEPS:
        y = y * 50
    return x, y


def _loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    pred = h @ params["out"]["kernel"] + params["out"]["bias"]
    return jnp.mean((pred - y) ** 2)


def _step(name: str, params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
    """One training step of one clipper's run."""
    factory, per_example = OPTIMIZERS[name]
    tx = factory()
    if per_example:
        one = lambda p, xi, yi: _loss(p, xi[None], yi[None])  # noqa: E731
        grads = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, y)
    else:
        loss, grads = jax.value_and_grad(_loss)(params, x, y)
    if name == "skip_on_spike":
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
    else:
        updates, opt_state = tx.update(grads, opt_state, params)
    return {"params": optax.apply_updates(params, updates), "opt_state": opt_state}


@functools.cache
def step_all() -> Callable[..., dict[str, Any]]:
    """One jitted step of every run side by side: each process compiles once."""

    def step(runs: dict[str, Any], x: jax.Array, y: jax.Array) -> dict[str, Any]:
        return {
            name: _step(name, run["params"], run["opt_state"], x, y) for name, run in runs.items()
        }

    return jax.jit(step)


def initial_runs(names: Sequence[str] = tuple(OPTIMIZERS)) -> dict[str, Any]:
    """``{clipper: {"params": ..., "opt_state": ...}}`` at step 0, for the named clippers."""
    params = init_params()
    return {
        name: {"params": params, "opt_state": OPTIMIZERS[name][0]().init(params)} for name in names
    }


def train(runs: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    step = step_all()
    # committed to the device, as restored arrays are: one compiled step serves both
    runs = jax.device_put(runs, jax.devices()[0])
    for t in range(start, stop):
        runs = step(runs, *batch(t))
    return runs


def save(path: pathlib.Path, runs: dict[str, Any]) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path.absolute(), runs)
    checkpointer.wait_until_finished()
    checkpointer.close()


def restore(path: pathlib.Path, names: Sequence[str]) -> dict[str, Any]:
    """Restores into the structure and dtypes that a fresh ``init`` gives."""
    checkpointer = ocp.StandardCheckpointer()
    runs = checkpointer.restore(path.absolute(), jax.eval_shape(lambda: initial_runs(names)))
    checkpointer.close()
    return runs


def flat_leaves(run: Any) -> dict[str, np.ndarray]:
    """Every leaf of one run (parameters and optimizer state), keyed by its path."""
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(run)[0]
    }


def main(argv: list[str]) -> int:
    """``CKPT OUT START STOP [--only=a,b] [--wait]``: resume runs from CKPT, write OUT/<name>.npz.

    ``--only`` names the clippers the checkpoint holds (default: all of
    ``OPTIMIZERS``). With ``--wait`` the step is compiled first, then the
    process waits for a line ``go`` on stdin (sent once the checkpoint is written).
    """
    ckpt, out_dir, start, stop = argv[:4]
    options = argv[4:]
    names = tuple(OPTIMIZERS)
    for option in options:
        if option.startswith("--only="):
            names = tuple(option.removeprefix("--only=").split(","))
    if "--wait" in options:
        jax.block_until_ready(train(initial_runs(names), 0, 1))  # compile
        print("compiled, waiting", flush=True)
        if sys.stdin.readline().strip() != "go":
            return 2
    runs = train(restore(pathlib.Path(ckpt), names), int(start), int(stop))
    for name, run in runs.items():
        np.savez(os.path.join(out_dir, f"{name}.npz"), **flat_leaves(run))
    print(f"resumed {len(runs)} runs at step {start} and stopped at {stop}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
