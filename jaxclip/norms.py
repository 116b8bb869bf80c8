"""The robust norms as public functions: of a whole pytree and of each leaf."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxclip import _checks, _norms

Array = jax.Array


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
    leaves = _checks.float_leaves(tree, "jaxclip.global_norm", "tree")[1]
    return _norms.global_norm_and_finite(leaves, p)[0]


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
    paths, leaves = _checks.float_leaves(tree, owner, "tree")
    axes = _checks.normalize_axes(owner, paths, leaves, axis_t)
    measured = _norms.unit_norms(leaves, p, axes)
    norms = [
        n.astype(_norms.accumulation_dtype([x.dtype])) for n, x in zip(measured.per_leaf(), leaves)
    ]
    if not keepdims:
        norms = [jnp.squeeze(n, a) if a is not None else n for n, a in zip(norms, axes)]
    return _checks.replace_leaves(tree, paths, norms)
