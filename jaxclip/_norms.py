"""Robust p-norms of pytrees: global, per leaf and per slice.

Every norm accumulates in float32 (float64 for float64 leaves), whatever the
leaf dtype. The common case is one pass over the data: a sum of ``|x|^p``.
Only when that sum overflows, underflows, or is not finite does a
``lax.cond`` branch run a second pass, rescaled by a power of two (chosen from
the sum itself for p = 1 and 2, else from the largest magnitude, one pass
more), so that no finite input gets an infinite or zero norm unless the true
norm lies outside the accumulation dtype's range.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
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


_SIGNED_INT = {np.dtype(np.float32): jnp.int32, np.dtype(np.float64): jnp.int64}

# Small leaves of the same shape and layout are stacked and reduced together
# once there are at least _PACK_COUNT of them, by the per-leaf and per-unit
# norms and by every rescue branch: one reduction of a stack compiles in less
# time than hundreds of them. XLA on CPU copies the stack on every call (888
# leaves of 128 x 128: 42 ms, against 7 ms reduced one by one), so the global
# norms' common case reduces each leaf where it lies.
_PACK_LIMIT = 1 << 14
_PACK_COUNT = 16

# Arrays of at least this many elements are held apart in a rescue (_rescaled_norm).
_APART_SIZE = 1 << 18


def accumulation_dtype(dtypes: Sequence[Any]) -> np.dtype:
    """float64 if any of ``dtypes`` is float64, else float32."""
    if any(np.dtype(d) == np.float64 for d in dtypes):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def _acc(x: Array) -> np.dtype:
    return accumulation_dtype([x.dtype])


def _magnitude(x: Array, sanitize: bool, dtype: Any = None) -> Array:
    a = jnp.abs(x.astype(_acc(x) if dtype is None else dtype))
    if sanitize:
        a = jnp.where(jnp.isfinite(a), a, 0)
    return a


def _power(
    x: Array, p: float, sanitize: bool, scale: Scale | None = None, dtype: Any = None
) -> Array:
    """Elementwise ``(|x| / u)^p`` (u from ``scale``, else 1) in ``dtype`` (default: x's
    accumulation dtype)."""
    dtype = _acc(x) if dtype is None else dtype
    if x.dtype != dtype:
        # Keeps the widening cast inside this reduction: otherwise XLA shares it
        # with the rescale that also reads x and writes a float32 copy of the tree.
        x = lax.optimization_barrier(x)
    # squares need no |x|: one shared with a maximum of |x| would be written out
    a = x.astype(dtype) if p == 2 else _magnitude(x, False, dtype)
    if sanitize:
        a = jnp.where(jnp.isfinite(a), a, 0)
    if scale is not None:
        a = a * scale.shrink
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


class Scale(NamedTuple):
    """A power of two u near a magnitude m, to rescale by m exactly.

    ``m < u <= 2 m`` where m is finite, positive and below ``2^(maxexp - 2)``
    (2^126 in float32); ``u = 2^(maxexp - 2)`` above that (so ``|x| / u < 4``),
    and ``u = 1`` where m is zero or not finite. Held constant under
    ``jax.grad`` (``u * root(sum((|x| / u)^p))`` does not depend on u, and its
    gradient through u would square u and overflow). u and 1 / u are both
    normal floats: the reciprocal of an m above 2^126 is subnormal in float32,
    and XLA, which turns ``x / m`` into ``x * (1 / m)``, runs on CPU with
    subnormals flushed to zero.
    """

    shrink: Array  # 1 / u
    grow: Array  # u

    @classmethod
    def near(cls, m: Array) -> Scale:
        m = lax.stop_gradient(m)
        info = jnp.finfo(m.dtype)
        ok = jnp.isfinite(m) & (m > 0)
        bits = lax.bitcast_convert_type(m, _SIGNED_INT[np.dtype(m.dtype)])
        biased = (bits >> info.nmant) & (2 * info.maxexp - 1)
        top = info.maxexp - 2
        exponent = jnp.where(ok, jnp.clip(biased - top, -top, top), 0)  # m < 2^exponent
        return cls(_power_of_two(-exponent, m.dtype), _power_of_two(exponent, m.dtype))


def _redone_by(s: Array, p: float, sanitize: bool) -> Scale | None:
    """Per sum ``s`` of ``|x|^p``, a power of two u with which one more pass over x
    redoes the sum exactly, chosen from the sum alone, or None where the largest
    magnitude is needed (p other than 1 and 2; non-finite elements left out, since
    then the raw sum does not say which way the rest leaves the range).

    u = 2^(maxexp / 2 + 2) (2^66 in float32) where s overflowed or is not
    finite: ``(|x| / u)^2`` stays finite for every finite x, and the elements
    it loses below the smallest normal (|x| < 8) weigh nothing against a sum
    above the float range; the sum again overflows only where the norm itself
    does. u = 2^-(|minexp| / 2) (2^-63) where s is below _SMALLEST_SAFE_SUM:
    every element is then below 2^-51, and ``(|x| / u)^2`` is a normal number
    for every normal x. u = 1 elsewhere.
    """
    if sanitize or p not in (1, 2):
        return None
    s = lax.stop_gradient(s)
    info = jnp.finfo(s.dtype)
    k = jnp.where(~jnp.isfinite(s), info.maxexp // 2 + 2, 0)
    if p == 2:
        k = jnp.where(s < _SMALLEST_SAFE_SUM[np.dtype(s.dtype)], info.minexp // 2, k)
    return Scale(_power_of_two(-k, s.dtype), _power_of_two(k, s.dtype))


def _rescue_scale(
    s: Array, p: float, sanitize: bool, maxima: Callable[[bool], Array]
) -> tuple[Scale, Array]:
    """The power of two to redo the sums ``s`` by (:func:`_redone_by`, else near the
    largest magnitudes ``maxima(sanitized)``, a pass of their own), and whether
    the raw elements are finite as far as that pass tells (else True: a redone
    sum of non-finite elements is not finite itself)."""
    scale = _redone_by(s, p, sanitize)
    if scale is not None:
        return scale, jnp.array(True)
    raw = maxima(False)
    return Scale.near(maxima(True) if sanitize else raw), jnp.isfinite(raw)


def _power_of_two(k: Array, dtype: Any) -> Array:
    """``2^k`` for integer k within the normal exponents of ``dtype``."""
    info = jnp.finfo(dtype)
    int_type = _SIGNED_INT[np.dtype(dtype)]
    return lax.bitcast_convert_type((k + info.maxexp - 1).astype(int_type) << info.nmant, dtype)


class Across(NamedTuple):
    """Completes partial reductions across mapped axes (``shard_map``, ``pmap``).

    A leaf that is *sharded* over ``axis_name`` holds a disjoint piece of the
    gradient on each device: its partial sums are added up (``psum``) and its
    partial maxima compared (``pmax``). A *replicated* leaf is whole on every
    device and is counted once. Without ``axis_name`` nothing is exchanged.
    """

    axis_name: Any = None

    def sum(self, x: Array, replicated: bool) -> Array:
        return x if self.axis_name is None or replicated else lax.psum(x, self.axis_name)

    def max(self, x: Array, replicated: bool) -> Array:
        return x if self.axis_name is None or replicated else lax.pmax(x, self.axis_name)


def _needs_rescue(s: Array, p: float, check_tiny: bool, tops: Array | None = None) -> Array:
    """Whether a sum in ``s`` is not finite or (``check_tiny``) may have underflowed:
    with ``tops``, the largest magnitudes of the sums' units, a unit whose elements
    are all zero needs no rescue (zero biases, unused embedding rows)."""
    bad = ~jnp.isfinite(s)
    if p != 1 and check_tiny:
        tiny = s < _SMALLEST_SAFE_SUM[np.dtype(s.dtype)]
        bad = bad | (tiny if tops is None else tiny & (tops > 0))
    return jnp.any(bad)


def _maxima(
    work: Sequence[tuple[Array, bool]], sanitized: bool, across: Across, acc: Any
) -> list[Array]:
    """``max |x|`` of each array (non-finite elements left out if ``sanitized``)."""
    return [across.max(_max_abs(x, None, sanitized).astype(acc), r) for x, r in work]


def _largest(scalars: Sequence[Array]) -> Array:
    """The largest of ``scalars`` (NaN if one is NaN). Found by ``argmax``: XLA
    copies a chain of maxima into every fusion that reads its result, and its
    readers here are many."""
    if len(scalars) == 1:
        return scalars[0]
    values = jnp.stack(scalars)
    return values[jnp.argmax(values)]


def _rescaled_norm(
    work: Sequence[tuple[Array, bool]],
    p: float,
    sanitize: bool,
    across: Across,
    acc: Any,
    total: Array,
) -> tuple[Array, Array]:
    """The p-norm of the arrays in ``work`` together, where their plain sum of
    powers, ``total``, left its range or is not finite; and whether it is finite.

    The arrays are read again, rescaled by a power of two u (see
    :func:`_redone_by`; where that needs it, u is near their largest magnitude,
    :class:`Scale`, found in a pass of its own). Each large array meets 1 / u
    through an optimization barrier: otherwise it is broadcast once per shape
    and shared by the arrays of that shape, and XLA writes the broadcast out, a
    buffer that a compiled function on CPU allocates on every call, rescue or
    not. (Below _APART_SIZE elements such a buffer is small, and a barrier per
    array would cost compile time.)
    """
    scale, finite = _rescue_scale(
        total, p, sanitize, lambda sanitized: _largest(_maxima(work, sanitized, across, acc))
    )
    parts = []
    for x, r in work:
        apart = scale
        if x.size >= _APART_SIZE:
            x, shrink = lax.optimization_barrier((x, scale.shrink))
            apart = scale._replace(shrink=shrink)
        parts.append(across.sum(jnp.sum(_power(x, p, sanitize, apart, acc)), r))
    norm = _root(sum_of(parts), p) * scale.grow
    return norm, finite & jnp.isfinite(norm)


def global_norm_and_finite(
    leaves: Sequence[Array],
    p: float,
    *,
    sanitize: bool = False,
    axis_name: Any = None,
    replicated: Sequence[bool] | None = None,
) -> tuple[Array, Array]:
    """The p-norm of all ``leaves`` together, and whether it is finite.

    Args:
      leaves: floating-point arrays.
      p: 1, 2, ``math.inf`` or a real p >= 1.
      sanitize: if True, non-finite elements count as zero in the norm (the
        returned flag still reports whether the raw gradient was finite).
      axis_name: mapped axes the leaves are sharded over (see :class:`Across`).
      replicated: per leaf, whether it is whole on every device (default: no).

    Returns:
      ``(norm, finite)``: scalars of the accumulation dtype and bool. ``finite``
      is False when an element is NaN or inf, or when the true norm overflows.
    """
    across = Across(axis_name)
    flags = list(replicated) if replicated is not None else [False] * len(leaves)
    work = [(x, r) for x, r in zip(leaves, flags) if x.size > 0]
    acc = accumulation_dtype([x.dtype for x, _ in work])
    if not work:
        return jnp.zeros((), acc), jnp.array(True)

    if p == math.inf:
        raw = max_of(_maxima(work, False, across, acc))
        finite = jnp.isfinite(raw)
        if not sanitize:
            return raw, finite

        def sanitized() -> Array:
            return max_of(_maxima(work, True, across, acc))

        return lax.cond(finite, lambda: raw, sanitized), finite

    if p not in (1, 2):
        per_leaf = slice_norms(
            [x for x, _ in work],
            p,
            [None] * len(work),
            sanitize=sanitize,
            axis_name=axis_name,
            replicated=[r for _, r in work],
        )
        norm = combine_norms([n.astype(acc) for n in per_leaf.norms], p)
        return norm, all_true(per_leaf.finite) & jnp.isfinite(norm)

    # in the accumulation dtype of the whole tree: the squares of float32 leaves
    # beside float64 ones must not underflow in float32
    total = sum_of([across.sum(jnp.sum(_power(x, p, False, dtype=acc)), r) for x, r in work])

    def plain() -> tuple[Array, Array]:
        norm = _root(total, p)
        return norm, jnp.isfinite(norm)

    def rescue() -> tuple[Array, Array]:
        # stacked here only: the copy costs more than the reductions it saves
        # (2000 transformer-like leaves: 82 ms a clip, against Optax's 55), but
        # the branch rarely runs and compiles faster so
        packed = _stack_alike([x for x, _ in work], [None] * len(work), [r for _, r in work])
        stacked = list(zip(packed.work, packed.flags))
        return _rescaled_norm(stacked, p, sanitize, across, acc, total)

    return lax.cond(_needs_rescue(total, p, True), rescue, plain)


def norm_and_changes(
    before: Sequence[Array],
    transform: Callable[[Sequence[Array]], list[Array]],
    *,
    axis_name: Any = None,
    replicated: Sequence[bool] | None = None,
) -> tuple[Array, Array]:
    """The global L2 norm of ``transform(before)``, and how many elements it changed.

    ``transform`` maps a list of arrays to arrays of the same shapes,
    elementwise. It is given ``before`` widened to the accumulation dtype and
    must return what it would return for ``before``, widened (true of a clip
    whose bounds are rounded to each leaf's dtype), so that the statistics read
    the leaves alone, not the transformed tree, which XLA would then write to
    memory. NaN elements of ``before`` never count as changed. Both results come
    from one variadic reduction per work array, so each array is read once: as
    separate reductions, XLA on CPU writes the mask (and often the squares) to
    memory first, three passes more over the tree.

    Returns:
      ``(norm, count)``: a scalar of the accumulation dtype (rescued like
      :func:`global_norm_and_finite` when the sum leaves its range) and int32.
    """
    across = Across(axis_name)
    flags = list(replicated) if replicated is not None else [False] * len(before)
    kept = [i for i, x in enumerate(before) if x.size > 0]
    acc = accumulation_dtype([before[i].dtype for i in kept])
    if not kept:
        return jnp.zeros((), acc), jnp.zeros((), jnp.int32)
    flags = [flags[i] for i in kept]
    wide = [x.astype(acc) for x in before]
    after = transform(wide)

    # per leaf (a stack of alike leaves would be a copy of them: see the rescue
    # of global_norm_and_finite), added up per replication flag
    partial: dict[bool, tuple[list[Array], list[Array]]] = {}
    for i, r in zip(kept, flags):
        squares, changes = _squares_and_changes(wide[i], after[i])
        partial.setdefault(r, ([], []))
        partial[r][0].append(squares)
        partial[r][1].append(changes)
    total = sum_of([across.sum(sum_of(squares), r) for r, (squares, _) in partial.items()])
    count = sum_of([across.sum(sum_of(changes), r) for r, (_, changes) in partial.items()])

    def rescue() -> Array:
        # transformed again here: the branch's operands are then the leaves,
        # already in memory, not a transformed copy of the tree
        after = transform([x.astype(acc) for x in before])
        again = _stack_alike([after[i] for i in kept], [None] * len(kept), flags)
        work = list(zip(again.work, again.flags))
        return _rescaled_norm(work, 2.0, False, across, acc, total)[0]

    norm = lax.cond(_needs_rescue(total, 2.0, True), rescue, lambda: _root(total, 2.0))
    return norm, count


def _add_pairs(a: tuple[Array, Array], b: tuple[Array, Array]) -> tuple[Array, Array]:
    return a[0] + b[0], a[1] + b[1]


def _squares_and_changes(x: Array, y: Array) -> tuple[Array, Array]:
    """``sum(y^2)`` and the int32 count of ``y != x`` (NaN elements of x not counted)."""
    changed = ((y != x) & ~jnp.isnan(x)).astype(jnp.int32)
    if _layout(x) != "local":
        # XLA's partitioner would gather the partial results of a variadic
        # reduction across devices; two plain sums become scalar all-reduces.
        return jnp.sum(y * y), jnp.sum(changed, dtype=jnp.int32)
    zeros = (jnp.zeros((), y.dtype), jnp.zeros((), jnp.int32))
    count = functools.partial(jnp.sum, dtype=jnp.int32)
    total, n_changed = _reduce_in_rows((y * y, changed), zeros, _add_pairs, (jnp.sum, count))
    return total, n_changed


# A variadic reduction that XLA on CPU does not hand to its library kernels adds
# up the elements of each row in order; over millions of elements its float
# sums then lose up to 1e-3 of their value. Rows of _ROW elements keep that
# error at the level of a plain sum's, at the same speed.
_ROW = 1024


def _reduce_in_rows(
    operands: tuple[Array, ...],
    inits: tuple[Array, ...],
    combine: Callable[..., tuple[Array, ...]],
    finish: tuple[Callable[[Array], Array], ...],
) -> tuple[Array, ...]:
    """``lax.reduce`` of same-shaped ``operands`` over all their elements, in rows of
    _ROW elements; ``finish`` holds, per operand, the reduction of its row results
    (``jnp.sum`` for a sum, ``jnp.max`` for a maximum...)."""
    flat = [x.reshape(-1) for x in operands]
    size = flat[0].size
    rows = size // _ROW
    if rows <= 1:
        return tuple(lax.reduce(tuple(flat), inits, combine, (0,)))
    body = tuple(x[: rows * _ROW].reshape(rows, _ROW) for x in flat)
    per_row = lax.reduce(body, inits, combine, (1,))
    result = tuple(reduce(r) for reduce, r in zip(finish, per_row))
    if size % _ROW:
        tail = lax.reduce(tuple(x[rows * _ROW :] for x in flat), inits, combine, (0,))
        result = tuple(combine(result, tail))
    return result


def add_all(arrays: Sequence[Array]) -> Array:
    """The sum of a non-empty sequence of arrays (typed, unlike ``sum``)."""
    total = arrays[0]
    for a in arrays[1:]:
        total = total + a
    return total


def ravel_all(arrays: Sequence[Array]) -> Array:
    """The elements of a non-empty sequence of arrays of one dtype, in one vector.

    The vector is held apart from what reads it: XLA rewrites a reduction of a
    concatenation into a chain of one operation per piece, fused into a single
    kernel that LLVM compiles in time growing with the square of its length (a
    program reducing 2000 scalars compiled in 3.8 s so, in 1.6 s with the
    vector held apart).
    """
    if len(arrays) == 1:
        return jnp.ravel(arrays[0])
    return lax.optimization_barrier(jnp.concatenate([jnp.ravel(a) for a in arrays]))


def _reduce_all(reduce: Callable[[Array], Array], arrays: Sequence[Array]) -> Array:
    # one reduction of all the elements, not one per array (each costs XLA compile
    # time), unless the arrays are sharded: then concatenating them would move data
    if not all(is_local(a) for a in arrays):
        arrays = [reduce(a) for a in arrays]
    return reduce(ravel_all(arrays))


def any_true(flags: Sequence[Array]) -> Array:
    """Whether some element of some array in ``flags`` is True (False if empty)."""
    return _reduce_all(jnp.any, flags) if flags else jnp.array(False)


def all_true(flags: Sequence[Array]) -> Array:
    """Whether every element of every array in ``flags`` is True (True if empty)."""
    return _reduce_all(jnp.all, flags) if flags else jnp.array(True)


# Up to this many scalars are added one after another (see sum_of).
_CHAIN_LIMIT = 64


def sum_of(arrays: Sequence[Array]) -> Array:
    """The sum of the elements of a non-empty sequence of arrays of one dtype.

    Up to _CHAIN_LIMIT scalars are added in order, as PyTorch adds per-tensor
    results and whatever the sharding (a reduction of a vector is rounded
    differently on some XLA versions, and under some shardings); more are reduced
    as one vector held apart (see :func:`ravel_all`).
    """
    if len(arrays) <= _CHAIN_LIMIT and all(a.ndim == 0 for a in arrays):
        return add_all(arrays)
    return _reduce_all(jnp.sum, arrays)


def max_of(arrays: Sequence[Array]) -> Array:
    """The largest element of a non-empty sequence of arrays of one dtype."""
    return _reduce_all(jnp.max, arrays)


def combine_norms(norms: Sequence[Array], p: float) -> Array:
    """The p-norm of all the values in ``norms`` (norms of disjoint parts of a tree).

    Works array by array, never concatenating, so the norms keep whatever
    sharding they have. Direct (``(sum n^p)^(1/p)``, as PyTorch's
    ``clip_grad_norm_`` combines per-tensor norms) when that sum is in range,
    rescaled by the largest norm otherwise.
    """
    arrays = [n for n in norms if n.size]
    if not arrays:
        return jnp.zeros((), norms[0].dtype if norms else jnp.float32)
    if p == math.inf:
        return _combine_max([jnp.max(n) for n in arrays])
    if sum(n.size for n in arrays) == 1:
        return arrays[0].reshape(())
    direct_sum = add_all([jnp.sum(n**p) for n in arrays])

    def rescaled() -> Array:
        scale = Scale.near(_combine_max([jnp.max(n) for n in arrays]))
        return _root(add_all([jnp.sum((n * scale.shrink) ** p) for n in arrays]), p) * scale.grow

    floor = _SMALLEST_SAFE_SUM[np.dtype(direct_sum.dtype)]
    in_range = (jnp.isfinite(direct_sum) & (direct_sum >= floor)) | jnp.isnan(direct_sum)
    return lax.cond(in_range, lambda: _root(direct_sum, p), rescaled)


def _combine_max(values: Sequence[Array]) -> Array:
    out = values[0]
    for v in values[1:]:
        out = jnp.maximum(out, v)
    return out


class SliceNorms(NamedTuple):
    """Norms computed on a few work arrays, each standing for one or more leaves.

    Small leaves of equal shape are stacked and reduced together (see
    :func:`slice_norms`), and the norms are gathered in one vector where the
    leaves allow it (one accumulation dtype, no sharding to respect; per-unit
    norms of any order but inf); other norms are kept per work array.
    Elementwise work on the norms is cheapest in that form, and ``split`` hands
    out one result per original leaf at the end.
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
    axis_name: Any = None,
    replicated: Sequence[bool] | None = None,
) -> SliceNorms:
    """Norms of each leaf, or of each slice along ``axes`` (kept as size-1 dims).

    Args:
      leaves: floating-point arrays.
      p: 1, 2, ``math.inf`` or a real p >= 1.
      axes: per leaf, the axes to reduce (None: the whole leaf, giving a scalar).
      sanitize: if True, non-finite elements count as zero.
      rescue_tiny: if False, sums that underflow are not recomputed (for callers
        whose result cannot depend on norms below ~1e-19).
      axis_name: mapped axes the leaves are sharded over (see :class:`Across`);
        each device must hold a piece of every unit.
      replicated: per leaf, whether it is whole on every device (default: no).

    Returns:
      The norms and finiteness flags on the work arrays, and ``split``: applied
      to them (or to anything computed elementwise from them) it gives, per
      leaf, a scalar or an array broadcastable to the leaf.
    """
    flags = list(replicated) if replicated is not None else [False] * len(leaves)
    packed = _stack_alike(leaves, axes, flags)
    across = Across(axis_name)
    together = all(is_local(x) for x in packed.work) and len({_acc(x) for x in packed.work}) == 1
    if packed.work and together and all(a is None for a in axes):
        return _norms_in_one_vector(packed, p, sanitize, rescue_tiny, across)
    if packed.work and together and p != math.inf:
        return _unit_norms_in_one_vector(packed, p, sanitize, rescue_tiny, across)
    norms, finite = _slice_norms(
        packed.work, p, packed.axes, sanitize, rescue_tiny, across, packed.flags
    )
    return SliceNorms(norms, finite, packed.split)


