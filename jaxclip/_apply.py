"""Turning a norm and a threshold into a scale (plain, PyTorch's with ``eps``, or with a
lower bound), and applying it under a non-finite policy with a dtype-preserving multiply."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxclip import _checks

Array = jax.Array


def as_array(value: Any, dtype: Any, step: Array | None = None) -> Array:
    """A hyperparameter as a ``dtype`` scalar: a number, an array (possibly traced,
    e.g. injected with ``optax.inject_hyperparams``) or a schedule ``step -> value``
    (read at ``step``, or at 0 without one)."""
    if callable(value) and not isinstance(value, jax.Array):
        value = value(jnp.zeros((), jnp.int32) if step is None else step)
    return jnp.asarray(value).astype(dtype)


# A scale below _TINY is kept as two factors, the second _SHIFT (see Factor).
_TINY = 2.0**-100
_SHIFT = 2.0**-64


class Factor(NamedTuple):
    """A clip's scale, applied as ``(x * value) * tiny``.

    ``tiny`` is 1, except for a scale below 2^-100: then ``value`` is the scale
    times 2^64 and ``tiny`` is 2^-64. A scale under the smallest normal float
    (2^-126 in float32), from a norm more than 2^126 times its threshold, would
    be flushed to zero by XLA on CPU and zero the gradient; as two normal
    factors it gives the clipped gradient. Scales down to 2^-190 are kept (float32).
    """

    value: Array
    tiny: Array

    def product(self) -> Array:
        """The scale as one number, for the statistics (0 where it underflows)."""
        return self.value * self.tiny


def as_factor(scale: Array, numerator: Array, denominator: Array) -> Factor:
    """``scale``, which is 1, NaN or ``numerator / denominator``, as a :class:`Factor`."""
    # a positive scale below 2^-100 (possibly flushed to 0): the denominator is
    # above 2^100 times the numerator
    small = (scale < _TINY) & (numerator > 0) & jnp.isfinite(denominator)
    one = jnp.ones_like(scale)
    # denominator * 2^-64 is at most 2^64 (float32), so its reciprocal is a normal
    # float; it is held at the smallest normal, below which the numerator would be
    # under 2^-162 (zero on CPU)
    shrunk = jnp.maximum(denominator * _SHIFT, jnp.finfo(scale.dtype).tiny)
    # both end in a division, which XLA computes once instead of copying it into
    # every fusion that reads it (x / 1 == x, NaN / 1 is NaN)
    value = jnp.where(small, numerator, scale) / jnp.where(small, shrunk, one)
    tiny = one / jnp.where(small, 1 / _SHIFT, 1.0).astype(scale.dtype)
    return Factor(value, tiny)


def select(condition: Array, a: Factor, b: Factor) -> Factor:
    """``a`` where ``condition`` holds, else ``b``."""
    return Factor(*(jnp.where(condition, x, y) for x, y in zip(a, b)))


def scale_for(
    norm: Array,
    threshold: Array,
    *,
    eps: Any = 0.0,
    min_norm: Any = None,
    eps_in_condition: bool = True,
) -> Factor:
    """The factor that brings ``norm`` down to ``threshold`` (or up to ``min_norm``).

    With ``eps == 0``: ``threshold / norm`` when ``norm > threshold``, else 1.
    With ``eps > 0`` (PyTorch's ``clip_grad_norm_``): ``min(1, threshold *
    (1 / (norm + eps)))``, computed as PyTorch computes it so that float32
    results agree bit for bit; with ``eps_in_condition=False`` that factor is
    applied only when ``norm > threshold`` (ZClip, AdaGC). A NaN norm gives a
    NaN scale and an infinite norm a zero scale, as in Optax and PyTorch; the
    non-finite policies decide what happens next. ``norm == threshold == 0``
    gives 1, never NaN. Returned as a :class:`Factor`.
    """
    dtype = norm.dtype
    threshold = jnp.asarray(threshold, dtype)
    eps_value = _checks.concrete_value(eps)
    if eps_value == 0.0 and min_norm is None:
        # One division at the root (x / x == 1, NaN / NaN is NaN): XLA then computes
        # per-unit scales once instead of inside every element they multiply.
        over = norm > threshold
        one = jnp.ones_like(norm)
        scale = jnp.where(over, threshold, one) / jnp.where(over | jnp.isnan(norm), norm, one)
        return as_factor(scale, threshold, norm)
    safe_norm = jnp.where(norm > 0, norm, jnp.ones_like(norm))
    # an infinite threshold (no clipping) gives scale 1; a finite stand-in keeps the
    # unused coefficient, and so its gradient, finite
    finite_threshold = jnp.where(jnp.isfinite(threshold), threshold, jnp.zeros_like(threshold))
    plain = finite_threshold / safe_norm
    if eps_value == 0.0:
        coef, over = plain, norm > threshold
    else:
        eps_arr = jnp.asarray(eps, dtype)
        coef = finite_threshold * lax.reciprocal(norm + eps_arr)
        if eps_value is None:  # traced eps: choose at run time
            coef = jnp.where(eps_arr > 0, coef, plain)
        over = (norm + eps_arr if eps_in_condition else norm) > threshold
    scale = jnp.where(over, jnp.minimum(coef, 1), jnp.ones_like(norm))
    if min_norm is not None:
        lower = jnp.asarray(min_norm, dtype)
        raise_up = (norm > 0) & (norm < lower)
        scale = jnp.where(raise_up, lower / safe_norm, scale)
    scale = jnp.where(jnp.isnan(norm), jnp.full_like(norm, jnp.nan), scale)
    # a scale below 2^-100 comes from clipping: threshold / (norm [+ eps])
    return as_factor(scale, threshold, norm + (0 if eps_value == 0.0 else jnp.asarray(eps, dtype)))


def multiply(x: Array, scale: Factor) -> Array:
    """``x * scale`` computed in the scale's dtype and rounded once to ``x.dtype``."""
    value, tiny = scale
    if x.dtype == value.dtype:
        return x * value * tiny
    return (x.astype(value.dtype) * value * tiny).astype(x.dtype)


