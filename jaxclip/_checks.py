"""Argument checks: hyperparameters at construction, gradient trees at trace time.

Hyperparameters may be Python numbers, concrete arrays, or tracers (when
``optax.inject_hyperparams`` rebuilds a transform inside a jitted update). Only
values that can be read are checked; tracers were checked when the same
transform was built with concrete values in ``init``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

NONFINITE_POLICIES = ("propagate", "skip", "zero", "error")
NUMBERS = (int, float, np.ndarray, np.generic, jax.Array)  # bool too: refuse it first


def is_traced(value: Any) -> TypeGuard[Tracer]:
    """Whether ``value`` is an abstract value inside a jax transformation."""
    return isinstance(value, Tracer)


def concrete_value(value: Any) -> float | None:
    """Returns ``value`` as a Python float when it can be read now, else None."""
    if isinstance(value, (int, float)):  # bool too
        return float(value)
    if is_traced(value):
        return None
    if isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.ndim(value) == 0:
        return float(np.asarray(value))
    return None


def _describe(value: Any) -> str:
    if isinstance(value, (np.ndarray, np.generic, jax.Array)) and not is_traced(value):
        return f"{np.asarray(value)!r}"
    return repr(value)


def check_scalar(
    owner: str,
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    strict: bool = False,
    maximum: float | None = None,
    below: float | None = None,
    allow_inf: bool = False,
) -> None:
    """Raises ValueError if the scalar hyperparameter ``name`` of ``owner`` (the public
    function being built) is below ``minimum`` (or at it, if ``strict``), above
    ``maximum``, at or above ``below``, NaN, or infinite (+inf passes with
    ``allow_inf``); TypeError if it is not a real number."""
    if isinstance(value, bool) or not isinstance(value, NUMBERS):
        raise TypeError(
            f"{owner}: {name} must be a real number or a scalar array, got {_describe(value)}."
        )
    if np.ndim(value) != 0:
        raise ValueError(
            f"{owner}: {name} must be a scalar, got an array of shape {np.shape(value)}."
        )
    if is_traced(value):
        return
    dtype = np.asarray(value).dtype
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{owner}: {name} must be a real number, got {_describe(value)}.")
    v = float(np.asarray(value))
    if math.isnan(v):
        raise ValueError(f"{owner}: {name} must not be NaN.")
    if math.isinf(v) and not (allow_inf and v > 0):
        raise ValueError(f"{owner}: {name} must be finite, got {v}.")
    if minimum is not None and (v < minimum or (strict and v == minimum)):
        relation = ">" if strict else ">="
        raise ValueError(f"{owner}: {name} must be {relation} {minimum}, got {v}.")
    if maximum is not None and v > maximum:
        raise ValueError(f"{owner}: {name} must be <= {maximum}, got {v}.")
    if below is not None and v >= below:
        raise ValueError(f"{owner}: {name} must be < {below}, got {v}.")


def check_threshold(owner: str, name: str, value: Any, allow_inf: bool = True) -> None:
    """A norm threshold: a number >= 0, a scalar array, or a schedule. +inf means
    "never clip" (as in PyTorch and Optax: the way to log the norm only)."""
    if callable(value) and not isinstance(value, (jax.Array, np.ndarray)):
        return  # a schedule of the step count; checked when it is called
    check_scalar(owner, name, value, minimum=0.0, allow_inf=allow_inf)


def check_choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{owner}: {name} must be one of {options}, got {value!r}.")
    return value


def check_nonfinite(
    owner: str, nonfinite: Any, max_consecutive_skips: Any = None
) -> tuple[str, int | None]:
    """The non-finite policy, and its limit on skips in a row (``"skip"`` only)."""
    policy = check_choice(owner, "nonfinite", nonfinite, NONFINITE_POLICIES)
    if max_consecutive_skips is None:
        return policy, None
    if policy != "skip":
        raise ValueError(
            f"{owner}: max_consecutive_skips applies to nonfinite='skip' only, got "
            f"nonfinite={nonfinite!r}."
        )
    return policy, check_static_int(owner, "max_consecutive_skips", max_consecutive_skips, 0)


def check_order(owner: str, value: Any) -> float:
    """The norm order as a float: 1, 2, inf or a real p >= 1 (None means 2). It selects
    code at trace time, so it must be a Python number (or a concrete array); an injected
    (traced) order is refused with instructions."""
    if value is None:
        return 2.0
    if isinstance(value, str) and value.lower() in ("inf", "infinity"):
        return math.inf
    if is_traced(value):
        raise ValueError(
            f"{owner}: ord must be a Python number, but it is traced. Under "
            "optax.inject_hyperparams pass static_args=('ord',), or leave ord at its "
            "default (None, the L2 norm)."
        )
    p = None if isinstance(value, bool) else concrete_value(value)  # None for other strings
    if p is None:
        raise ValueError(f"{owner}: ord must be 1, 2, inf or a real number >= 1, got {value!r}.")
    if math.isnan(p) or p < 1:
        raise ValueError(f"{owner}: ord must be 1, 2, inf or a real number >= 1, got {p}.")
    return p


def check_axis(owner: str, axis: Any) -> tuple[int, ...] | None:
    """Normalises ``axis`` (None, an int or a sequence of ints) to a tuple."""
    if axis is None:
        return None
    if is_traced(axis):
        raise ValueError(
            f"{owner}: axis must be a Python int or tuple of ints, but it is traced. Under "
            "optax.inject_hyperparams pass static_args=('axis',)."
        )
    items = (axis,) if np.ndim(axis) == 0 and not isinstance(axis, (tuple, list)) else axis
    out = []
    for a in items:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer, np.ndarray, jax.Array)):
            raise ValueError(f"{owner}: axis must be an int or a tuple of ints, got {axis!r}.")
        out.append(int(a))
    if len(set(out)) != len(out):
        raise ValueError(f"{owner}: axis has repeated entries: {axis!r}.")
    return tuple(out)


def path_name(path: Sequence[Any]) -> str:
    """A pytree path as slash-separated keys, e.g. ``layers/0/kernel``."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def check_static_int(owner: str, name: str, value: Any, minimum: int) -> int:
    """A Python int that fixes an array shape (it cannot be traced or injected)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"{owner}: {name} fixes the shape of the state, so it must be a Python int, got "
            f"{_describe(value)}. Under optax.inject_hyperparams pass static_args=('{name}',)."
        )
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}.")
    return int(value)


def path_str(path: Sequence[Any]) -> str:
    """A readable pytree path such as ``['dense']['kernel']`` (``<root>`` if empty)."""
    s = jax.tree_util.keystr(tuple(path))
    return s if s else "<root>"


def float_leaves(tree: Any, owner: str, what: str = "updates") -> tuple[list[Any], list[jax.Array]]:
    """The paths and the leaves of ``tree``; a TypeError names every integer, boolean or
    complex leaf. ``None`` leaves and empty subtrees have no leaves and pass. ``float0``
    leaves (JAX's gradient of an integer input) carry no values and are not returned:
    the transforms pass them through unchanged."""
    paths, leaves, bad = [], [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if getattr(leaf, "dtype", None) is None:
            leaf = jnp.asarray(leaf)
        dtype = leaf.dtype
        if dtype == jax.dtypes.float0:
            continue
        if not jnp.issubdtype(dtype, jnp.floating):
            bad.append(f"{path_str(path)} has dtype {dtype}")
        paths.append(path)
        leaves.append(leaf)
    if bad:
        leaves = "leaf " if len(bad) == 1 else "leaves "
        raise TypeError(
            f"{owner}: {what} {leaves}{'; '.join(bad)}. Clipping needs floating-point "
            "leaves (float16, bfloat16, float32 or float64): cast them, or leave them out of "
            "the transform with optax.masked / optax.partition."
        )
    return paths, leaves


def map_float_leaves(fn: Callable[[Any], Any], tree: Any) -> Any:
    """``jax.tree.map`` that leaves ``float0`` leaves untouched."""
    return jax.tree.map(
        lambda x: x if getattr(x, "dtype", None) == jax.dtypes.float0 else fn(x), tree
    )


def replace_leaves(tree: Any, paths: Sequence[Any], new_leaves: Sequence[Any]) -> Any:
    """``tree`` with the leaf at each of ``paths`` replaced; other leaves kept."""
    by_path = {tuple(path): leaf for path, leaf in zip(paths, new_leaves)}
    return jax.tree_util.tree_map_with_path(lambda path, x: by_path.get(tuple(path), x), tree)


def normalize_axes(
    owner: str, paths: Sequence[Any], leaves: Sequence[jax.Array], axis: tuple[int, ...] | None
) -> list[tuple[int, ...] | None]:
    """Per leaf, ``axis`` made non-negative; raises if a leaf lacks those axes."""
    if axis is None:
        return [None] * len(leaves)
    out: list[tuple[int, ...] | None] = []
    for path, x in zip(paths, leaves):
        if not all(-x.ndim <= a < x.ndim for a in axis):
            raise ValueError(
                f"{owner}: axis={axis} does not fit leaf {path_str(path)} of shape "
                f"{x.shape}. Choose axes every leaf has, or clip such leaves separately "
                "with optax.partition."
            )
        resolved = [a % x.ndim for a in axis]
        if len(set(resolved)) != len(resolved):
            raise ValueError(
                f"{owner}: axis={axis} names the same axis twice for leaf "
                f"{path_str(path)} of shape {x.shape}."
            )
        out.append(tuple(sorted(resolved)))
    return out
