"""Robust p-norms of pytrees: global, per leaf and per slice.

Every norm accumulates in float32 (float64 for float64 leaves), whatever the
leaf dtype. The common case is one pass over the data: a sum of ``|x|^p``.
Only when that sum overflows, underflows, or is not finite does a
``lax.cond`` branch run a second computation, rescaled by the largest
magnitude, so that no finite input gets an infinite or zero norm unless the
true norm lies outside the accumulation dtype's range.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxclip import _checks

Array = jax.Array

# Below this a sum of |x|^p may have lost digits to subnormals or flushed to
# zero: smallest normal / machine epsilon of the accumulation dtype.
_SMALLEST_SAFE_SUM = {
    np.dtype(np.float32): 2.0**-103,
    np.dtype(np.float64): 2.0**-970,
}


# Leaves up to this many elements are packed into one vector before a global
# reduction once there are at least _PACK_COUNT of them: thousands of tiny
# reductions cost XLA minutes to compile, one concatenation of them seconds,
# and copying small leaves costs next to nothing at run time.
_PACK_LIMIT = 1 << 14
_PACK_COUNT = 16


def accumulation_dtype(dtypes: Sequence[Any]) -> np.dtype:
    """float64 if any of ``dtypes`` is float64, else float32."""
    if any(np.dtype(d) == np.float64 for d in dtypes):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def _acc(x: Array) -> np.dtype:
    return accumulation_dtype([x.dtype])


def _pack_small(leaves: Sequence[Array], dtype: Any = None) -> list[Array]:
    """Big leaves as they are, small ones raveled into one vector per dtype.

    Small leaves are cast to ``dtype``, or by default to their accumulation dtype.
    """
    small = [x for x in leaves if x.size <= _PACK_LIMIT]
    if len(small) < _PACK_COUNT:
        return list(leaves)
    groups: dict[np.dtype, list[Array]] = {}
    for x in small:
        target = np.dtype(dtype) if dtype is not None else _acc(x)
        groups.setdefault(target, []).append(jnp.ravel(x).astype(target))
    packed = [jnp.concatenate(group) for group in groups.values()]
    return [x for x in leaves if x.size > _PACK_LIMIT] + packed


def count_true(flags: Sequence[Array]) -> Array:
    """How many elements of the boolean arrays ``flags`` are True (int32)."""
    return sum(
        (jnp.sum(f, dtype=jnp.int32) for f in _pack_small(flags, jnp.bool_)),
        jnp.zeros((), jnp.int32),
    )


def _magnitude(x: Array, sanitize: bool) -> Array:
    a = jnp.abs(x.astype(_acc(x)))
    if sanitize:
        a = jnp.where(jnp.isfinite(a), a, 0)
    return a


def _power(x: Array, p: float, sanitize: bool, divisor: Array | None = None) -> Array:
    """Elementwise ``(|x| / divisor)^p`` in the accumulation dtype."""
    if p == 2 and divisor is None and not sanitize:
        xa = x.astype(_acc(x))
        return xa * xa
    a = _magnitude(x, sanitize)
    if divisor is not None:
        a = a / divisor
    if p == 1:
        return a
    if p == 2:
        return a * a
    return a**p


def _root(s: Array, p: float) -> Array:
    """``s^(1/p)`` with a finite gradient at ``s == 0``; NaN and inf pass through."""
    if p == 1:
        return s
    zero = s == 0
    safe = jnp.where(zero, jnp.ones_like(s), s)
    r = jnp.sqrt(safe) if p == 2 else safe ** (1.0 / p)
    return jnp.where(zero, jnp.zeros_like(s), r)


def _max_abs(x: Array, axis: tuple[int, ...] | None, sanitize: bool) -> Array:
    keep = axis is not None
    return jnp.max(_magnitude(x, sanitize), axis=axis, keepdims=keep, initial=0)


def _rescaled(
    leaves: Sequence[Array], p: float, maxima: Sequence[Array], axes: Sequence[Any], sanitize: bool
) -> list[Array]:
    """``sum((|x| / m)^p)`` per leaf (or slice), with ``m`` the largest magnitude."""
    out = []
    for x, m, axis in zip(leaves, maxima, axes):
        divisor = safe_divisor(m)
        keep = axis is not None
        out.append(jnp.sum(_power(x, p, sanitize, divisor), axis=axis, keepdims=keep))
    return out


def safe_divisor(m: Array) -> Array:
    """``m`` where it is finite and positive, else 1; held constant under ``jax.grad``.

    ``m * root(sum((|x| / m)^p))`` does not depend on ``m``, so its gradient
    through ``m`` is zero; computing it would square ``m`` and overflow.
    """
    m = lax.stop_gradient(m)
    return jnp.where(jnp.isfinite(m) & (m > 0), m, jnp.ones_like(m))


def _needs_rescue(s: Array, p: float, check_tiny: bool) -> Array:
    bad = ~jnp.isfinite(s)
    if p != 1 and check_tiny:
        bad = bad | (s < _SMALLEST_SAFE_SUM[np.dtype(s.dtype)])
    return jnp.any(bad)


def global_norm_and_finite(
    leaves: Sequence[Array], p: float, *, sanitize: bool = False
) -> tuple[Array, Array]:
    """The p-norm of all ``leaves`` together, and whether it is finite.

    Args:
      leaves: floating-point arrays.
      p: 1, 2, ``math.inf`` or a real p >= 1.
      sanitize: if True, non-finite elements count as zero in the norm (the
        returned flag still reports whether the raw gradient was finite).

    Returns:
      ``(norm, finite)``: scalars of the accumulation dtype and bool. ``finite``
      is False when an element is NaN or inf, or when the true norm overflows.
    """
    leaves = _pack_small([x for x in leaves if x.size > 0])
    acc = accumulation_dtype([x.dtype for x in leaves])
    if not leaves:
        return jnp.zeros((), acc), jnp.array(True)

    if p == math.inf:
        raw = _combine_max([jnp.max(jnp.abs(x), initial=0).astype(acc) for x in leaves])
        finite = jnp.isfinite(raw)
        if not sanitize:
            return raw, finite
        norm = lax.cond(
            finite,
            lambda: raw,
            lambda: _combine_max([_max_abs(x, None, True).astype(acc) for x in leaves]),
        )
        return norm, finite

    if p not in (1, 2):
        per_leaf = slice_norms(leaves, p, [None] * len(leaves), sanitize=sanitize)
        norm = combine_norms([n.astype(acc) for n in per_leaf.norms], p)
        return norm, all_true(per_leaf.finite) & jnp.isfinite(norm)

    total = sum(jnp.sum(_power(x, p, False)).astype(acc) for x in leaves)

    def plain() -> tuple[Array, Array]:
        norm = _root(total, p)
        return norm, jnp.isfinite(norm)

    def rescue() -> tuple[Array, Array]:
        # A second look, rescaled by the largest magnitude: |x| / m <= 1, so
        # the sum neither overflows nor underflows.
        raw_max = _combine_max([_max_abs(x, None, False).astype(acc) for x in leaves])
        finite = jnp.isfinite(raw_max)
        if sanitize:
            m = _combine_max([_max_abs(x, None, True).astype(acc) for x in leaves])
        else:
            m = raw_max
        parts = _rescaled(leaves, p, [m] * len(leaves), [None] * len(leaves), sanitize)
        norm = lax.stop_gradient(m) * _root(sum(s.astype(acc) for s in parts), p)
        return norm, finite & jnp.isfinite(norm)

    return lax.cond(_needs_rescue(total, p, True), rescue, plain)


def all_true(flags: Sequence[Array]) -> Array:
    """Whether every element of every array in ``flags`` is True (True if empty)."""
    return jnp.all(jnp.stack([jnp.all(f) for f in flags])) if flags else jnp.array(True)


def combine_norms(norms: Sequence[Array], p: float) -> Array:
    """The p-norm of all the values in ``norms`` (norms of disjoint parts of a tree)."""
    flat = [jnp.ravel(n) for n in norms if n.size]
    if not flat:
        return jnp.zeros((), norms[0].dtype if norms else jnp.float32)
    n = jnp.concatenate(flat)
    if p == math.inf:
        return jnp.max(n)
    return _combine_norms(n, p)


def _combine_norms(n: Array, p: float) -> Array:
    """The p-norm of a vector of per-leaf p-norms, as PyTorch's ``clip_grad_norm_``.

    Direct (``(sum n^p)^(1/p)``) when that sum is in range, rescaled otherwise.
    """
    if n.size == 1:
        return n[0]
    direct_sum = jnp.sum(n**p)

    def rescaled() -> Array:
        m = lax.stop_gradient(jnp.max(n))
        return m * _root(jnp.sum((n / safe_divisor(m)) ** p), p)

    in_range = jnp.isfinite(direct_sum) & (direct_sum >= _SMALLEST_SAFE_SUM[np.dtype(n.dtype)])
    return lax.cond(in_range | jnp.isnan(direct_sum), lambda: _root(direct_sum, p), rescaled)


def _combine_max(values: Sequence[Array]) -> Array:
    out = values[0]
    for v in values[1:]:
        out = jnp.maximum(out, v)
    return out


class SliceNorms(NamedTuple):
    """Norms computed on a few work arrays, each standing for one or more leaves.

    Small leaves of equal shape are stacked and reduced together (see
    :func:`slice_norms`); elementwise work on the norms is cheapest on these
    arrays, and ``split`` hands out one result per original leaf at the end.
    """

    norms: list[Array]
    finite: list[Array]
    split: Callable[[Sequence[Array]], list[Array]]


def slice_norms(
    leaves: Sequence[Array],
    p: float,
    axes: Sequence[tuple[int, ...] | None],
    *,
    sanitize: bool = False,
    rescue_tiny: bool = True,
) -> SliceNorms:
    """Norms of each leaf, or of each slice along ``axes`` (kept as size-1 dims).

    Args:
      leaves: floating-point arrays.
      p: 1, 2, ``math.inf`` or a real p >= 1.
      axes: per leaf, the axes to reduce (None: the whole leaf, giving a scalar).
      sanitize: if True, non-finite elements count as zero.
      rescue_tiny: if False, sums that underflow are not recomputed (for callers
        whose result cannot depend on norms below ~1e-19).

    Returns:
      The norms and finiteness flags on the work arrays, and ``split``: applied
      to them (or to anything computed elementwise from them) it gives, per
      leaf, a scalar or an array broadcastable to the leaf.
    """
    work, work_axes, split = _stack_alike(leaves, axes)
    norms, finite = _slice_norms(work, p, work_axes, sanitize, rescue_tiny)
    return SliceNorms(norms, finite, split)


def per_leaf_count(leaves: Sequence[Array], predicate: Callable[[Array], Array]) -> list[Array]:
    """Per leaf, how many elements satisfy ``predicate`` (int32 scalars)."""
    work, axes, split = _stack_alike(leaves, [None] * len(leaves))
    counts = [
        jnp.sum(predicate(w), axis=a, keepdims=a is not None, dtype=jnp.int32)
        for w, a in zip(work, axes)
    ]
    return split(counts)


def _stack_alike(
    leaves: Sequence[Array], axes: Sequence[tuple[int, ...] | None]
) -> tuple[list[Array], list[tuple[int, ...] | None], Any]:
    """Stacks small leaves of equal shape, accumulation dtype and axes, to reduce as one.

    The grouping depends only on those, so two trees of equal shapes (say,
    gradients and parameters) give work arrays of equal shapes.

    Returns the arrays to reduce, their axes, and ``split``, which maps results
    on those arrays back to one result per input leaf.
    """
    groups: dict[Any, list[int]] = {}
    for i, (x, a) in enumerate(zip(leaves, axes)):
        if 0 < x.size <= _PACK_LIMIT:
            groups.setdefault((x.shape, _acc(x), a), []).append(i)
    groups = {k: idx for k, idx in groups.items() if len(idx) > 1}
    if sum(len(idx) for idx in groups.values()) < _PACK_COUNT:
        return list(leaves), list(axes), lambda results: list(results)

    work: list[Array] = []
    work_axes: list[tuple[int, ...] | None] = []
    origins: list[tuple[list[int], str]] = []  # leaf indices; "leaf", "whole" or "slices"
    for (shape, _, a), idx in groups.items():
        work.append(jnp.stack([leaves[i] for i in idx]))
        work_axes.append(tuple(range(1, len(shape) + 1)) if a is None else tuple(d + 1 for d in a))
        origins.append((idx, "whole" if a is None else "slices"))
    stacked = {i for idx in groups.values() for i in idx}
    for i, (x, a) in enumerate(zip(leaves, axes)):
        if i not in stacked:
            work.append(x)
            work_axes.append(a)
            origins.append(([i], "leaf"))

    def split(results: Sequence[Array]) -> list[Array]:
        out: list[Any] = [None] * len(leaves)
        for r, (idx, kind) in zip(results, origins):
            if kind == "leaf":
                out[idx[0]] = r
            else:
                for j, i in enumerate(idx):
                    out[i] = r[j].reshape(()) if kind == "whole" else r[j]
        return out

    return work, work_axes, split


def _slice_norms(
    leaves: Sequence[Array],
    p: float,
    axes: Sequence[tuple[int, ...] | None],
    sanitize: bool,
    rescue_tiny: bool,
) -> tuple[list[Array], list[Array]]:
    if not leaves:
        return [], []
    if p == math.inf:
        raw = [_max_abs(x, a, False) for x, a in zip(leaves, axes)]
        finite = [jnp.isfinite(m) for m in raw]
        if not sanitize:
            return raw, finite
        norms = lax.cond(
            all_true(finite),
            lambda: raw,
            lambda: [_max_abs(x, a, True) for x, a in zip(leaves, axes)],
        )
        return norms, finite

    sums = [
        jnp.sum(_power(x, p, False), axis=a, keepdims=a is not None) for x, a in zip(leaves, axes)
    ]
    checks = [_needs_rescue(s, p, rescue_tiny) for s, x in zip(sums, leaves) if x.size > 0]
    need = jnp.any(jnp.stack(checks)) if checks else jnp.array(False)

    def plain() -> tuple[list[Array], list[Array]]:
        norms = [_root(s, p) for s in sums]
        return norms, [jnp.isfinite(n) for n in norms]

    def rescue() -> tuple[list[Array], list[Array]]:
        raw_max = [_max_abs(x, a, False) for x, a in zip(leaves, axes)]
        maxima = [_max_abs(x, a, True) for x, a in zip(leaves, axes)] if sanitize else raw_max
        parts = _rescaled(leaves, p, maxima, axes, sanitize)
        norms = [lax.stop_gradient(m) * _root(s, p) for m, s in zip(maxima, parts)]
        finite = [jnp.isfinite(m) & jnp.isfinite(n) for m, n in zip(raw_max, norms)]
        return norms, finite

    return lax.cond(need, rescue, plain)


def normalize_axes(
    owner: str, paths: Sequence[Any], leaves: Sequence[Array], axis: tuple[int, ...] | None
) -> list[tuple[int, ...] | None]:
    """Per leaf, ``axis`` made non-negative; raises if a leaf lacks those axes."""
    if axis is None:
        return [None] * len(leaves)
    out: list[tuple[int, ...] | None] = []
    for path, x in zip(paths, leaves):
        resolved = []
        for a in axis:
            if not -x.ndim <= a < x.ndim:
                raise ValueError(
                    f"{owner}: axis={axis} does not fit leaf {_checks.path_str(path)} of shape "
                    f"{x.shape}. Choose axes every leaf has, or clip such leaves separately "
                    "with optax.partition."
                )
            resolved.append(a % x.ndim)
        if len(set(resolved)) != len(resolved):
            raise ValueError(
                f"{owner}: axis={axis} names the same axis twice for leaf "
                f"{_checks.path_str(path)} of shape {x.shape}."
            )
        out.append(tuple(sorted(resolved)))
    return out


def global_norm(tree: Any, ord: float | str | None = 2) -> Array:
    """The p-norm of all the elements of a pytree, robust to overflow and underflow.

    Accumulates in float32 (float64 for float64 leaves) whatever the leaf
    dtypes, so float16 and bfloat16 trees do not overflow or lose precision,
    and rescues sums that leave the float32 range in a second pass that only
    runs when it is needed. Usable under ``jax.jit``; ``jax.grad`` through it
    is finite, also at zero.

    Args:
      tree: a pytree of floating-point arrays (``None`` leaves are ignored).
      ord: the order: 2 (default; None also means 2), 1, ``inf`` or any real
        p >= 1.

    Returns:
      A scalar of the accumulation dtype; 0 for an empty tree.

    Example:
      >>> import jax.numpy as jnp, jaxclip
      >>> float(jaxclip.global_norm({"a": jnp.array([3.0]), "b": jnp.array([4.0])}))
      5.0
      >>> float(jaxclip.global_norm([jnp.array([300.0, 400.0], jnp.float16)]))
      500.0
    """
    p = _checks.check_order("jaxclip.global_norm", ord)
    leaves = [x for _, x in _checks.float_leaves(tree, "jaxclip.global_norm", "tree")]
    return global_norm_and_finite(leaves, p)[0]


def leaf_norms(
    tree: Any,
    ord: float | str | None = 2,
    axis: int | Sequence[int] | None = None,
    keepdims: bool = False,
) -> Any:
    """The p-norm of each leaf, or of each slice of each leaf along ``axis``.

    Same numerics as :func:`global_norm`.

    Args:
      tree: a pytree of floating-point arrays.
      ord: 2 (default; None also means 2), 1, ``inf`` or any real p >= 1.
      axis: None for one norm per leaf, or the axes to reduce (like
        ``tf.clip_by_norm(axes=)``); negative axes count from the end.
      keepdims: keep the reduced axes as size-1 dimensions.

    Returns:
      A pytree of the same structure holding the norms (accumulation dtype).

    Example:
      >>> import jax.numpy as jnp, jaxclip
      >>> norms = jaxclip.leaf_norms({"w": jnp.array([[3.0, 0.0], [4.0, 1.0]])}, axis=0)
      >>> norms["w"].tolist()
      [5.0, 1.0]
    """
    owner = "jaxclip.leaf_norms"
    p = _checks.check_order(owner, ord)
    axis_t = _checks.check_axis(owner, axis)
    flat = _checks.float_leaves(tree, owner, "tree")
    paths = [path for path, _ in flat]
    leaves = [x for _, x in flat]
    axes = normalize_axes(owner, paths, leaves, axis_t)
    result = slice_norms(leaves, p, axes)
    norms = result.split(result.norms)
    if not keepdims:
        norms = [jnp.squeeze(n, a) if a is not None else n for n, a in zip(norms, axes)]
    return _checks.replace_leaves(tree, paths, norms)
