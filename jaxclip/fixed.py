"""Fixed-threshold clippers: global norm, per-leaf (or per-slice) norm, value."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxclip import _apply, _checks, _clip, _norms
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
      ord: the norm: None or 2 (L2, default), 1, ``inf`` or any real p >= 1.
      eps: 0 (default) gives ``max_norm / ||g||``. ``eps > 0`` gives PyTorch's
        ``clip_grad_norm_``: ``min(1, max_norm / (||g|| + eps))``, computed as
        PyTorch does; ``eps=1e-6`` matches it to float32 rounding.
      min_norm: optional lower bound: a nonzero gradient whose norm is below it
        is scaled *up* to it; a zero gradient stays zero. This is no cure for
        vanishing gradients: it rescales the whole update, so it cannot tell a
        small step that is right from one that is lost, and it amplifies noise.
      nonfinite: what to do when the gradient holds NaN or inf (or its norm
        overflows): ``"propagate"`` (default) does what Optax and PyTorch do:
        a NaN norm makes every element NaN; an infinite norm zeroes the finite
        elements and turns the infinite ones into NaN, so the step stays visibly
        broken for ``optax.apply_if_finite`` or a loss check downstream, and is
        counted in the statistics. ``"skip"`` returns zero updates for the step;
        ``"zero"`` sets the non-finite elements to zero and clips the rest;
        ``"error"`` raises ``FloatingPointError`` naming the leaves, also from a
        jitted step (one extra pass over the gradient, on failing steps only).
        The default leaves the policy to the user instead of hiding a broken
        step; note that ``"skip"`` still lets a following optimizer advance
        (e.g. AdamW's weight decay and moments).

      axis_name: for a gradient sharded over mapped axes inside ``shard_map`` or
        ``pmap`` (each device holding a disjoint piece): the axis name, or a tuple
        of names, over which norms are summed, so that every device clips by the
        norm of the whole gradient and adaptive states stay identical. Not needed
        under ``jit`` with sharded arrays, nor for gradients already averaged
        with ``pmean``.
      replicated: with ``axis_name``, the leaves that are whole on every device
        (a function ``(path, leaf) -> bool`` or a pytree of booleans); they are
        counted once.
    Returns:
      An ``optax.GradientTransformation`` whose state is a
      :class:`~jaxclip.ClipStats` (pre-clip norm, threshold, scale, ...).

    Raises:
      ValueError: at construction, for a negative, NaN or infinite threshold,
        ``min_norm > max_norm``, a negative ``eps``, an unknown ``ord`` or policy.
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
        _checks.check_threshold(owner, "min_norm", min_norm)
        lo, hi = _checks.concrete_value(min_norm), _checks.concrete_value(max_norm)
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"{owner}: min_norm ({lo}) must be <= max_norm ({hi}).")
    policy = _checks.check_choice(owner, "nonfinite", nonfinite, _checks.NONFINITE_POLICIES)
    where = _clip.mapped(owner, axis_name, replicated)

    def init_fn(params: Any) -> ClipStats:
        dtype = _clip.stats_dtype(params)
        return initial_stats(dtype, _clip.initial_threshold(max_norm, dtype))

    def update_fn(updates: Any, state: ClipStats, params: Any = None) -> tuple[Any, ClipStats]:
        del params
        measured = _clip.measure(owner, updates, p, policy, where)
        threshold = _apply.as_threshold(max_norm, state.step, measured.norm.dtype)
        lower = None
        if min_norm is not None:
            lower = _apply.as_threshold(min_norm, state.step, measured.norm.dtype)
        scale = _apply.scale_for(measured.norm, threshold, eps=eps, min_norm=lower)
        out = _clip.rescale(owner, updates, measured, scale, policy)
        stats = next_stats(
            state,
            norm=measured.norm,
            threshold=threshold,
            scale=out.scale,
            clipped=out.clipped,
            finite=measured.finite,
        )
        return out.updates, stats

    return _clip.transformation(init_fn, update_fn)


def clip_by_norm(
    max_norm: Threshold,
    *,
    ord: float | str | None = None,
    axis: int | Sequence[int] | None = None,
    nonfinite: str = "propagate",
    axis_name: Any = None,
    replicated: Any = None,
) -> optax.GradientTransformation:
    """Clips the norm of each leaf (Keras ``clipnorm``), or of each slice along ``axis``.

    Each leaf ``g`` becomes ``g * max_norm / ||g||`` when ``||g|| > max_norm``.
    With ``axis``, each slice along those axes is clipped on its own, like
    ``tf.clip_by_norm(t, c, axes=axis)``: ``axis=0`` on a Dense kernel of shape
    ``(in, out)`` clips each output unit's column.

    Args:
      max_norm: the threshold, >= 0: a number, a scalar array or a schedule.
      ord: None or 2 (L2, default), 1, ``inf`` or any real p >= 1.
      axis: None (one norm per leaf) or the axes to reduce; negative axes count
        from the end. Every leaf must have them.
      nonfinite: ``"propagate"`` (default): a slice whose norm is NaN becomes
        NaN, one whose norm is infinite becomes zeros and NaN, others are clipped
        as usual; ``"skip"``: zero updates when any element is non-finite;
        ``"zero"``: non-finite elements set to zero; ``"error"``: raise, naming
        the leaves. See :func:`clip_by_global_norm`.

      axis_name: for a gradient sharded over mapped axes inside ``shard_map`` or
        ``pmap`` (each device holding a disjoint piece): the axis name, or a tuple
        of names, over which norms are summed, so that every device clips by the
        norm of the whole gradient and adaptive states stay identical. Not needed
        under ``jit`` with sharded arrays, nor for gradients already averaged
        with ``pmean``.
      replicated: with ``axis_name``, the leaves that are whole on every device
        (a function ``(path, leaf) -> bool`` or a pytree of booleans); they are
        counted once.
    Returns:
      An ``optax.GradientTransformation``. Its :class:`~jaxclip.ClipStats`
      holds the global pre-clip norm, ``scale`` = global norm after / before,
      ``extra["clipped_fraction"]`` (the fraction of leaves, or slices, clipped)
      and ``extra["max_unit_norm"]`` (the largest leaf or slice norm).

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
    policy = _checks.check_choice(owner, "nonfinite", nonfinite, _checks.NONFINITE_POLICIES)
    where = _clip.mapped(owner, axis_name, replicated)

    def init_fn(params: Any) -> ClipStats:
        dtype = _clip.stats_dtype(params)
        return initial_stats(
            dtype,
            _clip.initial_threshold(max_norm, dtype),
            extra={"clipped_fraction": jnp.zeros((), dtype), "max_unit_norm": jnp.zeros((), dtype)},
        )

    def update_fn(updates: Any, state: ClipStats, params: Any = None) -> tuple[Any, ClipStats]:
        del params
        flat = _checks.float_leaves(updates, owner)
        paths, leaves = [q for q, _ in flat], [x for _, x in flat]
        axes = _norms.normalize_axes(owner, paths, leaves, axis_t)
        units = _clip.measure_units(paths, leaves, p, axes, policy, where=where, owner=owner)
        threshold = _apply.as_threshold(max_norm, state.step, state.norm.dtype)
        scales = [_apply.scale_for(n, threshold.astype(n.dtype)) for n in units.norms]
        new_updates = _clip.rescale_units(owner, updates, units, scales, policy)
        summary = _clip.summarize_units(units, scales, p, policy)
        stats = next_stats(
            state,
            norm=summary.norm,
            threshold=threshold,
            scale=summary.scale,
            clipped=summary.clipped,
            finite=units.step_finite,
            extra={
                "clipped_fraction": summary.clipped_fraction,
                "max_unit_norm": summary.max_unit_norm,
            },
        )
        return new_updates, stats

    return _clip.transformation(init_fn, update_fn)