def _norms_in_one_vector(
    packed: Packed, p: float, sanitize: bool, rescue_tiny: bool, across: Across
) -> SliceNorms:
    """:func:`slice_norms` of whole leaves with every norm in one vector, work
    array after work array (a leaf's, or a stack's one per leaf): what follows
    (scales, policies, statistics) is then a few operations on that vector
    instead of a few per work array, and each leaf reads its own element at an
    offset hidden from XLA (see :func:`_hidden_numbers`).

    Leaves left unstacked are measured in order of shape, so the norms of leaves
    of one shape are adjacent: a leaf reads its norm from their run, at its place
    in the run, and the numbers to hide are as many as the longest run (888 for
    2000 leaves shaped like a transformer's, not 2000: clip_by_norm compiled in
    10.4 s against 12.2 s). The vector itself comes out work array after work
    array, the order of units in adaptive states, whatever the order measured in
    (shapes differ between a sharded leaf and its whole).
    """
    order = sorted(range(len(packed.work)), key=lambda k: _reading_order(packed, k))
    origins = [packed.origins[k] for k in order]
    work = [(packed.work[k], packed.axes[k], packed.flags[k]) for k in order]
    sums: list[Array] = []
    tops: list[Array | None] = []
    if p == math.inf:
        units = _unit_maxima(work, False, across)
    else:
        sums, tops = _unit_sums_and_tops(work, p, across)
        units = sums
    shapes = [u.shape for u in units]  # () for a leaf, (count, 1, ...) for a stack
    runs = _runs(origins, work, shapes)
    hidden = _hidden_numbers(units, range(max(run.length for run in runs)))
    to_work, to_measured = _element_orders(order, shapes)

    def maxima(sanitized: bool) -> Array:
        return ravel_all(_unit_maxima(work, sanitized, across))

    def split(results: Sequence[Array]) -> list[Array]:
        vector = _reorder(results[0], to_measured)
        floating = jnp.issubdtype(vector.dtype, jnp.floating)
        out: list[Any] = [None] * sum(len(idx) for idx, _ in origins)
        # a large leaf's element read apart, a small one's (the many) in place:
        # each read apart is one more kernel to compile
        apart = [
            floating and kind == "leaf" and x.size > _PACK_LIMIT
            for (_, kind), (x, _, _) in zip(origins, work)
        ]
        parts = _run_parts(vector, runs, apart)
        for (idx, _), run, part, alone in zip(origins, runs, parts, apart):
            for j, i in enumerate(idx):
                at = hidden[run.place + j]
                out[i] = _element(part, at) if alone else _segment(part, at, ())
        return out

    if p == math.inf:
        raw = ravel_all(units)
        finite = jnp.isfinite(raw)
        if sanitize:
            raw = lax.cond(jnp.all(finite), lambda: raw, lambda: maxima(True))
        return SliceNorms([_reorder(raw, to_work)], [_reorder(finite, to_work)], split)

    def shrinks(vector: Array) -> list[Array]:
        parts = _run_parts(vector, runs, [False] * len(runs))
        return [
            _segment(part, hidden[run.place], shape)
            for run, part, shape in zip(runs, parts, shapes)
        ]

    norms, finite = _vector_of_norms(work, sums, tops, p, sanitize, rescue_tiny, across, shrinks)
    return SliceNorms([_reorder(norms, to_work)], [_reorder(finite, to_work)], split)


