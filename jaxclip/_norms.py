"""Robust p-norms, of all leaves together and of each leaf or slice (``docs/architecture.md``).

Sums of ``|x|^p`` in the accumulation dtype, in one plain pass; a sum that is not finite or
may have underflowed is redone over ``|x| / u``, u the unit's largest magnitude, under one
``lax.cond`` for the whole call. No finite input then gets an infinite or zero norm unless
its true norm lies outside the accumulation dtype's range. Square roots have a finite
gradient at zero.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
Axes = tuple[int, ...] | None  # the axes of one unit (None: the whole leaf)


def accumulation_dtype(dtypes: Sequence[Any]) -> np.dtype:
    """float64 if any of ``dtypes`` is float64, else float32."""
    if any(np.dtype(d) == np.float64 for d in dtypes):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def widened(x: Array, dtype: Any) -> Array:
    """``x`` cast to the wider ``dtype`` inside the reduction that reads it.

    Without the barrier XLA computes the cast once for the norm and for the
    clip's multiply, which also widens x, and writes that wide copy of the
    gradient to memory: a bfloat16 clip then moves three times the bytes.
    """
    if x.dtype == dtype:
        return x
    return lax.optimization_barrier(x).astype(dtype)


def joined(arrays: Sequence[Array]) -> Array:
    """Per-leaf results (of one dtype) as one vector, held apart from what reads it.

    Without the barrier XLA fuses a reduction of thousands of scalars into one
    kernel, or copies it into every kernel that reads its result, and compiles
    in time growing with the square of the number of leaves.
    """
    flat = [jnp.ravel(_whole(a)) for a in arrays]
    return lax.optimization_barrier(jnp.concatenate(flat) if len(flat) > 1 else flat[0])


def _whole(a: Array) -> Array:
    """``a`` (a small per-unit result) whole on every device where its type says it is
    sharded (explicit sharding): arrays of different shardings cannot be joined."""
    sharding = getattr(jax.typeof(a), "sharding", None)
    if sharding is not None and any(axis is not None for axis in sharding.spec):
        return jax.sharding.reshard(a, sharding.update(spec=()))
    return a


def _powers(x: Array, p: float, dtype: Any, sanitize: bool, shrink: Array | None = None) -> Array:
    """Elementwise ``(|x| * shrink)^p`` in ``dtype`` (non-finite elements as 0 if
    ``sanitize``)."""
    a = widened(x, dtype)
    if p != 2:  # a square needs no absolute value
        a = jnp.abs(a)
    if sanitize:
        a = jnp.where(jnp.isfinite(a), a, jnp.zeros_like(a))
    if shrink is not None:
        a = a * shrink
    if p == 1:
        return a
    if p == int(p):  # by multiplication: pow(a, p) goes through exp and log
        return lax.integer_pow(a, int(p))
    return a**p


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _root(s: Array, p: float) -> Array:
    """``s^(1/p)``, whose derivative is 0 at ``s == 0`` (not inf): a zero gradient
    has a finite gradient of its norm. NaN and inf pass through."""
    if p == 1:
        return s
    return jnp.sqrt(s) if p == 2 else s ** (1.0 / p)


@_root.defjvp
def _root_jvp(p: float, primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (s,), (t,) = primals, tangents
    r = _root(s, p)
    if p == 1:
        return r, t
    positive = s > 0
    # the factor first: t * r, or a small cotangent times r / s, would underflow
    factor = jnp.where(positive, r / (p * jnp.where(positive, s, 1)), jnp.zeros_like(r))
    return r, t * factor


def _max_abs(x: Array, axes: Axes, dtype: Any, sanitize: bool) -> Array:
    """``max |x|`` over ``axes`` (kept; None: all), in ``dtype`` (0 for no elements)."""
    a = jnp.abs(x)
    if sanitize:
        a = jnp.where(jnp.isfinite(a), a, jnp.zeros_like(a))
    return jnp.max(a, axis=axes, keepdims=axes is not None, initial=0).astype(dtype)


class Scale(NamedTuple):
    """A divisor u near a magnitude m, so that ``|x| / u`` is at most about 1.

    u = m, held within the normal floats' range [2^(minexp), 2^(maxexp - 2)]
    (2^-126 and 2^126 in float32) so that both u and 1 / u are normal numbers:
    XLA multiplies by the reciprocal, and on CPU a subnormal one is flushed to
    zero. u = 1 where m is zero or not finite. Held constant under
    ``jax.grad``: ``u * root(sum((|x| / u)^p))`` does not depend on u.
    """

    shrink: Array  # 1 / u
    grow: Array  # u

    @classmethod
    def near(cls, m: Array) -> Scale:
        m = lax.stop_gradient(m)
        info = jnp.finfo(m.dtype)
        top = float(2.0 ** (info.maxexp - 2))
        u = jnp.where(jnp.isfinite(m) & (m > 0), jnp.clip(m, info.tiny, top), 1)
        return cls(1 / u, u)


def across(
    values: Sequence[Array], axis_name: Any, replicated: Sequence[bool] | None, collective: Any
) -> list[Array]:
    """Per-leaf partial results completed over the mapped ``axis_name`` with
    ``collective`` (``lax.psum``, ``lax.pmax``); the value of a replicated leaf (whole
    on every device, counted once) as it is. ``replicated`` None: no leaf is."""
    if axis_name is None:
        return list(values)
    flags = [False] * len(values) if replicated is None else replicated
    return [v if r else collective(v, axis_name) for v, r in zip(values, flags)]


def _needs_rescue(s: Array, p: float, zero_sums_are_zero: bool) -> Array:
    """Per sum of ``|x|^p``: not finite, or small enough that terms may have underflowed
    (never for p = 1, whose terms are as large as the elements)."""
    bad = ~jnp.isfinite(s)
    if p != 1:  # below the smallest normal over the epsilon (2^-103 in float32)
        info = np.finfo(s.dtype)
        tiny = s < float(info.tiny / info.eps)
        bad = bad | ((s > 0) & tiny if zero_sums_are_zero else tiny)
    return bad


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
      sanitize: non-finite elements count as zero in the norm (``finite`` still
        reports whether the raw elements were finite).
      axis_name: mapped axes the leaves are sharded over, or None.
      replicated: per leaf, whether it is whole on every device (default: none).

    Returns:
      ``(norm, finite)``: a scalar of the accumulation dtype of all the leaves
      and a bool, False when an element is NaN or inf or the norm overflows.
    """
    acc = accumulation_dtype([x.dtype for x in leaves])
    work = [i for i, x in enumerate(leaves) if x.size]
    if not work:
        return jnp.zeros((), acc), jnp.array(True)
    flags = [False if replicated is None else replicated[i] for i in work]

    def largest(sanitized: bool) -> Array:
        maxima = [_max_abs(leaves[i], None, acc, sanitized) for i in work]
        return jnp.max(joined(across(maxima, axis_name, flags, lax.pmax)))

    if p != 1 and p != 2:  # as PyTorch: each leaf's norm, then the norm of those
        per_leaf = unit_norms(
            [leaves[i] for i in work],
            p,
            [None] * len(work),
            sanitize=sanitize,
            axis_name=axis_name,
            replicated=flags,
        )
        norm = combine_norms([per_leaf.norms], p)
        return norm, jnp.all(per_leaf.finite) & jnp.isfinite(norm)

    # all in the tree's accumulation dtype: the squares of float32 leaves beside
    # float64 ones must not underflow in float32
    sums = [jnp.sum(_powers(leaves[i], p, acc, False)) for i in work]
    total = _add(across(sums, axis_name, flags, lax.psum))

    def plain() -> tuple[Array, Array]:
        norm = _root(total, p)
        return norm, jnp.isfinite(norm)

    def rescue() -> tuple[Array, Array]:
        raw = largest(False)
        # held apart (see joined): every leaf's kernel reads it
        scale = Scale(*lax.optimization_barrier(Scale.near(largest(True) if sanitize else raw)))
        # each leaf meets the shared 1 / u through a barrier of its own: otherwise XLA
        # broadcasts it once for all the leaves of a shape, and writes that out
        apart = [lax.optimization_barrier((leaves[i], scale.shrink)) for i in work]
        sums = [jnp.sum(_powers(x, p, acc, sanitize, u)) for x, u in apart]
        norm = _root(_add(across(sums, axis_name, flags, lax.psum)), p) * scale.grow
        return norm, jnp.isfinite(raw) & jnp.isfinite(norm)

    return lax.cond(_needs_rescue(total, p, False), rescue, plain)