def apply_policy(x: Array, scale: Factor, step_finite: Array, policy: str) -> Array:
    """Scales one leaf under a non-finite policy.

    ``propagate`` and ``error`` multiply as they are; ``skip`` returns zeros when
    the step is not finite; ``zero`` sets non-finite elements to zero.
    """
    if policy == "skip":
        return jnp.where(step_finite, multiply(x, scale), jnp.zeros_like(x))
    if policy == "zero":
        return jnp.where(jnp.isfinite(x), multiply(x, scale), jnp.zeros_like(x))
    return multiply(x, scale)


def reported_scale(scale: Array, step_finite: Array, policy: str) -> Array:
    """The scale recorded in the statistics: 0 for a skipped step."""
    if policy == "skip":
        return jnp.where(step_finite, scale, jnp.zeros_like(scale))
    return scale


def raise_if_nonfinite(
    owner: str, paths: Sequence[Any], leaves: Sequence[Array], step_finite: Array
) -> None:
    """Raises FloatingPointError, naming the leaves, when ``step_finite`` is False.

    Works inside ``jit``: the leaves are inspected (one extra pass) only on a
    non-finite step, and the error surfaces when the step's result is used.
    """
    names = [_checks.path_str(p) for p in paths]

    def report(has_nan: Sequence[Array], has_inf: Sequence[Array]) -> None:
        kinds = [[k for k, f in (("NaN", n), ("inf", i)) if f] for n, i in zip(has_nan, has_inf)]
        bad = [f"{name} has {' and '.join(k)}" for name, k in zip(names, kinds) if k]
        overflow = "no element is NaN or inf, but the norm overflows the accumulation dtype"
        detail = "; ".join(bad) or overflow
        raise FloatingPointError(
            f"{owner}: non-finite gradient ({detail}). Use nonfinite='skip' to skip such "
            "steps, 'zero' to zero the non-finite elements, or 'propagate' to pass them on."
        )

    def flags() -> tuple[list[Array], list[Array]]:
        return [jnp.any(jnp.isnan(x)) for x in leaves], [jnp.any(jnp.isinf(x)) for x in leaves]

    if not _checks.is_traced(step_finite):  # eager: raise here, plainly
        if not bool(step_finite):
            report(*flags())
        return
    lax.cond(step_finite, lambda: None, lambda: jax.debug.callback(report, *flags()))
