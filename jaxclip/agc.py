"""AGC: unit-wise clipping relative to the weights (Brock et al., NFNets)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxclip import _apply, _checks, _clip

Array = jax.Array

Exclude = Callable[[str, Array], bool] | str | Sequence[str] | Any


def default_unit_axes(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The axes of one unit, as ``optax.adaptive_grad_clip`` and the NFNets code take them.

    A leaf that squeezes to a scalar or a vector (``(6,)``, ``(1, 6)``,
    ``(1, 1, 1, 8)``) is one unit (None); rank 2 (Dense ``(in, out)``) and rank 3
    (multi-head ``(features, heads, head_dim)``) reduce axis 0, one unit per
    output; rank 4 (conv HWIO) reduces ``(0, 1, 2)``, one unit per output
    channel; higher ranks (3-D conv) all but the last axis, where Optax refuses.
    """
    ndim = len(shape)
    if sum(n != 1 for n in shape) <= 1:
        return None
    if ndim in (2, 3):
        return (0,)
    return tuple(range(ndim - 1))


def _excluded(owner: str, exclude: Exclude, params: Any) -> Callable[[Any, Array], bool]:
    """Turns ``exclude`` into a test ``(path, param) -> bool``."""
    if exclude is None:
        return lambda path, x: False
    if isinstance(exclude, str) or (
        isinstance(exclude, Sequence) and all(isinstance(e, str) for e in exclude)
    ):
        patterns = [re.compile(e) for e in ([exclude] if isinstance(exclude, str) else exclude)]
        return lambda path, x: any(p.search(_checks.path_name(path)) for p in patterns)
    if callable(exclude):
        return lambda path, x: bool(exclude(_checks.path_name(path), x))
    # a pytree of booleans with the structure of the parameters
    mask_leaves = jax.tree_util.tree_flatten_with_path(exclude)[0]
    if jax.tree.structure(exclude) != jax.tree.structure(params):
        raise ValueError(
            f"{owner}: exclude is a pytree but does not match the parameters' structure:\n"
            f"  exclude: {jax.tree.structure(exclude)}\n  params: {jax.tree.structure(params)}"
        )
    by_path = {tuple(p): bool(m) for p, m in mask_leaves}
    return lambda path, x: by_path[tuple(path)]