class UnitNorms(NamedTuple):
    """The norms of every unit, leaf after leaf (a leaf's units in row-major
    order), as one vector: scalar work on thousands of units is then a few
    operations, not a few per leaf, and compiles in a fraction of the time."""

    norms: Array  # [units], the accumulation dtype of all the leaves
    finite: Array  # bool[units]: every element of the unit finite and its norm in range
    shapes: tuple[tuple[int, ...], ...]  # per leaf, the shape of its norms

    def per_leaf(self, values: Array | None = None) -> list[Array]:
        """``values`` (default: the norms), one per unit, as one array per leaf."""
        return split(self.norms if values is None else values, self.shapes)


def split(values: Array, shapes: Sequence[tuple[int, ...]]) -> list[Array]:
    """A vector of per-unit values, leaf after leaf, as one array per leaf."""
    # held apart: each leaf's slice would otherwise recompute the whole vector
    values = lax.optimization_barrier(values)
    out, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(values[start : start + size].reshape(shape))
        start += size
    return out


def unit_norms(
    leaves: Sequence[Array],
    p: float,
    axes: Sequence[Axes],
    *,
    sanitize: bool = False,
    zero_sums_are_zero: bool = False,
    axis_name: Any = None,
    replicated: Sequence[bool] | None = None,
) -> UnitNorms:
    """The p-norm of each leaf, or of each slice of a leaf along its ``axes``.

    Args:
      leaves, p, sanitize, replicated: as in :func:`global_norm_and_finite`.
      axes: per leaf, the (non-negative, sorted) axes one unit spans, or None
        for the whole leaf.
      zero_sums_are_zero: take a unit whose sum of ``|x|^p`` is exactly zero as
        all zero, without a second pass. Every element of such a unit is then
        zero or below 2^-63 (float32, p = 2), so a clip cannot tell the two
        apart: its scale is 1 either way. All-zero units (unused embedding
        rows, zero-initialized biases) then cost no rescue.
      axis_name: mapped axes the leaves are sharded over (each device holding
        a piece of every unit), or None.

    Returns:
      A :class:`UnitNorms`, in the accumulation dtype of all the leaves.
    """
    # a leaf's unit norms: () for the whole leaf, else the leaf's shape with the unit
    # axes kept as size-1 dimensions (it broadcasts)
    shapes = tuple(
        () if a is None else tuple(1 if d in a else n for d, n in enumerate(x.shape))
        for x, a in zip(leaves, axes)
    )
    acc = accumulation_dtype([x.dtype for x in leaves])
    if not leaves:
        return UnitNorms(jnp.zeros((0,), acc), jnp.zeros((0,), bool), shapes)

    def maxima(sanitized: bool) -> Array:
        found = [_max_abs(x, a, acc, sanitized) for x, a in zip(leaves, axes)]
        return joined(across(found, axis_name, replicated, lax.pmax))

    if p == math.inf:
        raw = maxima(False)
        finite = jnp.isfinite(raw)
        if not sanitize:
            return UnitNorms(raw, finite, shapes)
        return UnitNorms(
            lax.cond(jnp.all(finite), lambda: raw, lambda: maxima(True)), finite, shapes
        )

    def sums(shrink: Array | None = None, sanitized: bool = False) -> Array:
        shrinks = [None] * len(leaves) if shrink is None else split(shrink, shapes)
        found = [
            jnp.sum(_powers(x, p, acc, sanitized, u), axis=a, keepdims=a is not None)
            for x, a, u in zip(leaves, axes, shrinks)
        ]
        return joined(across(found, axis_name, replicated, lax.psum))

    first = sums()
    bad = _needs_rescue(first, p, zero_sums_are_zero)
    if any(x.size == 0 for x in leaves):  # units of no elements are zero
        has_elements = [np.full(math.prod(s), x.size > 0) for x, s in zip(leaves, shapes)]
        bad = bad & np.concatenate(has_elements)

    def plain() -> tuple[Array, Array]:
        norms = _root(first, p)
        return norms, jnp.isfinite(norms)

    def rescue() -> tuple[Array, Array]:
        raw = maxima(False)
        scale = Scale.near(maxima(True) if sanitize else raw)
        norms = _root(sums(scale.shrink, sanitize), p) * scale.grow
        return norms, jnp.isfinite(raw) & jnp.isfinite(norms)

    norms, finite = lax.cond(jnp.any(bad), rescue, plain)
    return UnitNorms(norms, finite, shapes)