def _vector_of_norms(
    work: Sequence[tuple[Array, tuple[int, ...] | None, bool]],
    sums: Sequence[Array],
    tops: Sequence[Array | None],
    p: float,
    sanitize: bool,
    rescue_tiny: bool,
    across: Across,
    shrinks: Callable[[Array], list[Array]],
) -> tuple[Array, Array]:
    """The norms of the units of ``work``, from their ``sums`` of ``|x|^p`` (and
    their largest magnitudes ``tops`` where found), in one vector, array after
    array, and whether each is finite. Sums that left their range are redone in
    one branch, each array reading its units' factors from the vector of them by
    ``shrinks`` (at offsets hidden from XLA, so alike arrays share a kernel)."""
    total = ravel_all(sums)
    need = _needs_rescue(total, p, rescue_tiny, ravel_all(_tops_or_above(tops, sums)))

    def plain() -> tuple[Array, Array]:
        norms = _root(total, p)
        return norms, jnp.isfinite(norms)

    def rescue() -> tuple[Array, Array]:
        def found_or(sanitized: bool) -> Array:
            found = (
                _unit_maxima(work, True, across) if sanitized else _fill_maxima(tops, work, across)
            )
            return ravel_all(found)

        scale, finite = _rescue_scale(total, p, sanitize, found_or)
        parts = [
            across.sum(_unit_sums(x, a, p, sanitize, shrink), r)
            for (x, a, r), shrink in zip(work, shrinks(scale.shrink))
        ]
        norms = _root(ravel_all(parts), p) * scale.grow
        return norms, finite & jnp.isfinite(norms)

    return lax.cond(need, rescue, plain)


