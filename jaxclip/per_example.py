"""Per-example clipping and DP-SGD aggregation, with optional adaptive clip norm and noise.

jaxclip does no privacy accounting: see ``docs/guides/per-example.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxclip import _apply, _checks, _clip, _norms
from jaxclip._stats import ClipStats, find_states, next_stats

Array = jax.Array


class ClippedSum(NamedTuple):
    """Per-example gradients, clipped and summed: what DP-SGD adds noise to."""

    total: Any  # the sum of the clipped per-example gradients (the parameters' structure)
    num_examples: Array  # int32[]: examples summed
    clipped: Array  # int32[]: examples whose norm exceeded the clip norm
    norm_sum: Array  # float32[]: sum of the per-example norms (for the mean)
    scale_sum: Array  # float32[]: sum of the per-example factors (for the mean)
    max_norm: Array  # float32[]: the largest per-example norm
    clip_norm: Array  # float32[]: the clip norm the examples were clipped to
    finite: Array  # bool[]: every per-example gradient was finite

    def merge(self, other: ClippedSum | None) -> ClippedSum:
        """The record of this batch and ``other`` (None: this one) together."""
        if other is None:
            return self
        return ClippedSum(
            *jax.tree.map(jnp.add, self[:5], other[:5]),  # total to scale_sum: sums
            max_norm=jnp.maximum(self.max_norm, other.max_norm),
            clip_norm=self.clip_norm,
            finite=self.finite & other.finite,
        )

    def across(self, axis_name: Any) -> ClippedSum:
        """The record of the batches of every device of ``axis_name`` together: for a
        batch split over devices (data parallel) in ``shard_map`` or ``pmap``."""
        return ClippedSum(
            *jax.lax.psum(self[:5], axis_name),  # total to scale_sum: sums
            max_norm=jax.lax.pmax(self.max_norm, axis_name),
            clip_norm=self.clip_norm,
            finite=jax.lax.pmin(self.finite.astype(jnp.int32), axis_name) == 1,
        )


def _example_norms(owner: str, grads: Any, axis_name: Any) -> tuple[list[Any], list[Array], Array]:
    """Each example's global L2 norm over all leaves; ``grads`` leaves have a batch axis."""
    paths, leaves = _checks.float_leaves(grads, owner, "per-example gradients")
    if not leaves:
        raise ValueError(f"{owner}: the per-example gradients have no floating-point leaves.")
    sizes = {x.shape[0] if x.ndim else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        shapes = ", ".join(f"{_checks.path_str(p)}: {x.shape}" for p, x in zip(paths, leaves))
        raise ValueError(
            f"{owner}: every leaf needs the same leading batch axis (the output of "
            f"jax.vmap(jax.grad(...))); got {shapes}."
        )
    # one unit per example: every axis but the batch axis
    axes = [tuple(range(1, max(x.ndim, 2))) for x in leaves]
    rows = [x[:, None] if x.ndim == 1 else x for x in leaves]
    measured = _norms.unit_norms(rows, 2.0, axes, axis_name=axis_name)
    # one norm per example, leaf after leaf
    per_leaf = measured.norms.reshape(len(rows), rows[0].shape[0])
    return paths, leaves, _norms.norm_along(per_leaf, 2.0, axis=0)


def clip_and_sum(
    per_example_grads: Any, clip_norm: Any, *, axis_name: Any = None, nonfinite: str = "propagate"
) -> ClippedSum:
    """Clips each example's gradient to ``clip_norm`` and sums them.

    Args:
      per_example_grads: a pytree whose leaves all have a leading batch axis,
        e.g. from ``jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)``.
      clip_norm: the per-example norm bound C, >= 0.
      axis_name: mapped axes each example's gradient is sharded over.
      nonfinite: ``"propagate"`` (NaN/inf examples poison the sum) or ``"zero"`` (their
        non-finite elements count as zero); :func:`per_example_clip` applies the others.

    Returns:
      A :class:`ClippedSum`.

    Example:
      >>> import jax.numpy as jnp, jaxclip
      >>> grads = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}  # two examples
      >>> out = jaxclip.clip_and_sum(grads, 1.0)
      >>> out.total["w"].tolist(), int(out.clipped)
      ([0.9000000357627869, 1.2000000476837158], 1)
    """
    owner = "jaxclip.clip_and_sum"
    if nonfinite == "zero":
        per_example_grads = _checks.map_float_leaves(
            lambda x: jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x)), per_example_grads
        )
    paths, leaves, norms = _example_norms(owner, per_example_grads, axis_name)
    c = jnp.asarray(clip_norm).astype(norms.dtype)
    factors = _apply.scale_for(norms, c)
    # one contraction per leaf: no scaled copy of the per-example gradients. When
    # an example's scale is two factors (see _apply.Factor), every example is
    # weighted by its scale / 2^-64 and the sums multiplied by 2^-64.
    shift = jnp.min(factors.tiny, initial=1.0)
    weights = factors.value * (factors.tiny / shift)
    summed = [
        (jnp.tensordot(weights, x.astype(weights.dtype), axes=(0, 0)) * shift).astype(x.dtype)
        for x in leaves
    ]
    total = _checks.replace_leaves(jax.tree.map(lambda x: x[0], per_example_grads), paths, summed)
    return ClippedSum(
        total=total,
        num_examples=jnp.asarray(norms.shape[0], jnp.int32),
        clipped=jnp.sum(norms > c, dtype=jnp.int32),
        norm_sum=jnp.sum(norms),
        scale_sum=jnp.sum(factors.product()),
        max_norm=jnp.max(norms),
        clip_norm=c,
        finite=jnp.all(jnp.isfinite(norms)),
    )


