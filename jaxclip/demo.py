"""The demo experiment: a vanilla RNN whose gradients explode, trained with each clipper.

Two long-range tasks, generated on the fly from a seed (no downloads, no data
files). ``memory`` (the default): the network sees a sequence of random values
and must output the first one at the end, so it has to carry information
across every step. ``adding`` (Hochreiter and Schmidhuber 1997, used by
Pascanu et al. 2013): output the sum of the two values marked in the
sequence. A tanh RNN whose recurrent matrix is initialised with a large gain
sits in the exploding-gradient regime of Pascanu et al.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxclip

# the loss of always predicting the targets' mean
BASELINE_LOSS = {"memory": 1 / 3, "adding": 1 / 6}


@dataclass(frozen=True)
class Config:
    """The experiment's settings; the defaults finish in seconds per method on a CPU."""

    steps: int = 800
    seed: int = 0
    task: str = "memory"
    seq_len: int = 20
    hidden: int = 32
    batch: int = 32
    recurrent_gain: float = 2.5
    learning_rate: float = 0.03
    momentum: float = 0.9


_FACTORIES: dict[str, Callable[[], optax.GradientTransformation | None]] = {
    "none": lambda: None,
    "clip_by_global_norm": lambda: jaxclip.clip_by_global_norm(1.0),
    "clip_by_value": lambda: jaxclip.clip_by_value(0.1),
    "autoclip": lambda: jaxclip.autoclip(10.0),
    "zclip": lambda: jaxclip.zclip(),
    "adagc": lambda: jaxclip.adagc(),
    "quantile_clip": lambda: jaxclip.quantile_clip(),
    "agc": lambda: jaxclip.agc(0.01),
    "skip_on_spike": lambda: jaxclip.skip_on_spike(jaxclip.clip_by_global_norm(1.0)),
}
# every method the experiment knows, and the ones the demo runs by default
METHODS = tuple(_FACTORIES)
DEFAULT_METHODS = ("none", "clip_by_global_norm", "clip_by_value", "autoclip", "zclip", "adagc")

# where a method's design decides how it fares on this task (shown under the table)
NOTES = {
    "clip_by_value": "caps each element at 0.1: no norm threshold, the direction changes",
    "autoclip": "clips to the 10th percentile of all norms seen so far (the paper's "
    "choice): its threshold starts at the first, exploding norms and comes down only as "
    "calmer steps accumulate",
    "zclip": "does not clip in its 25 warmup steps (the reference's default), when this "
    "RNN's gradients explode, and its statistics then start from those norms",
    "adagc": "one threshold per tensor; the line is the norm of those thresholds",
    "skip_on_spike": "skips a step when the norm exceeds 6x the median of the last 128",
}
# a run learned the task when its final loss is below this share of the baseline
LEARNED_BELOW = 0.5