def _unit_norms_in_one_vector(
    packed: Packed, p: float, sanitize: bool, rescue_tiny: bool, across: Across
) -> SliceNorms:
    """:func:`slice_norms` of units (slices) with every norm in one vector, work
    array after work array, as :func:`_norms_in_one_vector` has whole-leaf norms:
    one check for the range rescue, one branch that redoes each array's sums, and
    the scales and statistics a few operations on the vector. Each work array
    reads its part of a result at an offset hidden from XLA, inside the kernel
    that uses it, so arrays of one shape share their kernels. agc on 2000 leaves
    lowered and compiled in 25.1 s so, against 41.0 s with the norms found in one
    vector but handed out per work array (a few kernels more per array: its
    scale, ratio and two factors; medians of three fresh processes, interleaved);
    its AdamW step took the same time either way.
    """
    work = list(zip(packed.work, packed.axes, packed.flags))
    sums, tops = _unit_sums_and_tops(work, p, across)
    shapes = [s.shape for s in sums]
    starts = list(itertools.accumulate((math.prod(shape) for shape in shapes), initial=0))
    hidden = _hidden_numbers(sums, starts[:-1])

    def parts(vector: Array) -> list[Array]:
        return [_segment(vector, hidden[at], shape) for at, shape in zip(starts, shapes)]

    def split(results: Sequence[Array]) -> list[Array]:
        return packed.split(parts(results[0]))

    norms, finite = _vector_of_norms(work, sums, tops, p, sanitize, rescue_tiny, across, parts)
    return SliceNorms([norms], [finite], split)


