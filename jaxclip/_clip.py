"""The clipper pattern (``docs/architecture.md``): :func:`rule_clipper` measures the global
norm and asks a rule (``_rules.py``) for the threshold, :func:`unit_clipper` measures the
norm of each unit; both apply the scale under a non-finite policy and record a ``ClipStats``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import chex
import jax
import jax.numpy as jnp
import optax

from jaxclip import _apply, _checks, _norms, _rules
from jaxclip._stats import ClipStats, initial_stats, next_stats

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
    """How the gradient is spread over mapped axes (``docs/guides/distributed.md``).

    ``axis_name``: the axes (``shard_map``, ``pmap``) whose devices each hold a disjoint
    piece of the gradient, or None. ``replicated``: which leaves are whole on every device
    anyway (None: none; a function ``(path, leaf) -> bool``; or a pytree of booleans
    shaped like the gradient); they are counted once.
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

    def combine(self, flags: list[bool], values: list[Array], collective: Any) -> list[Array]:
        """Per-leaf values combined over the mapped axes with ``collective``
        (``lax.psum``, ``lax.pmax``); a replicated leaf's value as it is."""
        return _norms.across(values, self.axis_name, flags, collective)


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


def stats_dtype(params: Any) -> Any:
    """The dtype of a clipper's statistics and rule state: float64 when ``params`` has
    a float64 leaf, or is None with x64 enabled (the gradient's dtypes are then not
    known yet), else float32."""
    if params is None:
        return jax.dtypes.canonicalize_dtype(jnp.float64)
    dtypes = [getattr(x, "dtype", None) for x in jax.tree.leaves(params)]
    return _norms.accumulation_dtype([d for d in dtypes if d is not None])


# -- global norms ------------------------------------------------------------------------


class Measured(NamedTuple):
    """A gradient and its global norm."""

    paths: list[Any]
    leaves: list[Array]
    norm: Array  # accumulation dtype []: the pre-clip norm
    finite: Array  # bool[]: every element finite and the norm in range


def measure(
    owner: str, updates: Any, p: float, policy: str, where: Mapped = NOT_MAPPED
) -> Measured:
    """Checks the leaves (at trace time) and computes the global p-norm."""
    return measure_leaves(owner, *_checks.float_leaves(updates, owner), p, policy, where)


def measure_leaves(
    owner: str, paths: list[Any], leaves: list[Array], p: float, policy: str, where: Mapped
) -> Measured:
    """The global p-norm of checked leaves."""
    norm, finite = _norms.global_norm_and_finite(
        leaves,
        p,
        sanitize=policy == "zero",
        axis_name=where.axis_name,
        replicated=where.flags(owner, paths, leaves),
    )
    chex.assert_shape([norm, finite], ())
    return Measured(paths, leaves, norm, finite)


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


class AdaptiveClipState(NamedTuple):
    """State of an adaptive clipper: its rule's state and the statistics."""

    rule: Any  # the rule's NamedTuple of arrays (e.g. ZClipState: count, mean, var)
    stats: ClipStats


def _tree_where(condition: Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), new, old)


def initial(
    params: Any, names: tuple[str, ...], max_skips: int | None, threshold: Any
) -> tuple[Any, ClipStats]:
    """The statistics' dtype and first record, with ``extra`` zeros for ``names`` and
    for the counters a limit on skips in a row adds."""
    dtype = stats_dtype(params)
    if max_skips is not None:
        names += ("consecutive_skips", "forced_steps")
    extra = {name: jnp.zeros((), dtype) for name in names}
    return dtype, initial_stats(dtype, _apply.as_array(threshold, dtype), extra=extra)


def limit_skips(
    max_skips: int | None, finite: Array, extra: dict[str, Array]
) -> tuple[Array, dict[str, Array]]:
    """Whether the step is applied: finite, or not finite after ``max_skips`` skips in
    a row (then taken as it is, as ``skip_on_spike`` does); and the counters."""
    if max_skips is None:
        return finite, {}
    run = extra["consecutive_skips"]
    forced = ~finite & (run >= max_skips)
    skipped = ~finite & ~forced
    counters = {
        "consecutive_skips": jnp.where(skipped, run + 1, 0),
        "forced_steps": extra["forced_steps"] + forced,
    }
    return finite | forced, counters


