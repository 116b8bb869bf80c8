"""Adaptive threshold rules (``docs/architecture.md``): ``init(dtype) -> state`` (None: no
state) and ``step(state, norm, count) -> RuleStep`` (count: updates seen, for schedules).
Each follows its paper's reference implementation; departures are noted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxclip import _apply

Array = jax.Array


class RuleStep(NamedTuple):
    target: Array  # clip the norm down to this (inf: no clipping this step)
    boundary: Array  # reported threshold: norms above it are clipped
    state: Any  # the rule's next state
    extra: dict[str, Array]  # the rule's statistics, scalars of the state dtype


class Rule(NamedTuple):
    init: Callable[[Any], Any]
    step: Callable[[Any, Array, Array], RuleStep]
    extra_names: tuple[str, ...]


def _sqrt(x: Array) -> Array:
    """``sqrt(x)`` whose derivative is 0, not inf, at ``x == 0`` (a variance of 0)."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), jnp.zeros_like(x))


def constant_rule(max_norm: Any) -> Rule:
    """A fixed threshold: a number, an array or a schedule of the update count."""

    def step(state: None, norm: Array, count: Array) -> RuleStep:
        threshold = _apply.as_array(max_norm, norm.dtype, count)
        return RuleStep(threshold, threshold, state, {})

    return Rule(lambda dtype: None, step, ())


class AutoClipState(NamedTuple):
    history: Array  # float[H]: the latest H finite norms, in arrival order (a ring buffer)
    ordered: Array  # float[H]: the same norms sorted, then +inf padding
    seen: Array  # int32[]: finite norms seen so far


def linear_percentile(ordered: Array, valid: Array, percentile: Array) -> Array:
    """numpy.percentile(v, percentile) with method='linear', where ``ordered[:valid]`` is v sorted.

    ``ordered`` has a static length; only its first ``valid`` entries count.
    """
    dtype = ordered.dtype
    n = ordered.shape[0]
    position = (valid - 1).astype(dtype) * (_apply.as_array(percentile, dtype) / 100)
    below = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, n - 1)
    above = jnp.clip(below + 1, 0, jnp.maximum(valid - 1, 0))
    weight = position - below.astype(dtype)
    a, b = ordered[below], ordered[above]
    # numpy's lerp: from below for weights < 0.5, from above otherwise
    diff = b - a
    return jnp.where(weight >= 0.5, b - diff * (1 - weight), a + diff * weight)


def _sorted_replace(ordered: Array, old: Array, remove: Array, new: Array) -> Array:
    """Removes one ``old`` (when ``remove``) from a sorted array and inserts ``new``.

    O(H) elementwise work instead of a sort each step; +inf pads the tail.
    """
    index = jnp.arange(ordered.shape[0])
    padded = jnp.concatenate([ordered, jnp.full((1,), jnp.inf, ordered.dtype)])
    first = jnp.sum(ordered < old)  # the position of one copy of ``old``
    shifted_left = jnp.where(index >= first, padded[1:], ordered)
    ordered = jnp.where(remove, shifted_left, ordered)
    slot = jnp.sum(ordered <= new)  # insert after equal values
    shifted_right = jnp.concatenate([ordered[:1], ordered[:-1]])
    return jnp.where(index < slot, ordered, jnp.where(index == slot, new, shifted_right))


def autoclip_rule(percentile: Any, history: int) -> Rule:
    """AutoClip: clip to the ``percentile`` of all norms so far, the current one included."""

    def init(dtype: Any) -> AutoClipState:
        return AutoClipState(
            history=jnp.zeros((history,), dtype),
            ordered=jnp.full((history,), jnp.inf, dtype),
            seen=jnp.zeros((), jnp.int32),
        )

    def step(state: AutoClipState, norm: Array, _count: Array) -> RuleStep:
        n = norm.astype(state.history.dtype)
        slot = state.seen % history
        ordered = _sorted_replace(state.ordered, state.history[slot], state.seen >= history, n)
        count = state.seen + 1
        threshold = linear_percentile(ordered, jnp.minimum(count, history), percentile)
        return RuleStep(
            target=threshold,
            boundary=threshold,
            state=AutoClipState(state.history.at[slot].set(n), ordered, count),
            extra={"seen": count.astype(n.dtype)},
        )

    return Rule(init, step, ("seen",))


class ZClipState(NamedTuple):
    seen: Array  # int32[]: finite norms seen so far
    mean: Array  # float[]: mean of the warmup norms, then their EMA
    var: Array  # float[]: population variance of the warmup norms, then its EMA