def clipped_gradient_sum(
    grad_fn: Callable[..., Any],
    params: Any,
    batch: Any,
    clip_norm: Any,
    *,
    microbatch_size: int | None = None,
    nonfinite: str = "propagate",
) -> ClippedSum:
    """Per-example gradients computed, clipped and summed a microbatch at a time.

    Only ``microbatch_size`` per-example gradients exist at once, so the memory
    of a DP-SGD step no longer grows with the batch: pass the result to
    :func:`per_example_clip` in place of the per-example gradients.

    Args:
      grad_fn: ``grad_fn(params, example) -> gradient`` for one example (no
        batch axis), e.g. ``jax.grad(loss)``.
      params: the parameters.
      batch: a pytree of arrays with a leading batch axis.
      clip_norm: the per-example norm bound C; with an adaptive clip norm, use
        :func:`per_example_clip_norm` of the optimizer state.
      microbatch_size: examples per microbatch; must divide the batch size.
        None: the whole batch at once.
      nonfinite: see :func:`clip_and_sum`.

    Returns:
      A :class:`ClippedSum` over the whole batch.

    Example:
      >>> import jax, jax.numpy as jnp, jaxclip
      >>> loss = lambda w, ex: jnp.sum((ex["x"] * w - ex["y"]) ** 2)
      >>> batch = {"x": jnp.arange(8.0), "y": jnp.zeros(8)}
      >>> out = jaxclip.clipped_gradient_sum(jax.grad(loss), 1.0, batch, 1.0,
      ...                                    microbatch_size=4)
      >>> int(out.num_examples), int(out.clipped)
      (8, 7)
    """
    owner = "jaxclip.clipped_gradient_sum"
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"{owner}: every batch leaf needs the same leading axis, got {sizes}.")
    (size,) = sizes
    step = size if microbatch_size is None else microbatch_size
    if not isinstance(step, int) or step < 1 or size % step:
        raise ValueError(
            f"{owner}: microbatch_size must be a positive int dividing the batch size "
            f"{size}, got {microbatch_size!r}."
        )
    per_example = jax.vmap(grad_fn, in_axes=(None, 0))
    micro = jax.tree.map(lambda x: x.reshape(size // step, step, *x.shape[1:]), batch)

    def body(carry: ClippedSum | None, chunk: Any) -> tuple[ClippedSum, None]:
        part = clip_and_sum(per_example(params, chunk), clip_norm, nonfinite=nonfinite)
        return part.merge(carry), None

    first = body(None, jax.tree.map(lambda x: x[0], micro))[0]
    if size // step == 1:
        return first
    return jax.lax.scan(body, first, jax.tree.map(lambda x: x[1:], micro))[0]


class PerExampleClipState(NamedTuple):
    """The clip norm C (adaptive or fixed), the noise key and the statistics."""

    clip_norm: Array  # float32[]: C for the next step
    key: Array  # uint32[2]: PRNG key for the noise
    stats: ClipStats


def per_example_clip(
    max_norm: Any,
    *,
    reduce: str = "mean",
    noise_multiplier: Any = 0.0,
    seed: int = 0,
    target_quantile: Any = None,
    quantile_learning_rate: Any = 0.2,
    count_noise_std: Any = None,
    nonfinite: str = "propagate",
    axis_name: Any = None,
) -> optax.GradientTransformation:
    """Per-example clipping (DP-SGD): clip each example's gradient, then average.

    ``update`` takes per-example gradients, every leaf with a leading batch axis
    (``jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)``), or a
    :class:`ClippedSum` from :func:`clipped_gradient_sum` (microbatched, to
    bound memory). Each example's global norm is clipped to C; the clipped
    gradients are summed, Gaussian noise of standard deviation
    ``noise_multiplier * C`` is added to the sum, and the result is divided by
    the number of examples (``reduce="mean"``) or not (``"sum"``). The output
    has no batch axis and chains with any optimizer: a DP-SGD step is
    ``optax.chain(jaxclip.per_example_clip(1.0, noise_multiplier=1.1), optax.sgd(0.1))``.

    With ``target_quantile``, C tracks that quantile of the per-example norms (Andrew
    et al. 2021), from a noised count when there is noise. Both, and why jaxclip does
    no privacy accounting, are explained in ``docs/guides/per-example.md``.

    Args:
      max_norm: the clip norm C, >= 0 (the initial C when adaptive).
      reduce: ``"mean"`` (default) or ``"sum"``.
      noise_multiplier: z >= 0; 0 (default) adds no noise.
      seed: seeds the noise's PRNG key, kept in the state.
      target_quantile: None (fixed C) or a quantile in [0, 1] for C to track.
      quantile_learning_rate: the geometric step size of the quantile update.
      count_noise_std: the count's noise standard deviation (adaptive with
        noise only); default batch size / 20.
      nonfinite: the policy for NaN or inf gradients, as in :func:`~jaxclip.clip_by_global_norm`.
      axis_name: mapped axes over which each example's gradient is sharded.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`PerExampleClipState`.
      Its :class:`~jaxclip.ClipStats` holds the mean per-example ``norm`` and
      ``scale``, the C used and ``clipped_fraction``, ``max_example_norm`` and
      ``noise_std`` (``docs/guides/statistics.md``).

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxclip
      >>> tx = optax.chain(jaxclip.per_example_clip(1.0), optax.sgd(1.0))
      >>> per_example = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
      >>> updates, state = tx.update(per_example, tx.init({"w": jnp.zeros(2)}))
      >>> updates["w"].tolist()  # -(0.6 + 0.3, 0.8 + 0.4) / 2
      [-0.45000001788139343, -0.6000000238418579]

    References:
      Abadi et al., "Deep Learning with Differential Privacy", CCS 2016
      (arXiv:1607.00133); Andrew, Thakkar, McMahan and Ramaswamy,
      "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021
      (arXiv:1905.03871).
    """
    owner = "jaxclip.per_example_clip"
    _checks.check_threshold(owner, "max_norm", max_norm, allow_inf=False)
    _checks.check_choice(owner, "reduce", reduce, ("mean", "sum"))
    _checks.check_scalar(owner, "noise_multiplier", noise_multiplier, minimum=0.0)
    if target_quantile is not None:
        _checks.check_scalar(owner, "target_quantile", target_quantile, minimum=0.0, maximum=1.0)
        _checks.check_scalar(owner, "quantile_learning_rate", quantile_learning_rate, minimum=0.0)
    if count_noise_std is not None:
        _checks.check_scalar(owner, "count_noise_std", count_noise_std, minimum=0.0, strict=True)
    policy = _checks.check_nonfinite(owner, nonfinite)[0]
    _clip.mapped(owner, axis_name, None)

    def init_fn(params: Any) -> PerExampleClipState:
        names = ("clipped_fraction", "max_example_norm", "noise_std")
        dtype, stats = _clip.initial(params, names, None, max_norm)
        return PerExampleClipState(
            _apply.as_array(max_norm, dtype), jax.random.PRNGKey(seed), stats
        )

    def update_fn(
        updates: Any, state: PerExampleClipState, params: Any = None
    ) -> tuple[Any, PerExampleClipState]:
        del params
        dtype = state.clip_norm.dtype
        clipped = updates
        if not isinstance(updates, ClippedSum):
            zeroed = "zero" if policy == "zero" else "propagate"
            clipped = clip_and_sum(updates, state.clip_norm, axis_name=axis_name, nonfinite=zeroed)
        c = clipped.clip_norm.astype(dtype)
        count = clipped.num_examples.astype(dtype)
        key, sum_key, count_key = jax.random.split(state.key, 3)

        z = _apply.as_array(noise_multiplier, dtype)
        sigma_b = count / 20 if count_noise_std is None else _apply.as_array(count_noise_std, dtype)
        noised = _checks.concrete_value(noise_multiplier) != 0.0
        adaptive = target_quantile is not None
        z_sum = z
        if adaptive and noised:
            z_sum = jnp.where(z > 0, (z**-2 - (2 * sigma_b) ** -2) ** -0.5, 0.0)
        noise_std = z_sum * c

        leaves, treedef = jax.tree.flatten(clipped.total)
        if noised:
            keys = jax.random.split(sum_key, max(len(leaves), 1))
            noise = [jax.random.normal(k, x.shape, dtype) * noise_std for x, k in zip(leaves, keys)]
            leaves = [(x.astype(dtype) + n).astype(x.dtype) for x, n in zip(leaves, noise)]
        total = jax.tree.unflatten(treedef, leaves)
        divisor = count if reduce == "mean" else jnp.ones((), dtype)
        out = jax.tree.map(lambda x: (x / divisor.astype(x.dtype)).astype(x.dtype), total)

        finite = clipped.finite
        if policy == "error":
            _apply.raise_if_nonfinite(owner, *_checks.float_leaves(clipped.total, owner), finite)
        if policy == "skip":
            out = jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), out)

        new_c = c
        if adaptive:
            below = count - clipped.clipped.astype(dtype)
            if noised:
                # z may be a traced zero (inject_hyperparams): then no noise either
                count_noise = jax.random.normal(count_key, (), dtype) * sigma_b
                below = below + jnp.where(z > 0, count_noise, 0.0)
            b = below / jnp.maximum(count, 1)
            eta = jnp.asarray(quantile_learning_rate).astype(dtype)
            gamma = jnp.asarray(target_quantile).astype(dtype)
            new_c = jnp.where(finite, c * jnp.exp(-eta * (b - gamma)), c)

        n_clipped = clipped.clipped.astype(dtype)
        stats = next_stats(
            state.stats,
            norm=clipped.norm_sum.astype(dtype) / jnp.maximum(count, 1),
            threshold=c,
            scale=clipped.scale_sum.astype(dtype) / jnp.maximum(count, 1),
            clipped=n_clipped > 0,
            finite=finite,
            extra={
                "clipped_fraction": n_clipped / jnp.maximum(count, 1),
                "max_example_norm": clipped.max_norm,
                "noise_std": noise_std,
            },
        )
        return out, PerExampleClipState(new_c, key, stats)

    return _clip.transformation(init_fn, update_fn)


def per_example_clip_norm(opt_state: Any) -> Array:
    """The clip norm C that :func:`per_example_clip` will use next (found in any state).

    Use it with :func:`clipped_gradient_sum` when C is adaptive.

    Args:
      opt_state: an optimizer state containing a :func:`per_example_clip` state.

    Returns:
      C, a scalar array.

    Example:
      >>> import jax.numpy as jnp, optax, jaxclip
      >>> tx = optax.chain(jaxclip.per_example_clip(0.5), optax.sgd(0.1))
      >>> float(jaxclip.per_example_clip_norm(tx.init(jnp.zeros(2))))
      0.5
    """
    found = find_states(opt_state, PerExampleClipState)
    if len(found) != 1:
        raise ValueError(
            "jaxclip.per_example_clip_norm: expected one per_example_clip state, "
            f"found {len(found)}."
        )
    return found[0][1].clip_norm
