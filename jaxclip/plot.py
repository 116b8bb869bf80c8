"""Matplotlib pictures of clipping (the optional extra ``jaxclip[plot]``).

``import jaxclip`` never imports this module or matplotlib; import it as
``from jaxclip import plot``. Every function returns the ``matplotlib`` Figure.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
    from matplotlib import pyplot as plt
    from matplotlib.figure import Figure
except ImportError as _missing:  # without the extra
    raise ImportError("jaxclip.plot needs matplotlib: pip install 'jaxclip[plot]'") from _missing


def _axes(ax: Any, figsize: tuple[float, float]) -> tuple[Figure, Any]:
    return (ax.figure, ax) if ax is not None else plt.subplots(figsize=figsize)


def norm_history(
    norm: Sequence[float],
    threshold: Sequence[float] | None = None,
    clipped: Sequence[bool] | None = None,
    *,
    title: str = "pre-clip gradient norm",
    threshold_label: str = "threshold",
    ax: Any = None,
) -> Figure:
    """The pre-clip norm per step, the threshold, and the steps that were clipped.

    Args:
      norm: the pre-clip norm per step (``ClipStats.norm`` logged each step).
      threshold: the threshold per step, if any (NaN or inf where there was none).
      clipped: whether each step was clipped; marked with dots.
      title: the axes' title.
      threshold_label: the threshold line's legend entry.
      ax: draw into these axes instead of a new figure.

    Example:
      >>> from jaxclip import plot
      >>> fig = plot.norm_history([1.0, 5.0, 1.2], threshold=[2.0, 2.0, 2.0],
      ...                         clipped=[False, True, False])
      >>> fig.axes[0].get_yscale()
      'log'
    """
    fig, ax = _axes(ax, (7, 3))
    values = np.asarray(norm, np.float64)
    steps = np.arange(len(values))
    ax.plot(steps, np.where(np.isfinite(values), values, np.nan), lw=0.8, label="norm")
    if threshold is not None:
        t = np.asarray(threshold, np.float64)
        ax.plot(steps, np.where(np.isfinite(t), t, np.nan), lw=1.2, ls="--", label=threshold_label)
    if clipped is not None:
        mask = np.asarray(clipped, bool)
        ax.plot(steps[mask], values[mask], ".", ms=3, color="tab:red", label="clipped")
    for s in steps[~np.isfinite(values)]:
        ax.axvline(s, color="black", alpha=0.3, lw=0.5)
    ax.set(yscale="log", xlabel="step", title=title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    return fig


def losses(
    runs: Mapping[str, Sequence[float]],
    *,
    title: str = "training loss",
    log: bool = True,
    baseline: float | None = None,
    ax: Any = None,
) -> Figure:
    """Loss curves of several runs; non-finite losses leave gaps.

    Args:
      runs: run name -> loss per step.
      title: the axes' title.
      log: log-scale the loss axis.
      baseline: a reference loss drawn as a horizontal line (e.g. that of a
        constant prediction).
      ax: draw into these axes instead of a new figure.

    Example:
      >>> from jaxclip import plot
      >>> fig = plot.losses({"fixed": [2.0, 1.5, 1.2], "zclip": [2.0, 1.4, 1.1]})
      >>> len(fig.axes[0].lines)
      2
    """
    fig, ax = _axes(ax, (7, 3))
    for i, (name, values) in enumerate(runs.items()):
        v = np.asarray(values, np.float64)
        # the ten colours of the "tab10" cycle, told apart by most readers
        ax.plot(np.where(np.isfinite(v), v, np.nan), lw=0.9, label=name, color=f"C{i % 10}")
    if baseline is not None:
        ax.axhline(baseline, color="black", ls=":", lw=1.2, label=f"baseline {baseline:.3g}")
    if log:
        ax.set_yscale("log")
    ax.set(xlabel="step", title=title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    return fig


def clip_field(clippers: Mapping[str, Any], *, extent: float = 3.0, points: int = 11) -> Figure:
    """How each clipper maps a 2-D gradient field: arrows from g to clip(g).

    Each panel shows a grid of gradients ``g`` (grey) and their clipped
    versions (coloured). Value clipping bends the direction towards the
    diagonals; norm clipping keeps it and shortens long arrows.

    Args:
      clippers: name -> an ``optax.GradientTransformation`` acting on a
        vector of shape (2,) (stateless use: ``init`` then one ``update``).
      extent: the grid spans ``[-extent, extent]`` on both axes.
      points: grid points per axis.

    Returns:
      The Figure, one panel per clipper.

    Example:
      >>> import jaxclip
      >>> from jaxclip import plot
      >>> fig = plot.clip_field({"value 1": jaxclip.clip_by_value(1.0),
      ...                        "norm 1": jaxclip.clip_by_global_norm(1.0)}, points=5)
      >>> len(fig.axes)
      2
    """
    axis = np.linspace(-extent, extent, points)
    grid = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
    fig, axes = plt.subplots(1, len(clippers), figsize=(3.2 * len(clippers), 3.2), squeeze=False)
    for ax, (name, tx) in zip(axes[0], clippers.items()):
        state = tx.init(jnp.zeros(2))
        clipped = np.asarray(
            jax.vmap(lambda g, tx=tx, state=state: tx.update(g, state)[0])(jnp.asarray(grid))
        )
        arrows = {"angles": "xy", "scale_units": "xy", "scale": 1}
        zero = np.zeros(len(grid))
        ax.quiver(zero, zero, grid[:, 0], grid[:, 1], color="0.8", width=0.004, **arrows)
        ax.quiver(zero, zero, *clipped.T, color="tab:blue", width=0.006, **arrows)
        ax.set(xlim=(-extent, extent), ylim=(-extent, extent), aspect="equal", title=name)
    fig.tight_layout()
    return fig


def demo_runs(
    histories: Sequence[Any], baseline: float | None = None, notes: Mapping[str, str] | None = None
) -> Figure:
    """The demo's picture: loss curves, and each method's norm with its threshold.

    Args:
      histories: ``jaxclip.demo.History`` objects, one per method.
      baseline: the loss of a constant prediction, drawn across the loss panel.
      notes: method -> a short note under its panel's title (``jaxclip.demo.NOTES``).

    Returns:
      The Figure: the losses on top, one norm panel per method below.
    """
    n = len(histories)
    notes = notes or {}
    fig = plt.figure(figsize=(11, 2.6 + 1.9 * n))
    grid = fig.add_gridspec(1 + n, 1, height_ratios=[2.2] + [1.6] * n)
    losses({h.method: h.loss for h in histories}, baseline=baseline, ax=fig.add_subplot(grid[0]))
    for i, h in enumerate(histories):
        ax = fig.add_subplot(grid[1 + i])
        threshold = h.threshold if np.isfinite(h.threshold).any() else None
        clipped = h.clipped if np.any(h.clipped) else None
        label = "norm of per-tensor thresholds" if h.method == "adagc" else "threshold"
        title = f"{h.method}: pre-clip norm"
        norm_history(h.norm, threshold, clipped, title=title, threshold_label=label, ax=ax)
        if h.method in notes:
            ax.set_title(f"{title}\n{textwrap.fill(notes[h.method], 110)}", fontsize="small")
        if i < n - 1:
            ax.set_xlabel("")
    fig.tight_layout()
    return fig
