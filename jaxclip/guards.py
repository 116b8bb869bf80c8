"""Whole-step guards: wrappers that skip an optimizer step on a spike."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxclip import _checks, _clip
from jaxclip._stats import ClipStats, next_stats

Array = jax.Array


class SkipOnSpikeState(NamedTuple):
    """The wrapped transformation's state and the rolling windows."""

    inner: Any  # the wrapped transformation's state
    norms: Array  # float[W]: the latest finite pre-clip norms (ring buffer)
    losses: Array  # float[W]: the latest finite losses (ring buffer)
    norm_count: Array  # int32[]: finite norms seen
    loss_count: Array  # int32[]: finite losses seen
    consecutive_skips: Array  # int32[]: steps skipped in a row up to this one
    stats: ClipStats


def _window_stats(values: Array, count: Array) -> tuple[Array, Array, Array]:
    """Mean, unbiased std and number of valid entries of a ring buffer."""
    size = values.shape[0]
    valid = jnp.minimum(count, size)
    mask = jnp.arange(size) < valid
    n = valid.astype(values.dtype)
    mean = jnp.sum(jnp.where(mask, values, 0)) / jnp.maximum(n, 1)
    squares = jnp.sum(jnp.where(mask, (values - mean) ** 2, 0))
    std = jnp.sqrt(squares / jnp.maximum(n - 1, 1))
    return mean, std, valid


def _push(values: Array, count: Array, x: Array, ok: Array) -> tuple[Array, Array]:
    """Appends ``x`` to the ring buffer when ``ok``."""
    slot = count % values.shape[0]
    updated = values.at[slot].set(x.astype(values.dtype))
    return jnp.where(ok, updated, values), count + ok.astype(jnp.int32)


