"""Fixed-threshold clippers: global norm, per-leaf (or per-slice) norm, value."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxclip import _apply, _checks, _clip, _norms, _rules
from jaxclip._stats import ClipStats, initial_stats, next_stats

Array = jax.Array
Scalar = float | int | jax.Array | np.ndarray
Threshold = Scalar | Callable[[Array], Array]


def clip_by_global_norm(
    max_norm: Threshold,
    *,
    ord: float | str | None = None,
    eps: Scalar = 0.0,
    min_norm: Threshold | None = None,
    nonfinite: str = "propagate",
    max_consecutive_skips: int | None = None,
    axis_name: Any = None,
    replicated: Any = None,
) -> optax.GradientTransformation:
    """Rescales the whole gradient when its global norm exceeds ``max_norm``.

    ``g -> g * max_norm / ||g||`` when ``||g|| > max_norm``, else ``g``
    unchanged; the direction is kept. The norm accumulates in float32 (float64
    for float64 leaves) and is rescued from overflow and underflow, so float16
    gradients ``[300]`` and ``[400]`` have norm 500 (not inf) and 1e20 float32
    gradients are clipped, not zeroed. Each leaf keeps its dtype.

    Args:
      max_norm: the threshold, >= 0: a number, a scalar array (e.g. injected
        with ``optax.inject_hyperparams``) or a schedule ``step -> threshold``.
        ``inf`` never clips and still records the norm, as in PyTorch and Optax.
      ord: the norm: None or 2 (L2, default), 1, ``inf`` or any real p >= 1.
      eps: 0 (default) gives ``max_norm / ||g||``. ``eps > 0`` gives PyTorch's
        ``clip_grad_norm_``: ``min(1, max_norm / (||g|| + eps))``, computed as
        PyTorch does; ``eps=1e-6`` matches it to float32 rounding.
      min_norm: optional lower bound: a nonzero gradient whose norm is below it
        is scaled *up* to it; a zero gradient stays zero. This is no cure for
        vanishing gradients: it rescales the whole update, so it cannot tell a
        small step that is right from one that is lost, and it amplifies noise.
      nonfinite: what to do when the gradient holds NaN or inf (or its norm
        overflows): ``"propagate"`` (default; as Optax and PyTorch), ``"skip"``,
        ``"zero"`` or ``"error"``, as told in ``docs/guides/nonfinite.md``.
      max_consecutive_skips: with ``nonfinite="skip"``, the most steps skipped
        in a row (None: no limit); the next is then applied as it is
        (``docs/guides/nonfinite.md``).
      axis_name: a sharded gradient's mapped axes (``docs/guides/distributed.md``).
      replicated: with ``axis_name``, the leaves that are whole on every device.
    Returns:
      An ``optax.GradientTransformation`` whose state is a
      :class:`~jaxclip.ClipStats` (pre-clip norm, threshold, scale, ...).

    Raises:
      ValueError: at construction, for a negative or NaN threshold, an infinite
        ``min_norm``, ``min_norm > max_norm``, a negative ``eps``, an unknown ``ord``
        or policy.
      TypeError: at trace time, for a non-floating leaf (naming its path).

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxclip
      >>> tx = jaxclip.clip_by_global_norm(5.0)
      >>> updates, state = tx.update({"g": jnp.array([6.0, 8.0])}, tx.init(None))
      >>> updates["g"].tolist(), float(state.norm)
      ([3.0, 4.0], 10.0)
      >>> opt = optax.chain(jaxclip.clip_by_global_norm(1.0), optax.adamw(1e-3))

    References:
      Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent
      neural networks", ICML 2013 (arXiv:1211.5063).
    """
    owner = "jaxclip.clip_by_global_norm"
    _checks.check_threshold(owner, "max_norm", max_norm)
    p = _checks.check_order(owner, ord)
    _checks.check_scalar(owner, "eps", eps, minimum=0.0)
    if min_norm is not None:
        _checks.check_threshold(owner, "min_norm", min_norm, allow_inf=False)
        lo, hi = _checks.concrete_value(min_norm), _checks.concrete_value(max_norm)
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"{owner}: min_norm ({lo}) must be <= max_norm ({hi}).")
    policy, max_skips = _checks.check_nonfinite(owner, nonfinite, max_consecutive_skips)
    where = _clip.mapped(owner, axis_name, replicated)

    def scale_fn(norm: Array, step: _rules.RuleStep, count: Array) -> _apply.Factor:
        lower = None if min_norm is None else _apply.as_array(min_norm, norm.dtype, count)
        return _apply.scale_for(norm, step.target.astype(norm.dtype), eps=eps, min_norm=lower)

    rule = _rules.constant_rule(max_norm)
    return _clip.rule_clipper(
        owner, rule, scale_fn, policy, where, p=p, initial_threshold=max_norm, max_skips=max_skips
    )


def clip_tree(
    tree: Any,
    max_norm: Scalar,
    *,
    norm: Scalar | None = None,
    ord: float | str | None = None,
    eps: Scalar = 0.0,
    nonfinite: str = "propagate",
) -> tuple[Any, ClipStats]:
    """Clips ``tree`` by its global norm once, as a function: for hand-written loops.

    The rule of :func:`clip_by_global_norm`, without a transformation's state.
    Given ``norm`` (a global norm the loop already computed, e.g. to log it, as
    PyTorch's ``get_total_norm`` then ``clip_grads_with_norm_``), the tree is
    scaled by it without measuring it again.

    Args:
      tree: a pytree of floating-point arrays.
      max_norm: the threshold, >= 0 (a number or a scalar array; ``inf`` never
        clips).
      norm: the tree's global norm, if already known (used as given); None:
        measured here, robustly, in float32 (float64 for float64 leaves).
      ord: the norm to measure when ``norm`` is None, as in
        :func:`clip_by_global_norm`.
      eps: as in :func:`clip_by_global_norm` (``1e-6`` gives PyTorch's rule).
      nonfinite: as in :func:`clip_by_global_norm`; with ``norm`` given, a
        non-finite ``norm`` is what makes the step non-finite.

    Returns:
      ``(clipped_tree, stats)``: each leaf in its own dtype, and a one-step
      :class:`~jaxclip.ClipStats` (pre-clip norm, threshold, scale, clipped).

    Example:
      >>> import jax.numpy as jnp, jaxclip
      >>> grads = {"g": jnp.array([6.0, 8.0])}
      >>> norm = jaxclip.global_norm(grads)  # logged by the loop
      >>> clipped, stats = jaxclip.clip_tree(grads, 5.0, norm=norm)
      >>> clipped["g"].tolist(), float(stats.scale)
      ([3.0, 4.0], 0.5)
    """
    owner = "jaxclip.clip_tree"
    _checks.check_scalar(owner, "max_norm", max_norm, minimum=0.0, allow_inf=True)
    p = _checks.check_order(owner, ord)
    _checks.check_scalar(owner, "eps", eps, minimum=0.0)
    policy = _checks.check_nonfinite(owner, nonfinite)[0]
    if norm is None:
        measured = _clip.measure(owner, tree, p, policy)
    else:
        paths, leaves = _checks.float_leaves(tree, owner)
        given = jnp.asarray(norm)
        if given.ndim != 0:
            raise ValueError(f"{owner}: norm must be a scalar, got shape {given.shape}.")
        given = given.astype(_norms.accumulation_dtype([x.dtype for x in leaves]))
        measured = _clip.Measured(paths, leaves, given, jnp.isfinite(given))
    threshold = _apply.as_array(max_norm, measured.norm.dtype)
    scale = _apply.scale_for(measured.norm, threshold, eps=eps)
    out = _clip.rescale(owner, tree, measured, scale, policy)
    stats = next_stats(
        initial_stats(measured.norm.dtype, threshold),
        norm=measured.norm,
        threshold=threshold,
        scale=out.scale,
        clipped=out.clipped,
        finite=measured.finite,
    )
    return out.updates, stats


def clip_by_norm(
    max_norm: Threshold,
    *,
    ord: float | str | None = None,
    axis: int | Sequence[int] | None = None,
    nonfinite: str = "propagate",
    max_consecutive_skips: int | None = None,
    axis_name: Any = None,
    replicated: Any = None,
) -> optax.GradientTransformation:
    """Clips the norm of each leaf (Keras ``clipnorm``), or of each slice along ``axis``.

    Each leaf ``g`` becomes ``g * max_norm / ||g||`` when ``||g|| > max_norm``.
    With ``axis``, each slice along those axes is clipped on its own, like
    ``tf.clip_by_norm(t, c, axes=axis)``: ``axis=0`` on a Dense kernel of shape
    ``(in, out)`` clips each output unit's column.

    Args:
      max_norm: the threshold, >= 0: a number, a scalar array or a schedule;
        ``inf`` never clips. Unlike Keras's ``clipnorm=0`` ("no clipping"), 0
        clips every unit to zero.
      ord: None or 2 (L2, default), 1, ``inf`` or any real p >= 1.
      axis: None (one norm per leaf) or the axes to reduce; negative axes count
        from the end. Every leaf must have them.
      nonfinite: as in :func:`clip_by_global_norm`, but ``"propagate"`` acts per slice:
        one whose norm is NaN becomes NaN, one whose norm is infinite zeros and
        NaN, the others are clipped as usual.
      max_consecutive_skips: the most skips in a row, as in :func:`~jaxclip.clip_by_global_norm`.
      axis_name: a sharded gradient's mapped axes (``docs/guides/distributed.md``).
      replicated: with ``axis_name``, the leaves that are whole on every device.
    Returns:
      An ``optax.GradientTransformation``; its ``stats.extra``: ``clipped_fraction``
      and ``max_unit_norm`` (``docs/guides/statistics.md``).

    Example:
      >>> import jax.numpy as jnp, jaxclip
      >>> tx = jaxclip.clip_by_norm(1.0)
      >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}
      >>> updates, state = tx.update(grads, tx.init(None))
      >>> updates["a"].tolist(), updates["b"].tolist()
      ([0.6000000238418579, 0.800000011920929], [0.5])

    References:
      ``tf.clip_by_norm`` and the ``clipnorm`` argument of Keras optimizers.
    """
    owner = "jaxclip.clip_by_norm"
    _checks.check_threshold(owner, "max_norm", max_norm)
    p = _checks.check_order(owner, ord)
    axis_t = _checks.check_axis(owner, axis)
    policy, max_skips = _checks.check_nonfinite(owner, nonfinite, max_consecutive_skips)
    where = _clip.mapped(owner, axis_name, replicated)

    def select(updates: Any, params: Any) -> _clip.Selected:
        del params
        paths, leaves = _checks.float_leaves(updates, owner)
        return _clip.Selected(paths, leaves, _checks.normalize_axes(owner, paths, leaves, axis_t))

    def decide(rule: None, units: _clip.Units, count: Array) -> _clip.UnitDecision:
        threshold = _apply.as_array(max_norm, units.norms.dtype, count)
        extra = {"max_unit_norm": _clip.largest(units.norms, units.norms.dtype)}
        return _clip.UnitDecision(_apply.scale_for(units.norms, threshold), threshold, rule, extra)

    return _clip.unit_clipper(
        owner,
        select=select,
        decide=decide,
        policy=policy,
        where=where,
        extra_names=("max_unit_norm",),
        initial_threshold=max_norm,
        p=p,
        # a unit of elements too small to square still has a norm that 0 clips
        zero_sums_are_zero=_checks.concrete_value(max_norm) != 0,
        max_skips=max_skips,
    )


def clip_by_value(
    max_value: Any,
    min_value: Any = None,
    *,
    statistics: str = "full",
    axis_name: Any = None,
    replicated: Any = None,
) -> optax.GradientTransformation:
    """Clips each element to ``[min_value, max_value]`` (Keras ``clipvalue``).

    ``clip_by_value(0.5)`` clips to ``[-0.5, 0.5]``; ``clip_by_value(2.0,
    min_value=-1.0)`` to ``[-1, 2]``. Unlike the norm clippers this changes the
    gradient's direction. NaN elements stay NaN; infinite ones go to the bound.

    Args:
      max_value: the upper bound: a number, a scalar array, or a pytree with
        the structure of the gradients whose leaves broadcast to them. An
        infinite bound clips one side only.
      min_value: the lower bound, same forms; None (default) means
        ``-max_value``, which then must be >= 0.
      statistics: ``"full"`` (default) records the norms before and after
        clipping and the fraction of elements clipped; ``"light"``, cheaper, the
        norm before clipping and the largest element magnitude (the costs are in
        ``docs/guides/statistics.md``).
      axis_name: a sharded gradient's mapped axes (``docs/guides/distributed.md``),
        for the statistics: the clip itself is element-wise and needs no exchange.
      replicated: with ``axis_name``, the leaves that are whole on every device.

    Returns:
      An ``optax.GradientTransformation``. Bounds are rounded to each leaf's
      dtype. ``stats.threshold`` is the largest absolute bound; ``stats.extra``:
      ``clipped_fraction`` (``"light"``: ``max_abs``) (``docs/guides/statistics.md``).

    Raises:
      ValueError: at construction for NaN bounds, ``min_value > max_value``, a
        negative symmetric bound or an unknown ``statistics``; at trace time
        when a pytree bound does not match the gradient.

    Example:
      >>> import jax.numpy as jnp, jaxclip
      >>> tx = jaxclip.clip_by_value(2.0, min_value=-1.0)
      >>> updates, _ = tx.update(jnp.array([-3.0, 0.5, 7.0]), tx.init(None))
      >>> updates.tolist()
      [-1.0, 0.5, 2.0]
      >>> tx = jaxclip.clip_by_value(2.0, statistics="light")
      >>> _, state = tx.update(jnp.array([-3.0, 0.5, 1.0]), tx.init(None))
      >>> round(float(state.scale), 4), float(state.extra["max_abs"])
      (0.6667, 3.0)

    References:
      ``torch.nn.utils.clip_grad_value_``; ``tf.clip_by_value``; the
      ``clipvalue`` argument of Keras optimizers.
    """
    owner = "jaxclip.clip_by_value"
    _check_bounds(owner, max_value, min_value)
    mode = _checks.check_choice(owner, "statistics", statistics, ("full", "light"))
    where = _clip.mapped(owner, axis_name, replicated)
    extra_name = "clipped_fraction" if mode == "full" else "max_abs"

    def init_fn(params: Any) -> ClipStats:
        return _clip.initial(params, (extra_name,), None, 0.0)[1]

    def update_fn(updates: Any, state: ClipStats, params: Any = None) -> tuple[Any, ClipStats]:
        del params
        paths, leaves = _checks.float_leaves(updates, owner)
        his = _bound_leaves(owner, "max_value", max_value, updates, paths, leaves)
        if min_value is None:
            los = [-h for h in his]
        else:
            los = _bound_leaves(owner, "min_value", min_value, updates, paths, leaves)
        # rounded to each leaf's dtype once, for the clip and the statistics alike
        los, his = ([b.astype(x.dtype) for b, x in zip(bs, leaves)] for bs in (los, his))

        clipped_leaves = [jnp.clip(x, lo, hi) for x, lo, hi in zip(leaves, los, his)]
        new_updates = _checks.replace_leaves(updates, paths, clipped_leaves)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_updates, updates)

        flags = where.flags(owner, paths, leaves)
        norm_of = functools.partial(
            _norms.global_norm_and_finite, p=2.0, axis_name=where.axis_name, replicated=flags
        )
        before, finite = norm_of(leaves)
        # NaN elements stay NaN and do not count as clipped
        changed = [
            jnp.sum((c != x) & ~jnp.isnan(x), dtype=jnp.int32)
            for c, x in zip(clipped_leaves, leaves)
        ]
        n_changed = _total(where, flags, changed)
        if mode == "full":
            size = _total(where, flags, [jnp.asarray(x.size, jnp.int32) for x in leaves])
            top, top_after = before, norm_of(clipped_leaves)[0]
            extra = n_changed / jnp.maximum(size, 1)
        else:
            top = _largest(where, flags, leaves, before.dtype)
            top_after = _largest(where, flags, clipped_leaves, before.dtype)
            extra = top
        scale = jnp.where(top > 0, top_after / jnp.where(top > 0, top, 1), 1)
        stats = next_stats(
            state,
            norm=before,
            threshold=_largest_bound(max_value, min_value, before.dtype),
            scale=scale,
            clipped=n_changed > 0,
            finite=finite,
            extra={extra_name: extra},
        )
        return new_updates, stats

    return _clip.transformation(init_fn, update_fn)


def _total(where: _clip.Mapped, flags: list[bool], counts: list[Array]) -> Array:
    """The sum of per-leaf int32 counts over the whole gradient (across mapped axes)."""
    counts = where.combine(flags, counts, jax.lax.psum)
    return jnp.sum(_norms.joined(counts)) if counts else jnp.zeros((), jnp.int32)


def _largest(where: _clip.Mapped, flags: list[bool], leaves: list[Array], dtype: Any) -> Array:
    """The largest magnitude in the whole gradient (across mapped axes)."""
    maxima = [jnp.max(jnp.abs(x), initial=0).astype(dtype) for x in leaves]
    maxima = where.combine(flags, maxima, jax.lax.pmax)
    return jnp.max(_norms.joined(maxima)) if maxima else jnp.zeros((), dtype)


def _largest_bound(max_value: Any, min_value: Any, dtype: Any) -> Array:
    """The largest absolute value among the bounds."""
    bounds = jax.tree.leaves(max_value) + jax.tree.leaves(min_value)
    largest = [jnp.max(jnp.abs(jnp.asarray(b))).astype(dtype) for b in bounds]
    return functools.reduce(jnp.maximum, largest, jnp.zeros((), dtype))


def _check_bounds(owner: str, max_value: Any, min_value: Any) -> None:
    """Checks the readable bounds: no NaN, ordered, symmetric bound >= 0."""
    his = _readable_leaves(owner, "max_value", max_value)
    if min_value is None:
        for h in his:
            if np.any(h < 0):
                raise ValueError(
                    f"{owner}: max_value must be >= 0 when min_value is None (the bounds are "
                    f"[-max_value, max_value]), got {h.tolist()}."
                )
        return
    los = _readable_leaves(owner, "min_value", min_value)
    if len(his) == 1:
        his = his * len(los)
    if len(los) == 1:
        los = los * len(his)
    if len(his) == len(los):
        for h, lo in zip(his, los):
            if np.any(np.broadcast_arrays(lo, h)[0] > np.broadcast_arrays(lo, h)[1]):
                raise ValueError(
                    f"{owner}: min_value must be <= max_value, got min_value={lo.tolist()} "
                    f"and max_value={h.tolist()}."
                )


def _readable_leaves(owner: str, name: str, bound: Any) -> list[np.ndarray]:
    """The leaves of a bound that can be read now, as NumPy arrays."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(bound)[0]:
        if _checks.is_traced(leaf):
            continue
        if isinstance(leaf, bool) or not isinstance(leaf, _checks.NUMBERS):
            raise TypeError(
                f"{owner}: {name} must be numbers or arrays, got {leaf!r} at "
                f"{_checks.path_str(path)}."
            )
        arr = np.asarray(leaf, dtype=np.float64)
        if np.any(np.isnan(arr)):
            raise ValueError(f"{owner}: {name} must not be NaN (at {_checks.path_str(path)}).")
        out.append(arr)
    return out


def _bound_leaves(
    owner: str, name: str, bound: Any, updates: Any, paths: list[Any], leaves: list[Array]
) -> list[Array]:
    """The bound for each gradient leaf, from a scalar or a matching pytree."""
    if not jax.tree_util.treedef_is_leaf(jax.tree.structure(bound)):
        if jax.tree.structure(bound) != jax.tree.structure(updates):
            raise ValueError(
                f"{owner}: {name} is a pytree but does not match the gradients' structure:\n"
                f"  {name}: {jax.tree.structure(bound)}\n  updates: {jax.tree.structure(updates)}"
            )
        bound_by_path = {
            tuple(p): jnp.asarray(b) for p, b in jax.tree_util.tree_flatten_with_path(bound)[0]
        }
        out = []
        for path, x in zip(paths, leaves):
            b = bound_by_path[tuple(path)]
            ok = b.ndim <= x.ndim and all(d in (1, n) for d, n in zip(b.shape, x.shape[-b.ndim :]))
            if not ok:
                raise ValueError(
                    f"{owner}: {name} at {_checks.path_str(path)} has shape {b.shape}, which "
                    f"does not broadcast to the gradient's shape {x.shape}."
                )
            out.append(b)
        return out
    b = jnp.asarray(bound)
    if b.ndim != 0:
        raise ValueError(
            f"{owner}: {name} must be a scalar or a pytree matching the gradients, got an "
            f"array of shape {b.shape}."
        )
    return [b] * len(leaves)