class _Run(NamedTuple):
    """Where a work array's norms lie in the vector of :func:`_norms_in_one_vector`:
    at ``place`` in the run of ``length`` elements from ``start`` that it shares
    with the unstacked leaves of its shape (a stack is a run of its own)."""

    start: int
    length: int
    place: int

    def of(self, vector: Array, padded: bool = False) -> Array:
        """The run's elements of ``vector`` (with a zero after them if ``padded``)."""
        part = lax.slice_in_dim(vector, self.start, self.start + self.length)
        return jnp.concatenate([part, jnp.zeros((1,), part.dtype)]) if padded else part


def _run_parts(vector: Array, runs: Sequence[_Run], padded: Sequence[bool]) -> list[Array]:
    """Per work array, its run's elements of ``vector`` (:meth:`_Run.of`), cut once
    per run and shared by the run's members."""
    cut: dict[tuple[int, bool], Array] = {}
    for run, pad in zip(runs, padded):
        if (run.start, pad) not in cut:
            cut[run.start, pad] = run.of(vector, padded=pad)
    return [cut[run.start, pad] for run, pad in zip(runs, padded)]


def _reading_order(packed: Packed, k: int) -> tuple[Any, ...]:
    """Stacks first, as they are; then the leaves left alone, by shape only, so
    that trees of equal shapes (a gradient and its weights) keep equal orders."""
    kind, x = packed.origins[k][1], packed.work[k]
    return (0, k) if kind != "leaf" else (1, x.ndim, x.shape, k)