def skip_on_spike(
    inner: optax.GradientTransformation,
    window: int = 128,
    factor: Any = 6.0,
    *,
    max_consecutive_skips: int | None = None,
    axis_name: Any = None,
    replicated: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Skips the whole step when the gradient norm or the loss spikes.

    Keeps the latest ``window`` pre-clip global norms (of the gradient the
    wrapper receives) and, when ``update`` is given ``loss=...``, the latest
    losses. A step is skipped (zero updates; ``inner``'s state unchanged, so
    e.g. Adam's moments and step count do not move) when the norm or the loss
    is more than ``factor`` standard deviations (unbiased) above the mean of
    its window, once the window holds at least ``window // 2`` values. A step
    with a non-finite norm or loss is skipped too. The windows keep filling
    on skipped steps (non-finite values are left out).

    Args:
      inner: the transformation to guard, typically the whole optimizer,
        e.g. ``optax.chain(jaxclip.clip_by_global_norm(1.0), optax.adamw(3e-4))``.
      window: the window length, a Python int >= 2 (static: it fixes the state's
        shape).
      factor: how many standard deviations above the mean count as a spike, > 0.
      max_consecutive_skips: None (default: no limit) or the most steps skipped in
        a row, an int >= 0; the next is taken (as ``optax.apply_if_finite`` does
        after ``max_consecutive_errors``) and counted in ``forced_steps``, so that a
        run whose norms rose for good, or stay non-finite, moves on (or visibly
        fails) instead of freezing.
      axis_name: a sharded gradient's mapped axes (``docs/guides/distributed.md``);
        the loss must then be the same on every device (e.g. its ``pmean``).
      replicated: with ``axis_name``, the leaves that are whole on every device.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; call
      ``update(grads, state, params, loss=loss)`` to watch the loss too. Its
      :class:`SkipOnSpikeState` holds a :class:`~jaxclip.ClipStats` where
      ``clipped`` means skipped and ``scale`` is 0 on skipped steps; ``extra``:
      ``norm_mean``, ``norm_std``, ``loss_mean``, ``loss_std``, ``loss`` and
      ``forced_steps`` (``docs/guides/statistics.md``).

    Example:
      >>> import jax.numpy as jnp, optax, jaxclip
      >>> tx = jaxclip.skip_on_spike(optax.sgd(0.1), window=4)
      >>> state = tx.init(jnp.zeros(1))
      >>> for g in (1.0, 1.1, 0.9, 1.0, 100.0):
      ...     updates, state = tx.update(jnp.array([g]), state, loss=jnp.array(2.0))
      >>> updates.tolist(), int(state.stats.clipped_steps)
      ([0.0], 1)

    References:
      Spike skipping as in OLMo 2 (Team OLMo, "2 OLMo 2 Furious", 2024,
      arXiv:2501.00656) and MaxText's ``skip_step_on_spikes``.
    """
    owner = "jaxclip.skip_on_spike"
    window = _checks.check_static_int(owner, "window", window, 2)
    max_consecutive_skips = _checks.check_nonfinite(owner, "skip", max_consecutive_skips)[1]
    _checks.check_scalar(owner, "factor", factor, minimum=0.0, strict=True)
    where = _clip.mapped(owner, axis_name, replicated)
    inner = optax.with_extra_args_support(inner)
    extra_names = ("norm_mean", "norm_std", "loss_mean", "loss_std", "loss", "forced_steps")

    def init_fn(params: Any) -> SkipOnSpikeState:
        dtype, stats = _clip.initial(params, extra_names, None, 0.0)
        return SkipOnSpikeState(
            inner=inner.init(params),
            norms=jnp.zeros((window,), dtype),
            losses=jnp.zeros((window,), dtype),
            norm_count=jnp.zeros((), jnp.int32),
            loss_count=jnp.zeros((), jnp.int32),
            consecutive_skips=jnp.zeros((), jnp.int32),
            stats=stats,
        )

    def update_fn(
        updates: Any, state: SkipOnSpikeState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, SkipOnSpikeState]:
        dtype = state.norms.dtype
        k = jnp.asarray(factor).astype(dtype)
        measured = _clip.measure(owner, updates, 2.0, "propagate", where)
        norm, norm_finite = measured.norm.astype(dtype), measured.finite
        norm_mean, norm_std, norm_valid = _window_stats(state.norms, state.norm_count)
        warm = norm_valid >= window // 2
        boundary = jnp.where(warm, norm_mean + k * norm_std, jnp.inf)
        skip = ~norm_finite | (norm > boundary)

        loss = extra_args.get("loss")
        # a fresh array each: a state whose fields share buffers cannot be donated
        loss_mean, loss_std, loss_value = (jnp.zeros((), dtype) for _ in range(3))
        losses, loss_count = state.losses, state.loss_count
        if loss is not None:
            loss_value = jnp.asarray(loss).astype(dtype)
            if loss_value.shape != ():
                raise ValueError(f"{owner}: loss must be a scalar, got shape {loss_value.shape}.")
            loss_mean, loss_std, loss_valid = _window_stats(state.losses, state.loss_count)
            loss_finite = jnp.isfinite(loss_value)
            loss_spike = (loss_valid >= window // 2) & (loss_value - loss_mean > k * loss_std)
            skip = skip | ~loss_finite | loss_spike
            losses, loss_count = _push(state.losses, state.loss_count, loss_value, loss_finite)
        norms, norm_count = _push(state.norms, state.norm_count, norm, norm_finite)
        forced = jnp.zeros((), bool)
        if max_consecutive_skips is not None:
            forced = skip & (state.consecutive_skips >= max_consecutive_skips)
            skip = skip & ~forced
        consecutive = jnp.where(skip, state.consecutive_skips + 1, 0)

        def take(_: None) -> tuple[Any, Any]:
            return inner.update(updates, state.inner, params, **extra_args)

        def reject(_: None) -> tuple[Any, Any]:
            shapes = jax.eval_shape(take, None)[0]
            if jax.tree.structure(shapes) == jax.tree.structure(updates):
                # zeros_like keeps the inputs' placement (e.g. shard_map's varying axes)
                zeros = jax.tree.map(lambda u, s: jnp.zeros_like(u, s.dtype), updates, shapes)
            else:
                zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            return zeros, state.inner

        # a branch: a skipped step does not run the inner update at all
        new_updates, new_inner = jax.lax.cond(~skip, take, reject, None)
        stats = next_stats(
            state.stats,
            norm=norm,
            threshold=boundary,
            scale=jnp.where(skip, 0.0, 1.0),
            clipped=skip,
            finite=norm_finite,
            extra={
                "norm_mean": norm_mean,
                "norm_std": norm_std,
                "loss_mean": loss_mean,
                "loss_std": loss_std,
                "loss": loss_value,
                "forced_steps": state.stats.extra["forced_steps"] + forced.astype(dtype),
            },
        )
        return new_updates, SkipOnSpikeState(
            new_inner, norms, losses, norm_count, loss_count, consecutive, stats
        )

    return _clip.transformation_with_extra_args(init_fn, update_fn)