ScaleFn = Callable[[Array, _rules.RuleStep, Array], _apply.Factor]


def rule_clipper(
    owner: str,
    rule: _rules.Rule,
    scale_fn: ScaleFn,
    policy: str,
    where: Mapped,
    *,
    p: float = 2.0,
    initial_threshold: Any = 0.0,
    max_skips: int | None = None,
) -> optax.GradientTransformation:
    """A global-norm clipper whose threshold comes from ``rule``.

    ``scale_fn(norm, rule_step, step)`` turns the rule's target into the factor.
    The state is the :class:`~jaxclip.ClipStats` alone for a rule without state
    (``rule.init`` returns None), else an :class:`AdaptiveClipState`. A step whose
    gradient is not finite leaves the rule's state as it was.
    """

    def init_fn(params: Any) -> Any:
        dtype, stats = initial(params, rule.extra_names, max_skips, initial_threshold)
        rule_state = rule.init(dtype)
        return stats if rule_state is None else AdaptiveClipState(rule_state, stats)

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        rule_state, stats = (None, state) if isinstance(state, ClipStats) else state
        measured = measure(owner, updates, p, policy, where)
        step = rule.step(rule_state, measured.norm, stats.step)
        applied, counters = limit_skips(max_skips, measured.finite, stats.extra)
        scale = scale_fn(measured.norm, step, stats.step)
        out = rescale(owner, updates, measured._replace(finite=applied), scale, policy)
        keep = measured.finite  # a non-finite step leaves the rule as it was
        old_extra = {name: stats.extra[name] for name in step.extra}
        stats = next_stats(
            stats,
            norm=measured.norm,
            threshold=step.boundary,
            scale=out.scale,
            clipped=out.clipped,
            finite=measured.finite,
            extra=_tree_where(keep, step.extra, old_extra) | counters,
        )
        if rule_state is None:
            return out.updates, stats
        return out.updates, AdaptiveClipState(_tree_where(keep, step.state, rule_state), stats)

    return transformation(init_fn, update_fn)


# -- per-unit norms ----------------------------------------------------------------------


class Selected(NamedTuple):
    """The gradient leaves a per-unit clipper acts on, and how they divide into units."""

    paths: list[Any]
    leaves: list[Array]
    axes: list[_norms.Axes]  # per leaf, the axes of one unit (None: the whole leaf)
    weights: list[Array] | None = None  # agc: the parameters of those leaves


class Units(NamedTuple):
    """Selected leaves and the norms of their units, as vectors (see ``_norms.UnitNorms``)."""

    selected: Selected
    norms: Array  # [units], leaf after leaf; a single unit with ``whole``
    weight_norms: Array | None  # [units], of the weights
    step_finite: Array  # bool[]: every element finite
    shapes: tuple[tuple[int, ...], ...] | None  # per leaf, its units' shape; None: whole


def measure_units(
    owner: str,
    selected: Selected,
    p: float,
    policy: str,
    where: Mapped,
    whole: bool = False,
    zero_sums_are_zero: bool = True,
) -> Units:
    """The norm of each unit of the selected leaves (and of their weights, in the same
    pass), or with ``whole`` the global norm as the only unit. ``zero_sums_are_zero``:
    see ``_norms.unit_norms`` (off for a threshold of 0, which must clear such units)."""
    paths, leaves = selected.paths, selected.leaves
    if whole:
        measured = measure_leaves(owner, paths, leaves, p, policy, where)
        return Units(selected, measured.norm[None], None, measured.finite, None)
    arrays, axes = list(leaves), list(selected.axes)
    flags = where.flags(owner, paths, leaves)
    if selected.weights is not None:
        arrays += selected.weights
        axes += selected.axes
        flags += where.flags(owner, paths, selected.weights)
    measured = _norms.unit_norms(
        arrays,
        p,
        axes,
        sanitize=policy == "zero",
        zero_sums_are_zero=zero_sums_are_zero,
        axis_name=where.axis_name,
        replicated=flags,
    )
    shapes = measured.shapes[: len(leaves)]
    n = sum(math.prod(s) for s in shapes)
    weights = measured.norms[n:] if selected.weights is not None else None
    step_finite = jnp.all(measured.finite[:n])
    return Units(selected, measured.norms[:n], weights, step_finite, shapes)