def _element_orders(
    order: Sequence[int], shapes: Sequence[tuple[int, ...]]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """For work arrays measured in ``order``, with units of ``shapes`` (in that
    order): the indices that put a vector of their units in the work arrays' own
    order, and back (None, None if the orders agree)."""
    if list(order) == sorted(order):
        return None, None
    sizes = [0] * len(order)
    for k, shape in zip(order, shapes):
        sizes[k] = math.prod(shape)
    starts = list(itertools.accumulate(sizes, initial=0))
    to_measured = np.concatenate([np.arange(starts[k], starts[k + 1]) for k in order])
    return np.argsort(to_measured), to_measured


def _reorder(vector: Array, index: np.ndarray | None) -> Array:
    """``vector[index]`` (``vector`` itself if ``index`` is None)."""
    return vector if index is None else vector[index]


def _runs(
    origins: Sequence[tuple[list[int], str]],
    work: Sequence[tuple[Array, Any, bool]],
    shapes: Sequence[tuple[int, ...]],
) -> list[_Run]:
    """One :class:`_Run` per work array: a stack alone, adjacent leaves of one
    shape and dtype together."""

    def run_key(k: int) -> Any:
        x, kind = work[k][0], origins[k][1]
        return (x.shape, x.dtype) if kind == "leaf" else k

    runs: list[_Run] = []
    start = 0
    for _, members in itertools.groupby(range(len(work)), key=run_key):
        sizes = [math.prod(shapes[k]) for k in members]
        places = itertools.accumulate(sizes[:-1], initial=0)
        runs += [_Run(start, sum(sizes), place) for place in places]
        start += sum(sizes)
    return runs


def _unit_maxima(
    work: Sequence[tuple[Array, tuple[int, ...] | None, bool]], sanitized: bool, across: Across
) -> list[Array]:
    """Per (array, axes, replicated) in ``work``, ``max |x|`` over the axes (kept)."""
    return _fill_maxima([None] * len(work), work, across, sanitized)


def _kept_shape(x: Array, axes: tuple[int, ...] | None) -> tuple[int, ...]:
    """The shape of a reduction of ``x`` over ``axes`` with the axes kept (None: all)."""
    return () if axes is None else tuple(1 if i in axes else n for i, n in enumerate(x.shape))


def _unit_sums_and_tops(
    work: Sequence[tuple[Array, tuple[int, ...] | None, bool]], p: float, across: Across
) -> tuple[list[Array], list[Array | None]]:
    """Per (array, axes, replicated) in ``work``, ``sum(|x|^p)`` over the axes (kept)
    and, where one pass finds both (or the array is empty: zero), ``max |x|``
    (else None).

    The maximum is found as an integer (see :func:`_order_key`) beside the float
    sum. XLA on CPU runs such a reduction as fast as a plain sum where the units
    are small and contiguous (stacked leaves, a bias, rows), but not over a large
    leaf (an AdamW step with clip_by_norm 2% slower) nor across leading axes (a
    kernel's columns: 5x slower); and it adds up the elements in order, so they
    are taken in rows of _ROW (see :func:`_in_rows`). A unit with an element that
    is not finite has a maximum that is not finite.
    """
    sums: list[Array] = []
    tops: list[Array | None] = []
    for x, axes, replicated in work:
        shape = _kept_shape(x, axes)
        rows = _in_rows(x, axes)
        if rows is None:
            sums.append(across.sum(_unit_sums(x, axes, p, False), replicated))
            # an empty array's units are zero, and need no rescue
            tops.append(jnp.zeros(shape, _acc(x)) if x.size == 0 else None)
            continue
        acc = _acc(x)
        if x.dtype != acc:
            rows = lax.optimization_barrier(rows)  # the widening cast stays in the reduction
        if axes is None:
            total, top, _ = _powers_and_keys(rows.astype(acc), None, p, magnitude=True)
        else:  # per row, then per unit
            last = (rows.ndim - 1,)
            total, top, _ = _powers_and_keys(rows.astype(acc), last, p, magnitude=True)
            total, top = jnp.sum(total, axis=-1), jnp.max(top, axis=-1)
        sums.append(across.sum(total.reshape(shape), replicated))
        tops.append(across.max(_from_key(top, acc).reshape(shape), replicated))
    return sums, tops


def _in_rows(x: Array, axes: tuple[int, ...] | None) -> Array | None:
    """``x`` with each unit (the elements over ``axes``) in rows of at most _ROW
    elements along the last axis, where one pass can find each unit's sum and
    maximum together: units of up to _PACK_LIMIT elements in the last axes. A
    whole leaf (axes None) is returned as it is, and is cut into rows when reduced
    (:func:`_reduce_in_rows`)."""
    if axes is None:
        return x if x.size <= _PACK_LIMIT else None
    count = len(axes)
    size = math.prod(x.shape[x.ndim - count :])
    if axes != tuple(range(x.ndim - count, x.ndim)) or size > _PACK_LIMIT:
        return None
    if size > _ROW and size % _ROW:
        return None
    return x.reshape((*x.shape[: x.ndim - count], max(size // _ROW, 1), min(size, _ROW)))


def _fill_maxima(
    tops: Sequence[Array | None],
    work: Sequence[tuple[Array, tuple[int, ...] | None, bool]],
    across: Across,
    sanitized: bool = False,
) -> list[Array]:
    """``tops`` with each maximum not found yet computed (``max |x|`` over the axes,
    non-finite elements left out if ``sanitized``: a pass)."""
    return [
        across.max(_max_abs(x, a, sanitized), r) if t is None else t
        for t, (x, a, r) in zip(tops, work)
    ]


def _tops_or_above(tops: Sequence[Array | None], sums: Sequence[Array]) -> list[Array]:
    """``tops`` with inf for each maximum not found: such a unit may not be zero."""
    return [jnp.full_like(s, jnp.inf) if t is None else t for t, s in zip(tops, sums)]


def _unit_sums(
    x: Array, axes: tuple[int, ...] | None, p: float, sanitize: bool, shrink: Array | None = None
) -> Array:
    """``sum((|x| * shrink)^p)`` over ``axes`` (kept as size-1 dims; None: all)."""
    scale = None if shrink is None else Scale(shrink, shrink)
    return jnp.sum(_power(x, p, sanitize, scale), axis=axes, keepdims=axes is not None)


def per_leaf_count(leaves: Sequence[Array], predicate: Callable[[Array], Array]) -> list[Array]:
    """Per leaf, how many elements satisfy ``predicate`` (int32 scalars)."""
    packed = _stack_alike(leaves, [None] * len(leaves), [False] * len(leaves))
    counts = [
        jnp.sum(predicate(w), axis=a, keepdims=a is not None, dtype=jnp.int32)
        for w, a in zip(packed.work, packed.axes)
    ]
    return packed.split(counts)


class NormAndExtremes(NamedTuple):
    """The global L2 norm of some leaves and the extremes of each."""

    norm: Array  # accumulation dtype []
    finite: Array  # bool[]: every element finite and the norm in range
    tops: list[Array]  # accumulation dtype [], one per leaf
    bottoms: list[Array]  # accumulation dtype [], one per leaf


def _order_key(x: Array) -> Array:
    """Integers that sort as the floats ``x`` do; :func:`_from_key` inverts it.

    The bit patterns of non-negative IEEE floats sort as integers do; flipping
    all but the sign bit of negative ones reverses theirs into place.
    """
    return _flip_negatives(lax.bitcast_convert_type(x, _SIGNED_INT[np.dtype(x.dtype)]))


def _from_key(key: Array, dtype: Any) -> Array:
    return lax.bitcast_convert_type(_flip_negatives(key), dtype)


def _flip_negatives(bits: Array) -> Array:
    return bits ^ ((bits >> (8 * bits.dtype.itemsize - 1)) & jnp.iinfo(bits.dtype).max)


def _powers_and_keys(
    w: Array, axes: tuple[int, ...] | None, p: float, magnitude: bool
) -> tuple[Array, Array, Array | None]:
    """``sum(|w|^p)`` and the largest and smallest :func:`_order_key` (of ``|w|`` with
    ``magnitude``, and then no smallest) over ``axes`` (None: all), in one pass."""
    dims = tuple(range(w.ndim)) if axes is None else axes
    key = _order_key(jnp.abs(w) if magnitude else w)
    powers = w * w if p == 2 else _power(w, p, False)
    if _layout(w) != "local":
        # as in _squares_and_changes: plain reductions for the partitioner
        low = None if magnitude else jnp.min(key, axis=dims)
        top = jnp.max(key, axis=dims, initial=0) if magnitude else jnp.max(key, axis=dims)
        return jnp.sum(powers, axis=dims), top, low
    return _sum_and_keys(powers, key, axes, magnitude)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _sum_and_keys(
    powers: Array, key: Array, axes: tuple[int, ...] | None, magnitude: bool
) -> tuple[Array, Array, Array | None]:
    """``sum(powers)``, ``max(key)`` and (unless ``magnitude``) ``min(key)`` over
    ``axes`` (None: all) in one variadic reduction, which JAX cannot differentiate
    on its own: its derivative is that of the sum."""
    info = jnp.iinfo(key.dtype)
    lowest = 0 if magnitude else info.min  # the key of |w| is never negative
    operands, inits = [powers, key], [jnp.zeros((), powers.dtype), jnp.array(lowest, key.dtype)]
    finish: list[Callable[[Array], Array]] = [jnp.sum, jnp.max]
    if not magnitude:
        operands.append(key)
        inits.append(jnp.array(info.max, key.dtype))
        finish.append(jnp.min)

    def combine(a: Sequence[Array], b: Sequence[Array]) -> tuple[Array, ...]:
        out = (a[0] + b[0], jnp.maximum(a[1], b[1]))
        return out if magnitude else (*out, jnp.minimum(a[2], b[2]))

    # One float accumulator beside integer ones: XLA on CPU runs such a
    # reduction at the speed of a plain sum (with two float ones, 5x slower).
    if axes is None:
        results = _reduce_in_rows(tuple(operands), tuple(inits), combine, tuple(finish))
    else:  # a stack of small leaves (each row one leaf), or slices of a leaf
        results = lax.reduce(tuple(operands), tuple(inits), combine, axes)
    return results[0], results[1], None if magnitude else results[2]


@_sum_and_keys.defjvp
def _sum_and_keys_jvp(
    axes: tuple[int, ...] | None, magnitude: bool, primals: Any, tangents: Any
) -> tuple[Any, Any]:
    out = _sum_and_keys(*primals, axes, magnitude)
    keys_tangent = np.zeros(out[1].shape, jax.dtypes.float0)
    tangent = (jnp.sum(tangents[0], axis=axes), keys_tangent, None if magnitude else keys_tangent)
    return out, tangent


def norm_and_extremes(
    leaves: Sequence[Array],
    *,
    magnitude: bool = False,
    axis_name: Any = None,
    replicated: Sequence[bool] | None = None,
) -> NormAndExtremes:
    """The global L2 norm of ``leaves`` and, per leaf, its largest and smallest
    element, all from one pass over the leaves.

    Extremes are found as integers that sort as the floats do, so that one
    reduction carries the sum of squares and the extremes together. With
    ``magnitude`` only ``max |x|`` is computed and ``bottoms`` are its
    negation. NaN propagates to both extremes of its leaf. Each leaf is reduced
    on its own (alike leaves are stacked only in the rescue); with ``axis_name``
    everything is taken over every device's piece. Leaves must not be empty.
    """
    across = Across(axis_name)
    flags = list(replicated) if replicated is not None else [False] * len(leaves)
    acc = accumulation_dtype([x.dtype for x in leaves])
    sums, tops, bottoms = [], [], []
    for w, r in zip(leaves, flags):
        squares, high, low = _powers_and_keys(w.astype(acc), None, 2.0, magnitude)
        sums.append(across.sum(jnp.sum(squares), r))
        top = across.max(_from_key(high, acc), r)
        if magnitude:
            tops.append(top)
            bottoms.append(-top)
            continue
        assert low is not None
        bottom = -across.max(-_from_key(low, acc), r)
        # a NaN sorts above or below every number, by its sign bit; max and min
        # of floats give NaN at both ends
        has_nan = jnp.isnan(top) | jnp.isnan(bottom)
        tops.append(jnp.where(has_nan, jnp.nan, top))
        bottoms.append(jnp.where(has_nan, jnp.nan, bottom))

    total = sum_of(sums)

    def plain() -> tuple[Array, Array]:
        norm = _root(total, 2.0)
        return norm, jnp.isfinite(norm)

    def rescue() -> tuple[Array, Array]:
        packed = _stack_alike(leaves, [None] * len(leaves), flags)
        work = list(zip(packed.work, packed.flags))
        return _rescaled_norm(work, 2.0, False, across, acc, total)

    norm, finite = lax.cond(_needs_rescue(total, 2.0, True), rescue, plain)
    return NormAndExtremes(norm, finite, tops, bottoms)


def is_local(x: Array) -> bool:
    """Whether ``x`` can be stacked or concatenated with others without moving data."""
    return _layout(x) == "local"


def _layout(x: Array) -> str | None:
    """A key that equal-shaped leaves share when stacking them moves no data.

    Leaves on one device, or with explicit shardings (compared by spec), can be
    stacked freely. Under ``jit`` with automatic sharding the layout is not
    known while tracing, so such leaves are left alone (None): stacking
    differently sharded arrays would make XLA move them between devices.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not getattr(mesh, "axis_names", ()) or mesh.size == 1:
        return "local"
    types = [str(t) for t in getattr(mesh, "axis_types", ())]
    if not types or any("Auto" in t for t in types):
        return None
    return repr(getattr(sharding, "spec", None))


class Packed(NamedTuple):
    """Leaves regrouped for reduction by :func:`_stack_alike`.

    ``work``: the arrays to reduce (a leaf, or a stack of small alike leaves),
    with their ``axes`` and replication ``flags``; ``origins``: per work array,
    its leaves' indices and whether it is one ``"leaf"`` or a stack of leaves
    reduced ``"whole"`` or by ``"slices"``; ``split`` maps one result per work
    array back to one per leaf.
    """

    work: list[Array]
    axes: list[tuple[int, ...] | None]
    flags: list[bool]
    origins: list[tuple[list[int], str]]
    split: Callable[[Sequence[Array]], list[Array]]


def _stack_alike(
    leaves: Sequence[Array], axes: Sequence[tuple[int, ...] | None], replicated: Sequence[bool]
) -> Packed:
    """Stacks small leaves of equal shape, accumulation dtype, axes, replication and layout.

    The grouping depends only on those, so two trees of equal shapes (say,
    gradients and parameters) give work arrays of equal shapes.
    """
    groups: dict[Any, list[int]] = {}
    for i, (x, a, r) in enumerate(zip(leaves, axes, replicated)):
        layout = _layout(x)
        if 0 < x.size <= _PACK_LIMIT and layout is not None:
            groups.setdefault((x.shape, _acc(x), a, r, layout), []).append(i)
    groups = {k: idx for k, idx in groups.items() if len(idx) > 1}
    if sum(len(idx) for idx in groups.values()) < _PACK_COUNT:
        alone = [([i], "leaf") for i in range(len(leaves))]
        return Packed(list(leaves), list(axes), list(replicated), alone, list)

    work: list[Array] = []
    work_axes: list[tuple[int, ...] | None] = []
    work_flags: list[bool] = []
    origins: list[tuple[list[int], str]] = []
    for (shape, _, a, r, _), idx in groups.items():
        work.append(jnp.stack([leaves[i] for i in idx]))
        work_axes.append(tuple(range(1, len(shape) + 1)) if a is None else tuple(d + 1 for d in a))
        work_flags.append(r)
        origins.append((idx, "whole" if a is None else "slices"))
    stacked = {i for idx in groups.values() for i in idx}
    for i, (x, a, r) in enumerate(zip(leaves, axes, replicated)):
        if i not in stacked:
            work.append(x)
            work_axes.append(a)
            work_flags.append(r)
            origins.append(([i], "leaf"))

    def split(results: Sequence[Array]) -> list[Array]:
        out: list[Any] = [None] * len(leaves)
        rows = _hidden_numbers(work[:1], range(max(len(idx) for idx in groups.values())))
        for result, (idx, kind) in zip(results, origins):
            if kind == "leaf":
                out[idx[0]] = result
            else:
                for j, i in enumerate(idx):
                    row = lax.dynamic_index_in_dim(result, rows[j], keepdims=False)
                    out[i] = row.reshape(()) if kind == "whole" else row
        return out

    return Packed(work, work_axes, work_flags, origins, split)


def _hidden_numbers(probes: Sequence[Array], numbers: Iterable[int]) -> dict[int, Array]:
    """``numbers`` as int32 scalars, hidden from XLA on CPU.

    Reading a vector or a stack at a constant offset gives each leaf's reader a
    kernel of its own, and XLA on CPU compiles each distinct kernel anew (888
    stacked leaves of one shape: 888 kernels). Read at an offset known only at
    run time, the readers of leaves of one shape share one kernel. On CPU the
    numbers come out of a branch whose condition is always false but unknown to
    XLA (an integer at most 0, from an element of the first non-empty array in
    ``probes``, compared with 0), so it cannot fold them back in; other
    platforms, where a branch may cost a wait for the device, get constants.
    Other forms cost more: a loop that runs no times, carrying the numbers, 17%
    more compile time (its copies); XLA folds numbers passed through an
    optimization barrier, and slices of one vector carried by a loop are
    constants again inside each reader's kernel (2000 leaves, clip_by_norm: 32 s
    and 40 s to compile, against 10 s with the loop).
    """
    keys = sorted(set(numbers))
    constants = tuple(jnp.int32(k) for k in keys)
    probe = next((x for x in probes if x.size > 0), None)
    if probe is None:
        return dict(zip(keys, constants))

    def hidden() -> tuple[Array, ...]:
        never = jnp.minimum(lax.convert_element_type(jnp.ravel(probe)[0], jnp.int32), 0) > 0
        return lax.cond(never, lambda: tuple(k ^ 1 for k in constants), lambda: constants)

    values = lax.platform_dependent(cpu=hidden, default=lambda: constants)
    return dict(zip(keys, values))


def _element(padded: Array, start: Array) -> Array:
    """``padded[start]``, read out by a kernel of its own: a reduction, which XLA
    does not copy into the kernels that read its result (reading a vector inside
    the kernel that multiplies a leaf made an AdamW step 4% slower on CPU).
    ``padded`` has one element to spare."""
    pair = lax.dynamic_slice(padded, (start,), (2,), allow_negative_indices=False)
    return jnp.sum(jnp.where(np.array([True, False]), pair, jnp.zeros_like(pair)))


def _segment(vector: Array, start: Array, shape: tuple[int, ...]) -> Array:
    """The ``prod(shape)`` elements of ``vector`` from ``start``, shaped ``shape``."""
    size = math.prod(shape)
    return lax.dynamic_slice(vector, (start,), (size,), allow_negative_indices=False).reshape(shape)


def _slice_norms(
    leaves: Sequence[Array],
    p: float,
    axes: Sequence[tuple[int, ...] | None],
    sanitize: bool,
    rescue_tiny: bool,
    across: Across,
    replicated: Sequence[bool],
) -> tuple[list[Array], list[Array]]:
    if not leaves:
        return [], []
    work = list(zip(leaves, axes, replicated))

    def maxima(sanitized: bool) -> list[Array]:
        return _unit_maxima(work, sanitized, across)

    if p == math.inf:
        raw = maxima(False)
        finite = [jnp.isfinite(m) for m in raw]
        if not sanitize:
            return raw, finite
        return lax.cond(all_true(finite), lambda: raw, lambda: maxima(True)), finite

    sums, tops = _unit_sums_and_tops(work, p, across)
    checks = [
        _needs_rescue(s, p, rescue_tiny, t)
        for s, t, x in zip(sums, _tops_or_above(tops, sums), leaves)
        if x.size > 0
    ]
    need = any_true(checks)

    def plain() -> tuple[list[Array], list[Array]]:
        norms = [_root(s, p) for s in sums]
        return norms, [jnp.isfinite(n) for n in norms]

    def rescue() -> tuple[list[Array], list[Array]]:
        norms, finite = [], []
        for (x, a, r), s, t in zip(work, sums, tops):

            def found_or(sanitized: bool, x=x, a=a, r=r, t=t) -> Array:
                return _fill_maxima([None if sanitized else t], [(x, a, r)], across, sanitized)[0]

            scale, ok = _rescue_scale(s, p, sanitize, found_or)
            part = across.sum(_unit_sums(x, a, p, sanitize, scale.shrink), r)
            norms.append(_root(part, p) * scale.grow)
            finite.append(ok & jnp.isfinite(norms[-1]))
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
