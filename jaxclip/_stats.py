"""The statistics record every jaxclip transform keeps, and how to find it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxclip import _checks

Array = jax.Array


class ClipStats(NamedTuple):
    """What a jaxclip transform saw and did at its latest update.

    Each clipper's fields and ``extra`` keys are in ``docs/guides/statistics.md``.
    For the global-norm clippers ``scale`` is the factor applied to every element;
    one below float32's smallest normal number, for a norm more than 2^126 times
    the threshold, is recorded as 0 on CPU, though it is applied exactly.
    """

    norm: Array  # float32[] (float64 for float64 params): pre-clip global norm
    threshold: Array  # float32[]: the threshold in force at this step
    scale: Array  # float32[]: global norm after / before clipping (1: unchanged)
    clipped: Array  # bool[]: the gradient was rescaled at this step
    finite: Array  # bool[]: the pre-clip gradient was finite
    step: Array  # int32[]: updates seen
    clipped_steps: Array  # int32[]: updates that rescaled the gradient
    nonfinite_steps: Array  # int32[]: updates with a non-finite gradient
    extra: dict[str, Array]  # the rule's own statistics, e.g. ZClip's mean and var

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """A flat ``{name: float}`` dict for any logger (outside ``jit``).

        Args:
          prefix: prepended to every key, e.g. ``"clip/"``.

        Returns:
          Keys ``norm``, ``threshold``, ``scale``, ``clipped``, ``finite``,
          ``step``, ``clipped_steps``, ``nonfinite_steps``, ``clipped_norm``
          and ``extra/<name>``; booleans become 0.0 or 1.0. Non-scalar arrays
          (e.g. a state batched over seeds) give one key per element,
          ``name/i``.

        Example:
          >>> import jax.numpy as jnp, jaxclip
          >>> tx = jaxclip.clip_by_global_norm(1.0)
          >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(None))
          >>> jaxclip.get_stats(state).to_dict()["norm"]
          5.0
        """
        fields = {k: getattr(self, k) for k in self._fields if k != "extra"}
        fields["clipped_norm"] = jnp.asarray(self.norm) * jnp.asarray(self.scale)
        fields.update({f"extra/{k}": v for k, v in self.extra.items()})
        out: dict[str, float] = {}
        for name, value in fields.items():
            arr = np.asarray(jax.device_get(value), dtype=np.float64)
            if arr.ndim == 0:
                out[prefix + name] = float(arr)
            else:
                for i, v in enumerate(arr.ravel()):
                    out[f"{prefix}{name}/{i}"] = float(v)
        return out


def initial_stats(
    dtype: Any, threshold: Any = 0.0, extra: Mapping[str, Array] | None = None
) -> ClipStats:
    """The record before the first update."""
    # a fresh array per field: a state whose fields share buffers cannot be donated
    return ClipStats(
        norm=jnp.zeros((), dtype),
        threshold=jnp.asarray(threshold, dtype),
        scale=jnp.ones((), dtype),
        clipped=jnp.array(False),
        finite=jnp.array(True),
        step=jnp.zeros((), jnp.int32),
        clipped_steps=jnp.zeros((), jnp.int32),
        nonfinite_steps=jnp.zeros((), jnp.int32),
        extra=dict(extra or {}),
    )


def next_stats(
    previous: ClipStats,
    *,
    norm: Array,
    threshold: Array,
    scale: Array,
    clipped: Array,
    finite: Array,
    extra: Mapping[str, Array] | None = None,
) -> ClipStats:
    """The record after one more update; dtypes follow ``previous``."""
    dtype = previous.norm.dtype
    clipped = jnp.asarray(clipped, bool)
    finite = jnp.asarray(finite, bool)
    new_extra = {k: jnp.asarray(v, previous.extra[k].dtype) for k, v in (extra or {}).items()}
    return ClipStats(
        norm=jnp.asarray(norm, dtype),
        threshold=jnp.asarray(threshold, dtype),
        scale=jnp.asarray(scale, dtype),
        clipped=clipped,
        finite=finite,
        step=previous.step + 1,
        clipped_steps=previous.clipped_steps + clipped.astype(jnp.int32),
        nonfinite_steps=previous.nonfinite_steps + (~finite).astype(jnp.int32),
        extra={**previous.extra, **new_extra},
    )


def find_states(opt_state: Any, kind: type = ClipStats) -> list[tuple[str, Any]]:
    """Every node of type ``kind`` in ``opt_state``, with its path."""
    flat, _ = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=lambda n: isinstance(n, kind))
    return [(_checks.path_name(path), node) for path, node in flat if isinstance(node, kind)]


def get_stats(opt_state: Any) -> ClipStats | dict[str, ClipStats]:
    """Finds the :class:`ClipStats` record(s) anywhere in an Optax state.

    Works through ``optax.chain``, ``inject_hyperparams``, ``masked``,
    ``partition``, ``MultiSteps`` and any other nesting of NamedTuples, tuples,
    lists and dicts. Usable inside and outside ``jit``.

    Args:
      opt_state: an optimizer state, or any pytree containing one.

    Returns:
      The record when there is exactly one; otherwise a dict from the path of
      each record in the state (e.g. ``"inner_states/weights/inner_state/0"``)
      to the record.

    Raises:
      ValueError: if the state holds no jaxclip statistics.

    Example:
      >>> import jax.numpy as jnp, optax, jaxclip
      >>> tx = optax.chain(jaxclip.clip_by_global_norm(1.0), optax.sgd(0.1))
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> state = tx.init(params)
      >>> _, state = tx.update(params, state, params)
      >>> float(jaxclip.get_stats(state).norm)
      5.0
    """
    found = find_states(opt_state)
    if not found:
        raise ValueError(
            "jaxclip.get_stats: no ClipStats record in this state. Pass the state of an "
            "optimizer that contains a jaxclip transform (e.g. optax.chain("
            "jaxclip.clip_by_global_norm(1.0), optax.adamw(1e-3)))."
        )
    if len(found) == 1:
        return found[0][1]
    return dict(found)


def stats_dict(opt_state: Any, prefix: str = "clip/") -> dict[str, float]:
    """Every jaxclip record in ``opt_state`` as one flat ``{name: float}`` dict.

    Args:
      opt_state: an optimizer state holding one or more jaxclip transforms.
      prefix: prepended to every key.

    Returns:
      With one record, keys like ``"clip/norm"``; with several, the record's
      path is inserted: ``"clip/inner_states/weights/inner_state/0/norm"``.

    Example:
      >>> import jax.numpy as jnp, optax, jaxclip
      >>> tx = optax.chain(jaxclip.clip_by_global_norm(1.0), optax.sgd(0.1))
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> _, state = tx.update(params, tx.init(params), params)
      >>> jaxclip.stats_dict(state)["clip/clipped"]
      1.0
    """
    found = get_stats(opt_state)  # raises the explanatory error when there is none
    if isinstance(found, ClipStats):
        return found.to_dict(prefix)
    out: dict[str, float] = {}
    for path, stats in found.items():
        out.update(stats.to_dict(f"{prefix}{path}/"))
    return out
