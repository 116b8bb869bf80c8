"""The shared machinery of the clippers: measure, rescale, summarize.

A clipper differs from another only in how it picks its threshold. For global
norms :func:`measure` and :func:`rescale` do the rest; for per-leaf or
per-unit norms :func:`measure_units`, :func:`rescale_units` and
:func:`summarize_units`. Every clipper thus has the same numerics, non-finite
policies and statistics.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TypeVar

import chex
import jax
import jax.numpy as jnp
import optax

from jaxclip import _apply, _checks, _norms

Array = jax.Array
State = TypeVar("State", bound=tuple)  # the clippers' states are NamedTuples


def transformation(
    init_fn: Callable[..., State], update_fn: Callable[..., tuple[Any, State]]
) -> optax.GradientTransformation:
    """An Optax transformation from functions typed with their own state class."""
    return optax.GradientTransformation(init_fn, update_fn)


def transformation_with_extra_args(
    init_fn: Callable[..., State], update_fn: Callable[..., tuple[Any, State]]
) -> optax.GradientTransformationExtraArgs:
    """The same, for an ``update_fn`` taking keyword arguments such as ``value=loss``."""
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class Mapped(NamedTuple):
    """How the gradient is spread over mapped axes (``shard_map``, ``pmap``).

    ``axis_name``: the axes whose devices each hold a disjoint piece of the
    gradient, or None. ``replicated``: which leaves are whole on every device
    anyway (None: none; a function ``(path, leaf) -> bool``; or a pytree of
    booleans shaped like the gradient); they are counted once.
    """

    axis_name: Any = None
    replicated: Any = None

    def flags(self, owner: str, paths: list[Any], leaves: list[Array]) -> list[bool]:
        """Per leaf, whether it is replicated."""
        if self.axis_name is None or self.replicated is None:
            return [False] * len(leaves)
        if callable(self.replicated):
            return [bool(self.replicated(_checks.path_name(p), x)) for p, x in zip(paths, leaves)]
        by_path = {
            tuple(p): bool(v) for p, v in jax.tree_util.tree_flatten_with_path(self.replicated)[0]
        }
        missing = [_checks.path_str(p) for p in paths if tuple(p) not in by_path]
        if missing:
            raise ValueError(
                f"{owner}: replicated is a pytree without entries for {', '.join(missing)}; "
                "give a boolean for every gradient leaf, or a function (path, leaf) -> bool."
            )
        return [by_path[tuple(p)] for p in paths]


def mapped(owner: str, axis_name: Any, replicated: Any) -> Mapped:
    """Checks ``axis_name`` (a name, a tuple of names, or None) and ``replicated``."""
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if axis_name is not None and not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"{owner}: axis_name must be a mapped axis name or a tuple of names, got {axis_name!r}."
        )
    if replicated is not None and axis_name is None:
        raise ValueError(f"{owner}: replicated only applies together with axis_name.")
    return Mapped(axis_name, replicated)


NOT_MAPPED = Mapped()


class Measured(NamedTuple):
    """A gradient and its global norm."""

    paths: list[Any]
    leaves: list[Array]
    norm: Array  # accumulation dtype []: the pre-clip norm
    finite: Array  # bool[]: every element finite and the norm in range
    settings: tuple[Any, ...]  # what the norm depends on besides the leaves


# Norms measured by an enclosing transformation while it traces the one it
# wraps (see shared_norm); trace-time only, never part of a state.
_SHARED: contextvars.ContextVar[tuple[Measured, ...]] = contextvars.ContextVar(
    "jaxclip_shared_norms", default=()
)


def measure(
    owner: str, updates: Any, p: float, policy: str, where: Mapped = NOT_MAPPED
) -> Measured:
    """Checks the leaves (at trace time) and computes the global p-norm, or takes
    it from a :func:`shared_norm` block that measured these very leaves alike."""
    flat = _checks.float_leaves(updates, owner)
    paths = [path for path, _ in flat]
    leaves = [x for _, x in flat]
    flags = where.flags(owner, paths, leaves)
    settings = (p, policy == "zero", where.axis_name, tuple(flags))
    for known in reversed(_SHARED.get()):
        if known.settings == settings and _same_arrays(known.leaves, leaves):
            return Measured(paths, leaves, known.norm, known.finite, settings)
    norm, finite = _norms.global_norm_and_finite(
        leaves, p, sanitize=settings[1], axis_name=where.axis_name, replicated=flags
    )
    chex.assert_shape([norm, finite], ())
    return Measured(paths, leaves, norm, finite, settings)


@contextlib.contextmanager
def shared_norm(measured: Measured) -> Iterator[None]:
    """While tracing the block, :func:`measure` of the very arrays of ``measured``
    (the same traced objects, so the same values) with the same settings returns
    its norm instead of reading the gradient again: a guard that measured the
    gradient saves the clip inside it a pass (``skip_on_spike`` around a chain
    that starts with ``clip_by_global_norm``: its AdamW step 8% faster on a 17 MB
    tree, 5% to 10% on 167 MB, in three runs each). A transformation earlier in
    the chain that changes the gradient hands the clip new arrays, which are
    measured anew."""
    token = _SHARED.set((*_SHARED.get(), measured))
    try:
        yield
    finally:
        _SHARED.reset(token)


def _same_arrays(a: list[Array], b: list[Array]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class Rescaled(NamedTuple):
    updates: Any
    scale: Array  # accumulation dtype []: the factor applied (0 for a skipped step)
    clipped: Array  # bool[]: rescaled at this step


def rescale(
    owner: str, updates: Any, measured: Measured, scale: _apply.Factor, policy: str = "propagate"
) -> Rescaled:
    """Multiplies the gradient by ``scale`` under the non-finite ``policy``."""
    if policy == "error":
        _apply.raise_if_nonfinite(owner, measured.paths, measured.leaves, measured.finite)
    new_updates = _checks.map_float_leaves(
        lambda x: _apply.apply_policy(x, scale, measured.finite, policy), updates
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(new_updates, updates)
    clipped = measured.finite & (scale.value != 1)
    reported = _apply.reported_scale(scale.product(), measured.finite, policy)
    return Rescaled(new_updates, reported, clipped)


def stats_dtype(params: Any) -> Any:
    """float64 when ``params`` has a float64 leaf (with x64 enabled), else float32."""
    dtypes = [getattr(x, "dtype", None) for x in jax.tree.leaves(params)]
    return _norms.accumulation_dtype([d for d in dtypes if d is not None])


def initial_threshold(value: Any, dtype: Any) -> Array:
    """The initial threshold to record: the value at step 0 if it can be read."""
    return _apply.as_threshold(value, jnp.zeros((), jnp.int32), dtype)


class Units(NamedTuple):
    """A gradient and the norms of its units (leaves, or slices of leaves)."""

    paths: list[Any]
    leaves: list[Array]
    norms: list[Array]  # on the work arrays of _norms.slice_norms
    finite: list[Array]  # bool, same shapes as norms
    split: Any  # work-array results -> one per leaf
    step_finite: Array  # bool[]: every element finite


def measure_units(
    paths: list[Any],
    leaves: list[Array],
    p: float,
    axes: list[tuple[int, ...] | None],
    policy: str,
    *,
    rescue_tiny: bool = True,
    where: Mapped = NOT_MAPPED,
    owner: str = "jaxclip",
) -> Units:
    """The norm of each unit of ``leaves`` (checked leaves at ``paths``).

    ``axes`` gives, per leaf, the axes to reduce (None for whole leaves).
    """
    measured = _norms.slice_norms(
        leaves,
        p,
        axes,
        sanitize=policy == "zero",
        rescue_tiny=rescue_tiny,
        axis_name=where.axis_name,
        replicated=where.flags(owner, paths, leaves),
    )
    step_finite = _norms.all_true(measured.finite)
    return Units(paths, leaves, measured.norms, measured.finite, measured.split, step_finite)


def rescale_units(
    owner: str, updates: Any, units: Units, scales: list[_apply.Factor], policy: str
) -> Any:
    """Multiplies each unit by its scale (given on the work arrays) under ``policy``."""
    if policy == "error":
        _apply.raise_if_nonfinite(owner, units.paths, units.leaves, units.step_finite)
    per_leaf = zip(units.split([s.value for s in scales]), units.split([s.tiny for s in scales]))
    new_leaves = [
        _apply.apply_policy(x, _apply.Factor(value, tiny), units.step_finite, policy)
        for x, (value, tiny) in zip(units.leaves, per_leaf)
    ]
    new_updates = _checks.replace_leaves(updates, units.paths, new_leaves)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_updates, updates)
    return new_updates


class UnitSummary(NamedTuple):
    norm: Array  # the global pre-clip norm
    scale: Array  # post-clip global norm / pre-clip global norm
    clipped: Array  # bool[]: some unit was rescaled
    clipped_fraction: Array  # fraction of units rescaled
    max_unit_norm: Array


def summarize_units(
    units: Units, scales: list[_apply.Factor], p: float, policy: str
) -> UnitSummary:
    """The global view of a per-unit clip, from the unit norms alone (no pass over data)."""
    dtype = _norms.accumulation_dtype([x.dtype for x in units.leaves])
    norms = [n.astype(dtype) for n in units.norms]
    finite = list(units.finite)
    if len(norms) > 1 and all(_norms.is_local(n) for n in norms):
        # as one vector each: a statistic per work array costs XLA a handful of
        # kernels each to compile (half the compile time of agc on 1000 leaves)
        scales = [_apply.Factor(*(_flat(f, norms, dtype) for f in zip(*scales)))]
        finite = [_flat(finite, norms, jnp.bool_)]
        norms = [_flat(norms, norms, dtype)]
    before = _norms.combine_norms(norms, p)
    after = _norms.combine_norms([_apply.multiply(n, s) for n, s in zip(norms, scales)], p)
    ratio = jnp.where(before > 0, after / jnp.where(before > 0, before, 1), jnp.ones_like(before))
    ratio = _apply.reported_scale(ratio, units.step_finite, policy)
    n_units = sum(n.size for n in norms)
    n_clipped = sum(jnp.sum((s.value != 1) & f) for s, f in zip(scales, finite))
    largest = _norms.max_of(norms) if n_units else jnp.zeros((), dtype)
    return UnitSummary(
        norm=before,
        scale=ratio,
        clipped=units.step_finite & (n_clipped > 0),
        clipped_fraction=jnp.asarray(n_clipped / max(n_units, 1), dtype),
        max_unit_norm=largest,
    )


def _flat(arrays: Any, shapes_of: list[Array], dtype: Any) -> Array:
    """``arrays``, each broadcast to the shape of its partner in ``shapes_of``, in one vector."""
    return _norms.ravel_all(
        [jnp.broadcast_to(a, n.shape).astype(dtype) for a, n in zip(arrays, shapes_of)]
    )