def rescale_units(owner: str, updates: Any, units: Units, scale: _apply.Factor, policy: str) -> Any:
    """Multiplies each leaf by its units' scales (one for all with a single unit)."""
    paths, leaves = units.selected.paths, units.selected.leaves
    if policy == "error":
        _apply.raise_if_nonfinite(owner, paths, leaves, units.step_finite)
    if units.shapes is None:
        per_leaf = [_apply.Factor(scale.value[0], scale.tiny[0])] * len(leaves)
    else:
        parts = [_norms.split(f, units.shapes) for f in scale]
        per_leaf = [_apply.Factor(v, t) for v, t in zip(*parts)]
    new_leaves = [
        _apply.apply_policy(x, factor, units.step_finite, policy)
        for x, factor in zip(leaves, per_leaf)
    ]
    new_updates = _checks.replace_leaves(updates, paths, new_leaves)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_updates, updates)
    return new_updates


def largest(values: Array, dtype: Any) -> Array:
    """The largest of ``values`` as a ``dtype`` scalar (0 if there is none)."""
    return jnp.max(values).astype(dtype) if values.size else jnp.zeros((), dtype)


class UnitDecision(NamedTuple):
    """What a per-unit clipper's rule decides at one step."""

    scale: _apply.Factor  # per unit, shaped as Units.norms
    threshold: Array  # the threshold to record
    rule: Any  # the rule's next state (kept only on finite steps)
    extra: dict[str, Array]  # the rule's statistics (``decide`` sees ``units.step_finite``)


def unit_clipper(
    owner: str,
    *,
    select: Callable[[Any, Any], Selected],
    decide: Callable[[Any, Units, Array], UnitDecision],
    policy: str,
    where: Mapped,
    init_rule: Callable[[Any, Any], Any] = lambda params, dtype: None,
    pack: Callable[[Any, ClipStats], Any] = lambda rule, stats: stats,
    unpack: Callable[[Any], tuple[Any, ClipStats]] = lambda state: (None, state),
    extra_names: tuple[str, ...] = (),
    initial_threshold: Any = 0.0,
    p: float = 2.0,
    whole: bool = False,
    zero_sums_are_zero: bool = True,
    max_skips: int | None = None,
) -> optax.GradientTransformation:
    """A clipper that scales each unit of the gradient on its own.

    ``select(updates, params)`` picks the leaves and their units; ``decide(rule,
    units, step)`` gives each unit's scale. The state is ``pack(rule, stats)``
    (by default the :class:`~jaxclip.ClipStats` alone). With ``whole`` the
    gradient is a single unit, measured by its global norm.
    """

    def init_fn(params: Any) -> Any:
        names = ("clipped_fraction", *extra_names)
        dtype, stats = initial(params, names, max_skips, initial_threshold)
        return pack(init_rule(params, dtype), stats)

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        rule, stats = unpack(state)
        selected = select(updates, params)
        units = measure_units(owner, selected, p, policy, where, whole, zero_sums_are_zero)
        decision = decide(rule, units, stats.step)
        applied, counters = limit_skips(max_skips, units.step_finite, stats.extra)
        taken = units._replace(step_finite=applied)
        new_updates = rescale_units(owner, updates, taken, decision.scale, policy)
        # the global view, from the unit norms alone (no pass over the gradient)
        norms = units.norms.astype(stats.norm.dtype)
        factor = _apply.Factor(*(f.astype(norms.dtype) for f in decision.scale))
        before = _norms.combine_norms([norms], p)
        after = _norms.combine_norms([_apply.multiply(norms, factor)], p)
        positive = before > 0
        ratio = jnp.where(positive, after / jnp.where(positive, before, 1), jnp.ones_like(before))
        fraction = jnp.sum((factor.value != 1) & jnp.isfinite(norms)) / max(norms.size, 1)
        keep = units.step_finite
        stats = next_stats(
            stats,
            norm=before,
            threshold=decision.threshold,
            scale=_apply.reported_scale(ratio, applied, policy),
            clipped=applied & (fraction > 0),
            finite=keep,
            extra={"clipped_fraction": fraction, **decision.extra, **counters},
        )
        return new_updates, pack(_tree_where(keep, decision.rule, rule), stats)

    return transformation(init_fn, update_fn)