def agc(
    clipping: Any = 0.01,
    eps: Any = 1e-3,
    *,
    axis: int | Sequence[int] | None = None,
    exclude: Exclude = None,
    nonfinite: str = "propagate",
    max_consecutive_skips: int | None = None,
    axis_name: Any = None,
    replicated: Any = None,
) -> optax.GradientTransformation:
    """Adaptive gradient clipping: each unit's gradient at most ``clipping`` times its weight.

    For every unit (an output column of a Dense kernel, an output channel of a
    conv kernel, a whole bias), with ``W*`` = max(||W_unit||, ``eps``): if
    ``||G_unit|| > clipping * W*``, ``G_unit`` is rescaled to that norm. Equals
    ``optax.adaptive_grad_clip`` where both apply, and adds leaf exclusion,
    statistics and the non-finite policies.

    Args:
      clipping: the largest ratio of gradient norm to weight norm, > 0. The
        paper uses 0.01 for batch sizes 1024 to 4096 (larger for smaller ones).
      eps: the smallest weight norm used, so zero-initialised weights can move.
      axis: the axes of one unit for every leaf; None (default) infers them
        from the rank in JAX layouts (see :func:`default_unit_axes`).
      exclude: leaves to leave unclipped (and out of the statistics): regular
        expressions searched in the leaf's path (``"head/"`` or ``["head/",
        "bias$"]``, paths joined by ``/``), a function ``(path, param) -> bool``
        (``lambda path, p: p.ndim <= 1`` for biases and scales), or a pytree of
        booleans shaped like the parameters. The paper does not clip the final
        classifier layer.
      nonfinite: the policy for NaN or inf gradients, as in :func:`~jaxclip.clip_by_global_norm`.
      max_consecutive_skips: the most skips in a row, as in :func:`~jaxclip.clip_by_global_norm`.
      axis_name: a sharded gradient's mapped axes (``docs/guides/distributed.md``).
      replicated: with ``axis_name``, the leaves that are whole on every device.
    Returns:
      An ``optax.GradientTransformation`` that needs ``params`` in ``update``; its
      ``stats.extra``: ``clipped_fraction`` (of units) and ``max_ratio``, the largest
      ``||G_unit|| / W*`` (``docs/guides/statistics.md``).

    Example:
      >>> import jax.numpy as jnp, jaxclip
      >>> params = {"kernel": jnp.ones((4, 2)), "head": jnp.ones((2, 3))}
      >>> grads = {"kernel": jnp.full((4, 2), 0.5), "head": jnp.full((2, 3), 0.5)}
      >>> tx = jaxclip.agc(0.1, exclude="head")
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> updates["kernel"][0].tolist()  # each column cut to 0.1 * ||W_col|| = 0.2
      [0.10000000149011612, 0.10000000149011612]
      >>> updates["head"][0].tolist()  # excluded
      [0.5, 0.5, 0.5]

    References:
      Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image
      Recognition Without Normalization", ICML 2021 (arXiv:2102.06171).
    """
    owner = "jaxclip.agc"
    _checks.check_scalar(owner, "clipping", clipping, minimum=0.0, strict=True)
    _checks.check_scalar(owner, "eps", eps, minimum=0.0)
    axis_t = _checks.check_axis(owner, axis)
    policy, max_skips = _checks.check_nonfinite(owner, nonfinite, max_consecutive_skips)
    where = _clip.mapped(owner, axis_name, replicated)

    def select(updates: Any, params: Any) -> _clip.Selected:
        if params is None:
            raise ValueError(
                f"{owner} scales gradients relative to the weights: call "
                "update(grads, state, params) with the current parameters."
            )
        is_excluded = _excluded(owner, exclude, params)
        param_by_path = dict(zip(*_checks.float_leaves(params, owner, "params")))
        paths, leaves, weights = [], [], []
        for path, g in zip(*_checks.float_leaves(updates, owner)):
            w = param_by_path.get(path)
            if w is None or w.shape != g.shape:
                raise ValueError(
                    f"{owner}: gradient leaf {_checks.path_str(path)} of shape {g.shape} has "
                    f"no parameter of the same shape (got {None if w is None else w.shape})."
                )
            if not is_excluded(path, w):
                paths.append(path)
                leaves.append(g)
                weights.append(w)
        if axis_t is None:
            axes = [default_unit_axes(g.shape) for g in leaves]
        else:
            axes = _checks.normalize_axes(owner, paths, leaves, axis_t)
        return _clip.Selected(paths, leaves, axes, weights)

    def decide(rule: None, units: _clip.Units, count: Array) -> _clip.UnitDecision:
        del count
        assert units.weight_norms is not None
        g_norm, dtype = units.norms, units.norms.dtype
        w_star = jnp.maximum(units.weight_norms, jnp.asarray(eps, dtype))
        limit = jnp.asarray(clipping, dtype) * w_star
        # as optax.adaptive_grad_clip: the norm held at 1e-6 in the division
        d = jnp.maximum(g_norm, 1e-6)
        scale = _apply.as_factor(jnp.where(g_norm < limit, 1, limit / d), limit, d)
        extra = {"max_ratio": _clip.largest(g_norm / w_star, dtype)}
        return _clip.UnitDecision(scale, _apply.as_array(clipping, dtype), rule, extra)

    return _clip.unit_clipper(
        owner,
        select=select,
        decide=decide,
        policy=policy,
        where=where,
        extra_names=("max_ratio",),
        initial_threshold=clipping,
        max_skips=max_skips,
    )
