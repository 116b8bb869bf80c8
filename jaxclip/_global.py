"""The shared machinery of the global-norm clippers: measure, then rescale.

A global-norm clipper differs from another only in how it picks its
threshold; :func:`measure` and :func:`rescale` do the rest, so that every one
of them has the same numerics, non-finite policies and statistics.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from jaxclip import _apply, _checks, _norms

Array = jax.Array


class Measured(NamedTuple):
    """A gradient and its global norm."""

    paths: list[Any]
    leaves: list[Array]
    norm: Array  # accumulation dtype []: the pre-clip norm
    finite: Array  # bool[]: every element finite and the norm in range


def measure(owner: str, updates: Any, p: float, policy: str) -> Measured:
    """Checks the leaves (at trace time) and computes the global p-norm."""
    flat = _checks.float_leaves(updates, owner)
    paths = [path for path, _ in flat]
    leaves = [x for _, x in flat]
    norm, finite = _norms.global_norm_and_finite(leaves, p, sanitize=policy == "zero")
    chex.assert_shape([norm, finite], ())
    return Measured(paths, leaves, norm, finite)


class Rescaled(NamedTuple):
    updates: Any
    scale: Array  # accumulation dtype []: the factor applied (0 for a skipped step)
    clipped: Array  # bool[]: rescaled at this step


def rescale(
    owner: str,
    updates: Any,
    measured: Measured,
    threshold: Array,
    *,
    eps: Any = 0.0,
    min_norm: Any = None,
    policy: str = "propagate",
) -> Rescaled:
    """Brings the gradient's norm to ``threshold`` under the non-finite ``policy``."""
    scale = _apply.scale_for(measured.norm, threshold, eps=eps, min_norm=min_norm)
    if policy == "error":
        _apply.raise_if_nonfinite(owner, measured.paths, measured.leaves, measured.finite)
    new_updates = _checks.map_float_leaves(
        lambda x: _apply.apply_policy(x, scale, measured.finite, policy), updates
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(new_updates, updates)
    clipped = measured.finite & (scale != 1)
    return Rescaled(new_updates, _apply.reported_scale(scale, measured.finite, policy), clipped)


def stats_dtype(params: Any) -> Any:
    """float64 when ``params`` has a float64 leaf (with x64 enabled), else float32."""
    dtypes = [getattr(x, "dtype", None) for x in jax.tree.leaves(params)]
    return _norms.accumulation_dtype([d for d in dtypes if d is not None])


def initial_threshold(value: Any, dtype: Any) -> Array:
    """The initial threshold to record: the value at step 0 if it can be read."""
    return _apply.as_threshold(value, jnp.zeros((), jnp.int32), dtype)