def combine_norms(norms: Sequence[Array], p: float) -> Array:
    """The p-norm of all the values in ``norms`` (norms of disjoint parts of a tree):
    a scalar, of the accumulation dtype of the norms. Each array is reduced where
    it lies (a sharded one stays sharded), then the results together."""
    values = [n for n in norms if n.size]
    dtype = accumulation_dtype([n.dtype for n in norms])
    if not values:
        return jnp.zeros((), dtype)
    values = [v.astype(dtype) for v in values]
    largest = jnp.max(joined([jnp.max(v) for v in values]))
    if p == math.inf:
        return largest
    # held apart (see joined): every array's reduction reads it
    u = lax.optimization_barrier(_power_of_two_above(largest))
    total = jnp.sum(joined([jnp.sum((v / u) ** p) for v in values]))
    return _root(total, p) * u


def norm_along(norms: Array, p: float, axis: int) -> Array:
    """The p-norm of ``norms`` (non-negative, or NaN) along ``axis``, rescaled by a
    power of two near the largest so that no sum leaves the float range."""
    if p == math.inf:
        return jnp.max(norms, axis=axis)
    u = _power_of_two_above(jnp.max(norms, axis=axis, keepdims=True))
    return jnp.squeeze(_root(jnp.sum((norms / u) ** p, axis=axis, keepdims=True), p) * u, axis)


def _power_of_two_above(m: Array) -> Array:
    """A power of two u with ``m <= u < 2 m`` for a positive finite m in the normal
    range, else 1; held constant under ``jax.grad``. u is held within
    [2^(minexp + 1), 2^(maxexp - 2)] so that 1 / u, by which XLA multiplies, is a
    normal number too (a subnormal one is flushed to zero on CPU); |m / u| <= 4."""
    m = lax.stop_gradient(m)
    info = jnp.finfo(m.dtype)
    _, exponent = jnp.frexp(m)
    exponent = jnp.clip(exponent, info.minexp + 1, info.maxexp - 2)
    ok = jnp.isfinite(m) & (m > 0)
    return jnp.where(ok, jnp.ldexp(jnp.ones_like(m), exponent), jnp.ones_like(m))


def _add(scalars: Sequence[Array]) -> Array:
    """The sum of a non-empty sequence of scalars: up to 64 one after another, as
    PyTorch adds its per-tensor results and whatever the sharding (XLA rounds the
    sum of a vector differently across versions and meshes), more as one vector."""
    if len(scalars) > 64:
        return jnp.sum(joined(scalars))
    return sum(scalars[1:], scalars[0])