def make_clipper(name: str) -> optax.GradientTransformation | None:
    """The clipper a method name stands for (None for no clipping)."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return _FACTORIES[name]()


def init_params(key: jax.Array, config: Config) -> dict[str, jax.Array]:
    k_in, k_rec, k_out = jax.random.split(key, 3)
    h = config.hidden
    return {
        "w_in": jax.random.normal(k_in, (2, h)) * 0.5,
        "w_rec": jax.random.orthogonal(k_rec, h) * config.recurrent_gain,
        "b": jnp.zeros(h),
        "w_out": jax.random.normal(k_out, (h, 1)) / np.sqrt(h),
        "b_out": jnp.zeros(1),
    }


def memory_batch(key: jax.Array, config: Config) -> tuple[jax.Array, jax.Array]:
    """Inputs ``(batch, seq_len, 2)``: values in [-1, 1] and a marker on the first step;
    the target is the first value."""
    n, t = config.batch, config.seq_len
    values = jax.random.uniform(key, (n, t), minval=-1.0, maxval=1.0)
    markers = jnp.zeros((n, t)).at[:, 0].set(1.0)
    return jnp.stack([values, markers], axis=-1), values[:, 0]


def adding_batch(key: jax.Array, config: Config) -> tuple[jax.Array, jax.Array]:
    """Inputs ``(batch, seq_len, 2)``: values and markers; targets ``(batch,)``."""
    k_val, k_first, k_second = jax.random.split(key, 3)
    n, t = config.batch, config.seq_len
    values = jax.random.uniform(k_val, (n, t))
    first = jax.random.randint(k_first, (n,), 0, t // 2)
    second = jax.random.randint(k_second, (n,), t // 2, t)
    markers = jax.nn.one_hot(first, t) + jax.nn.one_hot(second, t)
    return jnp.stack([values, markers], axis=-1), jnp.sum(values * markers, axis=-1)


def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    def cell(h: jax.Array, x_t: jax.Array) -> tuple[jax.Array, None]:
        return jnp.tanh(x_t @ params["w_in"] + h @ params["w_rec"] + params["b"]), None

    h0 = jnp.zeros((x.shape[0], params["w_rec"].shape[0]))
    h, _ = jax.lax.scan(cell, h0, jnp.swapaxes(x, 0, 1))
    prediction = (h @ params["w_out"] + params["b_out"])[:, 0]
    return jnp.mean((prediction - y) ** 2)


@dataclass
class History:
    """Per-step records of one training run."""

    method: str
    loss: np.ndarray
    norm: np.ndarray  # pre-clip global gradient norm
    threshold: np.ndarray  # NaN where the method has no norm threshold
    clipped: np.ndarray
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)


def train(
    method: str, config: Config = Config(), progress: Callable[[int], None] | None = None
) -> History:
    """Trains the RNN with one clipping method and records every step."""
    clipper = make_clipper(method)
    optimizer = optax.sgd(config.learning_rate, momentum=config.momentum)
    tx = optimizer if clipper is None else optax.chain(clipper, optimizer)
    params = init_params(jax.random.PRNGKey(config.seed), config)
    opt_state = tx.init(params)

    if config.task not in BASELINE_LOSS:
        raise ValueError(f"unknown task {config.task!r}; choose from {', '.join(BASELINE_LOSS)}")
    make_batch = memory_batch if config.task == "memory" else adding_batch

    @jax.jit
    def step(params: Any, opt_state: Any, key: jax.Array) -> tuple[Any, ...]:
        x, y = make_batch(key, config)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        if clipper is None:
            norm, threshold, clipped = jaxclip.global_norm(grads), jnp.nan, False
        else:
            stats = jaxclip.get_stats(opt_state)
            if isinstance(stats, dict):  # the outermost transform's (a guard's, not its inner)
                stats = stats[min(stats, key=lambda path: (path.count("/"), path))]
            norm, threshold, clipped = stats.norm, stats.threshold, stats.clipped
        return optax.apply_updates(params, updates), opt_state, loss, norm, threshold, clipped

    records = []
    key = jax.random.PRNGKey(config.seed + 1)
    start = time.perf_counter()
    for i in range(config.steps):
        key, sub = jax.random.split(key)
        params, opt_state, *row = step(params, opt_state, sub)
        records.append(row)
        if progress is not None:
            progress(i + 1)
    records = jax.device_get(records)
    seconds = time.perf_counter() - start
    loss, norm, threshold, clipped = (np.asarray(col, np.float64) for col in zip(*records))
    if method == "clip_by_value":
        threshold = np.full_like(threshold, np.nan)  # an element bound, not a norm threshold
    history = History(method, loss, norm, threshold, clipped.astype(bool), seconds)
    history.summary = summarize(history, BASELINE_LOSS[config.task])
    return history


def summarize(history: History, baseline: float) -> dict[str, Any]:
    """The table row: final loss (the mean of the last tenth of the steps) and whether it
    beats ``baseline`` (the loss of always answering the mean), non-finite steps, clipped
    steps, largest norm, time."""
    loss = history.loss
    tail = loss[-max(1, len(loss) // 10) :]
    final = float(np.mean(tail)) if np.all(np.isfinite(tail)) else float("nan")
    finite_norms = history.norm[np.isfinite(history.norm)]
    return {
        "method": history.method,
        "final loss": final,
        "verdict": "learned" if final < LEARNED_BELOW * baseline else "did not learn",
        "non-finite loss steps": int(np.sum(~np.isfinite(loss))),
        "loss spikes": count_spikes(loss),
        "clipped steps": int(np.sum(history.clipped)),
        "largest norm": float(finite_norms.max()) if finite_norms.size else float("nan"),
        "seconds": history.seconds,
    }


def count_spikes(loss: np.ndarray, window: int = 50, factor: float = 3.0) -> int:
    """Steps whose loss exceeds ``factor`` times the median of the previous ``window``.

    Non-finite losses count as spikes; the first 10 steps are never spikes.
    """
    spikes = 0
    for i in range(10, len(loss)):
        recent = loss[max(0, i - window) : i]
        recent = recent[np.isfinite(recent)]
        if not np.isfinite(loss[i]) or (recent.size and loss[i] > factor * np.median(recent)):
            spikes += 1
    return spikes


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of summary rows."""
    headers = list(rows[0])
    cells = [
        [f"{row[h]:.4g}" if isinstance(row[h], float) else str(row[h]) for h in headers]
        for row in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(out)