def _reduce(fn: Callable[..., Array], arrays: list[Array], dtype: Any, empty: float) -> Array:
    if not arrays:
        return jnp.asarray(empty, dtype)
    return fn(jnp.stack([fn(a).astype(dtype) for a in arrays]))


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
        clipping and the fraction of elements clipped; ``"light"`` records the
        norm before clipping and the largest element magnitude instead. Besides
        the clip, ``"full"`` reads the gradient twice (the pre-clip norm; the
        post-clip norm and the count), ``"light"`` with scalar bounds once (the
        norm and each leaf's extremes come from one pass; with per-element
        bounds up to three times), so ``"light"`` is the faster of the two.
      axis_name: for a gradient sharded over mapped axes (``shard_map``,
        ``pmap``): the axes over which the statistics' norms and counts are
        summed. The clip itself is element-wise and needs no exchange.
      replicated: with ``axis_name``, the leaves that are whole on every device.

    Returns:
      An ``optax.GradientTransformation``. Bounds are rounded to each leaf's
      dtype. Its :class:`~jaxclip.ClipStats` holds the pre-clip global L2
      ``norm``, ``threshold`` = the largest absolute bound, ``clipped`` =
      whether any element lay outside its bounds and, with
      ``statistics="full"``, ``scale`` = post-clip norm / pre-clip norm and
      ``extra["clipped_fraction"]``, the fraction of elements clipped; with
      ``"light"``, ``scale`` = the largest element magnitude after clipping /
      before and ``extra["max_abs"]``, the largest magnitude before.

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
        dtype = _clip.stats_dtype(params)
        return initial_stats(dtype, extra={extra_name: jnp.zeros((), dtype)})

    def update_fn(updates: Any, state: ClipStats, params: Any = None) -> tuple[Any, ClipStats]:
        del params
        flat = _checks.float_leaves(updates, owner)
        paths = [path for path, _ in flat]
        leaves = [x for _, x in flat]
        his = _bound_leaves(owner, "max_value", max_value, updates, paths, leaves)
        if min_value is None:
            los = [-h for h in his]
        else:
            los = _bound_leaves(owner, "min_value", min_value, updates, paths, leaves)
        # rounded to each leaf's dtype once, for the clip and the statistics alike
        los = [lo.astype(x.dtype) for lo, x in zip(los, leaves)]
        his = [hi.astype(x.dtype) for hi, x in zip(his, leaves)]

        def clip(xs: Sequence[Array]) -> list[Array]:
            # xs: the leaves, or the leaves widened (exact: the bounds are rounded)
            return [
                jnp.clip(x, lo.astype(x.dtype), hi.astype(x.dtype))
                for x, lo, hi in zip(xs, los, his)
            ]

        clipped_leaves = clip(leaves)
        new_updates = _checks.replace_leaves(updates, paths, clipped_leaves)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_updates, updates)

        flags = where.flags(owner, paths, leaves)
        if mode == "full":
            before, finite = _norms.global_norm_and_finite(
                leaves, 2.0, axis_name=where.axis_name, replicated=flags
            )
            clipped, scale, extra = _full_value_stats(leaves, clip, before, flags, where)
        else:
            bounds = _Bounds(los, his, symmetric=min_value is None)
            before, finite, clipped, scale, extra = _light_value_stats(leaves, bounds, flags, where)
        stats = next_stats(
            state,
            norm=before,
            threshold=_largest_bound(max_value, min_value, before.dtype),
            scale=scale,
            clipped=clipped,
            finite=finite,
            extra={extra_name: extra},
        )
        return new_updates, stats

    return _clip.transformation(init_fn, update_fn)