def zclip_rule(
    alpha: Any,
    z_thresh: Any,
    warmup_steps: Any,
    mode: str,
    clip_option: str,
    clip_factor: Any,
    max_norm: Any,
    skip_update_on_spike: bool,
    eps: Any,
) -> Rule:
    """ZClip: z-score spike detection against an EMA of the norm's mean and variance."""

    def init(dtype: Any) -> ZClipState:
        return ZClipState(jnp.zeros((), jnp.int32), jnp.zeros((), dtype), jnp.zeros((), dtype))

    def step(state: ZClipState, norm: Array, _count: Array) -> RuleStep:
        dtype = state.mean.dtype
        n = norm.astype(dtype)
        a, zt, cf, e = (_apply.as_array(v, dtype) for v in (alpha, z_thresh, clip_factor, eps))
        inf = jnp.full((), jnp.inf, dtype)
        cap = inf if max_norm is None else _apply.as_array(max_norm, dtype)
        warming = state.seen < jnp.asarray(warmup_steps)

        # warmup: running mean and population variance (Welford), clip only to the cap
        k = (state.seen + 1).astype(dtype)
        warm_mean = state.mean + (n - state.mean) / k
        warm_var = state.var + ((n - state.mean) * (n - warm_mean) - state.var) / k

        # after warmup: compare with the statistics of the previous step
        sigma = _sqrt(state.var)
        z = (n - state.mean) / (sigma + e)
        if mode == "zscore":
            spike = z > zt
            if clip_option == "adaptive_scaling":
                safe_z = jnp.where(spike, z, jnp.ones_like(z))
                c = (state.mean + zt * zt * sigma / safe_z) * cf
            else:  # "mean"
                c = state.mean
            boundary = state.mean + zt * (sigma + e)
        else:  # "percentile": clip to mean + z_thresh * sigma
            c = state.mean + zt * sigma
            spike = n > c
            boundary = c
        x = jnp.where(spike, c, n)  # the EMA is fed the clipped value
        ema_mean = a * state.mean + (1 - a) * x
        ema_var = a * state.var + (1 - a) * (x - ema_mean) ** 2
        if skip_update_on_spike:
            ema_mean = jnp.where(spike, state.mean, ema_mean)
            ema_var = jnp.where(spike, state.var, ema_var)

        spike = ~warming & spike
        target = jnp.minimum(jnp.where(spike, c, inf), cap)
        boundary = jnp.where(warming, cap, jnp.minimum(boundary, cap))
        new_state = ZClipState(
            seen=state.seen + 1,
            mean=jnp.where(warming, warm_mean, ema_mean),
            var=jnp.where(warming, warm_var, ema_var),
        )
        extra = {
            "mean": new_state.mean,
            "std": _sqrt(new_state.var),
            "z": jnp.where(warming, jnp.zeros_like(z), z),
            "spike": spike.astype(dtype),
            "warmup": warming.astype(dtype),
        }
        return RuleStep(target, boundary, new_state, extra)

    return Rule(init, step, ("mean", "std", "z", "spike", "warmup"))


class QuantileState(NamedTuple):
    threshold: Array  # float[]: the clip norm C for the next step


def quantile_rule(
    target_quantile: Any, learning_rate: Any, initial_threshold: Any, update: str
) -> Rule:
    """Andrew et al.: move C towards the target quantile of the norm stream."""

    def init(dtype: Any) -> QuantileState:
        return QuantileState(_apply.as_array(initial_threshold, dtype))

    def step(state: QuantileState, norm: Array, _count: Array) -> RuleStep:
        c = state.threshold
        dtype = c.dtype
        below = (norm.astype(dtype) <= c).astype(dtype)
        gap = below - _apply.as_array(target_quantile, dtype)
        lr = _apply.as_array(learning_rate, dtype)
        if update == "geometric":
            new_c = c * jnp.exp(-lr * gap)
        else:  # arithmetic; kept >= 0
            new_c = jnp.maximum(c - lr * gap, 0)
        return RuleStep(c, c, QuantileState(new_c), {"below": below})

    return Rule(init, step, ("below",))


class AdaGCUnits(NamedTuple):
    """One AdaGC step on a set of units (leaves, slices of leaves, or the global norm)."""

    scale: _apply.Factor  # factor per unit
    gamma: Array  # next gamma per unit


def adagc_units(
    norm: Array,
    gamma: Array,
    warming: Array,
    first: Array,
    warmup_scale: _apply.Factor,
    lambda_rel: Any,
    beta: Any,
    eps: Any,
) -> AdaGCUnits:
    """The AdaGC update of every unit at once (arrays broadcast together).

    Args:
      norm: each unit's pre-clip norm.
      gamma: each unit's state.
      warming: whether this step is in the warmup.
      first: whether this is the first step (gamma starts at the norm).
      warmup_scale: the warmup's global-clip factor, applied before measuring.
      lambda_rel, beta, eps: the rule's hyperparameters.
    """
    dtype = gamma.dtype
    n = norm.astype(dtype)
    lam, b, e = (_apply.as_array(v, dtype) for v in (lambda_rel, beta, eps))
    # warmup: units measured after the global clip; gamma is their running minimum
    warm_scale = _apply.Factor(*(jnp.broadcast_to(f.astype(dtype), n.shape) for f in warmup_scale))
    after_warmup_clip = _apply.multiply(n, warm_scale)
    warm_gamma = jnp.where(first, after_warmup_clip, jnp.minimum(gamma, after_warmup_clip))
    # after: clip units above lambda * gamma, then an EMA of the clipped norms
    limit = lam * gamma
    over = n > limit
    unit_scale = _apply.as_factor(jnp.where(over, limit / (n + e), jnp.ones_like(n)), limit, n + e)
    clipped_norm = jnp.where(over, limit, n)
    ema_gamma = b * gamma + (1 - b) * clipped_norm
    return AdaGCUnits(
        scale=_apply.select(warming, warm_scale, unit_scale),
        gamma=jnp.where(warming, warm_gamma, ema_gamma),
    )
