"""Gradient health: per-leaf norms, non-finite leaves, exploding and vanishing leaves."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxclip import _checks, _norms

Array = jax.Array


class GradReport(NamedTuple):
    """What :func:`diagnose` found; a pytree of arrays, so it can leave a jitted step.

    ``leaf_norms``, ``nan_count`` and ``inf_count`` have the structure of the
    gradient. Read it outside ``jit`` with :meth:`nonfinite`, :meth:`exploding`,
    :meth:`vanishing` and :meth:`text`.
    """

    global_norm: Array  # float32[]: L2 norm of the whole gradient (NaN/inf if any leaf is)
    leaf_norms: Any  # float32[] per leaf: its L2 norm
    nan_count: Any  # int32[] per leaf: how many elements are NaN
    inf_count: Any  # int32[] per leaf: how many elements are +-inf
    median_leaf_norm: Array  # float32[]: the median of the finite leaf norms

    def _rows(self) -> list[tuple[str, float, int, int]]:
        flat = jax.tree_util.tree_flatten_with_path(self.leaf_norms)[0]
        nans = jax.tree.leaves(self.nan_count)
        infs = jax.tree.leaves(self.inf_count)
        return [
            (_checks.path_name(path) or "<root>", float(n), int(a), int(b))
            for (path, n), a, b in zip(flat, nans, infs)
        ]

    def nonfinite(self) -> list[str]:
        """Paths of the leaves holding NaN or inf, in the gradient's order."""
        return [path for path, _, nans, infs in self._rows() if nans or infs]

    def exploding(self, ratio: float = 1e3) -> list[str]:
        """Paths of finite leaves whose norm exceeds ``ratio`` times the median leaf norm."""
        median = float(self.median_leaf_norm)
        return [p for p, n, _, _ in self._rows() if np.isfinite(n) and n > ratio * median]

    def vanishing(self, ratio: float = 1e3) -> list[str]:
        """Paths of leaves whose norm is below the median leaf norm divided by ``ratio``."""
        median = float(self.median_leaf_norm)
        return [p for p, n, _, _ in self._rows() if np.isfinite(n) and n * ratio < median]

    def text(self, ratio: float = 1e3) -> str:
        """A readable report (outside ``jit``)."""
        rows = self._rows()
        exploding, vanishing = set(self.exploding(ratio)), set(self.vanishing(ratio))
        width = max([len(r[0]) for r in rows] + [4])
        lines = [
            f"global norm {float(self.global_norm):.4g} over {len(rows)} leaves; "
            f"median of the finite leaf norms {float(self.median_leaf_norm):.4g}",
            f"  {'leaf':<{width}}  {'norm':>11}  notes",
        ]
        for path, norm, nans, infs in rows:
            flags = [
                (nans, f"{nans} NaN"),
                (infs, f"{infs} inf"),
                (path in exploding, f"exploding (> {ratio:g} x median)"),
                (path in vanishing, f"vanishing (< median / {ratio:g})"),
            ]
            notes = ", ".join(text for present, text in flags if present)
            lines.append(f"  {path:<{width}}  {norm:>11.4g}  {notes}".rstrip())
        bad = self.nonfinite()
        if bad:
            lines.append(
                f"non-finite leaves: {', '.join(bad)}. The leaf nearest the loss in the "
                "forward pass is usually where the NaN or inf started."
            )
        return "\n".join(lines)


def diagnose(grads: Any) -> GradReport:
    """Checks a gradient's health: per-leaf norms, NaN/inf counts, the global norm.

    Usable inside ``jax.jit`` (it returns arrays, read outside the step). When a run
    goes NaN, log the report of each step and look at the first step with non-finite
    leaves.

    Args:
      grads: a pytree of floating-point arrays.

    Returns:
      A :class:`GradReport`. Norms use jaxclip's robust accumulation, so a
      float16 leaf of large values shows its true norm, not inf.

    Example:
      >>> import jax.numpy as jnp, jaxclip
      >>> grads = {"dense": jnp.array([3.0, 4.0]), "head": jnp.array([1.0, jnp.nan])}
      >>> report = jaxclip.diagnose(grads)
      >>> report.nonfinite()
      ['head']
      >>> float(report.leaf_norms["dense"])
      5.0
    """
    paths, leaves = _checks.float_leaves(grads, "jaxclip.diagnose", "grads")
    measured = _norms.unit_norms(leaves, 2.0, [None] * len(leaves))
    stacked = measured.norms.astype(jnp.float32)
    norms = measured.per_leaf(stacked)
    nan_count = [jnp.sum(jnp.isnan(x), dtype=jnp.int32) for x in leaves]
    inf_count = [jnp.sum(jnp.isinf(x), dtype=jnp.int32) for x in leaves]
    if norms:
        median = jnp.nanmedian(jnp.where(jnp.isfinite(stacked), stacked, jnp.nan))
        median = jnp.where(jnp.isnan(median), 0.0, median)
    else:
        median = jnp.zeros((), jnp.float32)
    return GradReport(
        global_norm=_norms.combine_norms([stacked], 2.0).astype(jnp.float32),
        leaf_norms=_checks.replace_leaves(grads, paths, norms),
        nan_count=_checks.replace_leaves(grads, paths, nan_count),
        inf_count=_checks.replace_leaves(grads, paths, inf_count),
        median_leaf_norm=median,
    )