class _Bounds(NamedTuple):
    """Per leaf, the lower and upper bounds of :func:`clip_by_value`."""

    los: list[Array]
    his: list[Array]
    symmetric: bool  # los are -his


def _full_value_stats(
    leaves: list[Array],
    clip: Callable[[Sequence[Array]], list[Array]],
    before: Array,
    flags: list[bool],
    where: _clip.Mapped,
) -> tuple[Array, Array, Array]:
    """Whether any element was clipped, post/pre-clip norm ratio, fraction clipped."""
    across = _norms.Across(where.axis_name)
    after, n_changed = _norms.norm_and_changes(
        leaves, clip, axis_name=where.axis_name, replicated=flags
    )
    size = sum(
        across.sum(jnp.asarray(sum(x.size for x, r in zip(leaves, flags) if r == flag)), flag)
        for flag in (False, True)
    )
    scale = jnp.where(before > 0, after / jnp.where(before > 0, before, 1), 1)
    return jnp.asarray(n_changed > 0), scale, n_changed / jnp.maximum(size, 1)


def _light_value_stats(
    leaves: list[Array], bounds: _Bounds, flags: list[bool], where: _clip.Mapped
) -> tuple[Array, Array, Array, Array, Array]:
    """The pre-clip norm, whether it is finite, whether any element was clipped, the
    post/pre-clip largest-magnitude ratio and that largest magnitude. With scalar
    bounds everything comes from one pass over the leaves (their extremes)."""
    kept = [i for i, x in enumerate(leaves) if x.size > 0]
    acc = _norms.accumulation_dtype([x.dtype for x in leaves])
    if not kept:
        zero = jnp.zeros((), acc)
        return zero, jnp.array(True), jnp.array(False), jnp.ones((), acc), zero
    leaves = [leaves[i] for i in kept]
    los = [bounds.los[i].astype(acc) for i in kept]
    his = [bounds.his[i].astype(acc) for i in kept]
    flags = [flags[i] for i in kept]
    if all(h.ndim == 0 for h in his + los):
        # The clip is monotone: a leaf's clipped values span [clip(min), clip(max)].
        measured = _norms.norm_and_extremes(
            leaves, magnitude=bounds.symmetric, axis_name=where.axis_name, replicated=flags
        )
        norm, finite = measured.norm, measured.finite
        # one vector each: thousands of scalar expressions would be fused into
        # one kernel that compiles in time growing with the square of its length
        top, bottom = _norms.ravel_all(measured.tops), _norms.ravel_all(measured.bottoms)
        lo, hi = jnp.stack(los), jnp.stack(his)
        outside = [jnp.any((top > hi) | (bottom < lo))]
        largest = [jnp.max(jnp.maximum(jnp.abs(top), jnp.abs(bottom)))]
        top, bottom = jnp.clip(top, lo, hi), jnp.clip(bottom, lo, hi)
        largest_after = [jnp.max(jnp.maximum(jnp.abs(top), jnp.abs(bottom)))]
    else:  # bounds that vary within a leaf: look at every element
        norm, finite = _norms.global_norm_and_finite(
            leaves, 2.0, axis_name=where.axis_name, replicated=flags
        )
        across = _norms.Across(where.axis_name)
        wide = [x.astype(acc) for x in leaves]
        outside = [
            across.max(jnp.any((x > h) | (x < lo)).astype(jnp.int32), r) > 0
            for x, lo, h, r in zip(wide, los, his, flags)
        ]
        largest = [across.max(jnp.max(jnp.abs(x)), r) for x, r in zip(wide, flags)]
        largest_after = [
            across.max(jnp.max(jnp.abs(jnp.clip(x, lo, h))), r)
            for x, lo, h, r in zip(wide, los, his, flags)
        ]
    before, after = jnp.max(jnp.stack(largest)), jnp.max(jnp.stack(largest_after))
    scale = jnp.where(before > 0, after / jnp.where(before > 0, before, 1), 1)
    return norm, finite, jnp.any(jnp.stack(outside)), scale, before


def _largest_bound(max_value: Any, min_value: Any, dtype: Any) -> Array:
    """The largest absolute value among the bounds."""
    bounds = jax.tree.leaves(max_value) + jax.tree.leaves(min_value)
    return _reduce(jnp.max, [jnp.abs(jnp.asarray(b)) for b in bounds], dtype, 0.0)


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
        if isinstance(leaf, bool) or not isinstance(
            leaf, (int, float, np.ndarray, np.generic, jax.Array)
        ):
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
            try:
                np.broadcast_shapes(b.shape, x.shape)
            except ValueError:
                raise ValueError(
                    f"{owner}: {name} at {_checks.path_str(path)} has shape {b.shape}, which "
                    f"does not broadcast to the gradient's shape {x.shape}."
                ) from None
            out.append(b)
        return out
    b = jnp.asarray(bound)
    if b.ndim != 0:
        raise ValueError(
            f"{owner}: {name} must be a scalar or a pytree matching the gradients, got an "
            f"array of shape {b.shape}."
        )
    return [b] * len(leaves)
