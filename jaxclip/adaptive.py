"""Adaptive-threshold clippers: AutoClip, ZClip, quantile tracking and AdaGC.

With default arguments each follows its paper's reference implementation step for step;
options that depart from it say so. A step whose gradient is not finite leaves the rule's
state as it was (the references would store NaN and never recover).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxclip import _apply, _checks, _clip, _norms, _rules
from jaxclip._stats import ClipStats

Array = jax.Array

# the constant PyTorch's clip_grad_norm_ and the references add to the norm
_TORCH_EPS = 1e-6


def autoclip(
    percentile: Any = 10.0,
    history: int = 10_000,
    *,
    eps: Any = _TORCH_EPS,
    nonfinite: str = "propagate",
    max_consecutive_skips: int | None = None,
    axis_name: Any = None,
    replicated: Any = None,
) -> optax.GradientTransformation:
    """AutoClip: clip to a percentile of the gradient norms seen so far.

    At step t the threshold is the ``percentile``-th percentile (NumPy's
    default 'linear' method) of all norms so far, the current one included (so
    the first threshold is the first norm); the gradient is then clipped as by
    ``torch.nn.utils.clip_grad_norm_`` (``eps=1e-6``), as in the reference,
    which scales a norm equal to the threshold by ``n / (n + 1e-6)``.
    Norms are kept in a ring buffer of ``history`` entries: while it holds
    every step the result equals the paper's unbounded history; after that the
    percentile is over the latest ``history`` norms. For O(1) memory see
    :func:`quantile_clip`.

    Args:
      percentile: in [0, 100]; the paper recommends 10. 100 never clips, 0
        clips to the smallest norm seen.
      history: the buffer length, a Python int (static: it fixes the state's
        shape; pass it in ``static_args`` of ``optax.inject_hyperparams``).
      eps: added to the norm in the scale, as PyTorch does; 0 gives
        ``threshold / norm``.
      nonfinite: as in :func:`~jaxclip.clip_by_global_norm`; such norms never enter the history.
      max_consecutive_skips: the most skips in a row, as in :func:`~jaxclip.clip_by_global_norm`.
      axis_name: a sharded gradient's mapped axes (``docs/guides/distributed.md``).
      replicated: with ``axis_name``, the leaves that are whole on every device.
    Returns:
      An ``optax.GradientTransformation`` with state :class:`AdaptiveClipState`
      (``rule``: an ``AutoClipState``, the norm buffer and the count); ``stats.extra``:
      ``seen``, the norms seen (``docs/guides/statistics.md``).

    Example:
      >>> import jax.numpy as jnp, jaxclip
      >>> tx = jaxclip.autoclip(percentile=50.0)
      >>> state = tx.init(None)
      >>> for g in ([3.0, 4.0], [0.6, 0.8], [30.0, 40.0]):
      ...     updates, state = tx.update(jnp.array(g), state)
      >>> round(float(state.stats.threshold), 3)  # median of 5, 1, 50
      5.0

    References:
      Seetharaman, Wichern, Pardo and Le Roux, "AutoClip: Adaptive Gradient
      Clipping for Source Separation Networks", MLSP 2020 (arXiv:2007.14469).
    """
    owner = "jaxclip.autoclip"
    _checks.check_scalar(owner, "percentile", percentile, minimum=0.0, maximum=100.0)
    history = _checks.check_static_int(owner, "history", history, 1)
    _checks.check_scalar(owner, "eps", eps, minimum=0.0)
    policy, max_skips = _checks.check_nonfinite(owner, nonfinite, max_consecutive_skips)
    where = _clip.mapped(owner, axis_name, replicated)

    def scale_fn(norm: Array, step: _rules.RuleStep, count: Array) -> _apply.Factor:
        return _apply.scale_for(norm, step.target.astype(norm.dtype), eps=eps)

    rule = _rules.autoclip_rule(percentile, history)
    return _clip.rule_clipper(owner, rule, scale_fn, policy, where, max_skips=max_skips)


def zclip(
    alpha: Any = 0.97,
    z_thresh: Any = 2.5,
    warmup_steps: Any = 25,
    mode: str = "zscore",
    clip_option: str = "adaptive_scaling",
    clip_factor: Any = 1.0,
    max_norm: Any = None,
    skip_update_on_spike: bool = False,
    *,
    eps: Any = 1e-6,
    nonfinite: str = "propagate",
    max_consecutive_skips: int | None = None,
    axis_name: Any = None,
    replicated: Any = None,
) -> optax.GradientTransformation:
    """ZClip: clip gradient-norm spikes detected by a z-score against EMA statistics.

    For the first ``warmup_steps`` steps the norms are collected (their mean and
    population variance) and only the optional cap ``max_norm`` applies. Then,
    with the mean and variance of the previous step, ``z = (n - mean) / (std +
    eps)``; a spike is ``z > z_thresh``. ``clip_option="adaptive_scaling"``
    clips a spike to ``(mean + z_thresh^2 * std / z) * clip_factor``, ``"mean"``
    to the mean. ``mode="percentile"`` instead clips any norm above ``mean +
    z_thresh * std`` to that value. The statistics are EMAs (``alpha``) fed the
    clipped value, the variance using the updated mean; with
    ``skip_update_on_spike`` they are not updated on spikes.

    Args:
      alpha: EMA decay, in [0, 1).
      z_thresh: the z-score (or, in "percentile" mode, the number of standard
        deviations) above which a norm is a spike; > 0.
      warmup_steps: norms collected before adaptive clipping starts; >= 1.
      mode: ``"zscore"`` or ``"percentile"``.
      clip_option: in "zscore" mode, ``"adaptive_scaling"`` or ``"mean"``.
      clip_factor: multiplies the whole adaptive threshold (as the reference
        code does; its README says the std term only); > 0.
      max_norm: an optional fixed cap on every threshold, during warmup too.
        None (default) is the paper's behaviour; the reference repository
        defaults to 1.0, which makes it behave like a fixed clip at 1.0
        whenever norms exceed 1.
      skip_update_on_spike: do not update the statistics on spike steps.
      eps: added to the standard deviation in the z-score.
      nonfinite: as in :func:`~jaxclip.clip_by_global_norm`; such steps leave the
        statistics unchanged.
      max_consecutive_skips: the most skips in a row, as in :func:`~jaxclip.clip_by_global_norm`.
      axis_name: a sharded gradient's mapped axes (``docs/guides/distributed.md``).
      replicated: with ``axis_name``, the leaves that are whole on every device.
    Returns:
      An ``optax.GradientTransformation`` with state :class:`AdaptiveClipState`
      (``rule``: a ``ZClipState`` with seen, mean and var); ``stats.extra``: ``mean``,
      ``std``, ``z``, ``spike`` and ``warmup`` (``docs/guides/statistics.md``).

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxclip
      >>> tx = optax.chain(jaxclip.zclip(warmup_steps=3), optax.sgd(0.1))
      >>> state = tx.init(jnp.zeros(2))
      >>> update = jax.jit(tx.update)
      >>> for n in (1.0, 1.1, 0.9, 1.0, 50.0):
      ...     updates, state = update(jnp.array([0.0, n]), state)
      >>> stats = jaxclip.get_stats(state)
      >>> bool(stats.clipped), float(stats.norm)
      (True, 50.0)

    References:
      Kumar, Owen, Ashkboos, et al., "ZClip: Adaptive Spike Mitigation for LLM
      Pre-Training", 2025 (arXiv:2504.02507).
    """
    owner = "jaxclip.zclip"
    _checks.check_scalar(owner, "alpha", alpha, minimum=0.0, below=1.0)
    _checks.check_scalar(owner, "z_thresh", z_thresh, minimum=0.0, strict=True)
    _checks.check_scalar(owner, "warmup_steps", warmup_steps, minimum=1)
    _checks.check_choice(owner, "mode", mode, ("zscore", "percentile"))
    _checks.check_choice(owner, "clip_option", clip_option, ("adaptive_scaling", "mean"))
    _checks.check_scalar(owner, "clip_factor", clip_factor, minimum=0.0, strict=True)
    if max_norm is not None:
        _checks.check_threshold(owner, "max_norm", max_norm)
    if not isinstance(skip_update_on_spike, bool):
        raise ValueError(f"{owner}: skip_update_on_spike must be a bool.")
    _checks.check_scalar(owner, "eps", eps, minimum=0.0)
    policy, max_skips = _checks.check_nonfinite(owner, nonfinite, max_consecutive_skips)
    where = _clip.mapped(owner, axis_name, replicated)
    rule = _rules.zclip_rule(
        alpha,
        z_thresh,
        warmup_steps,
        mode,
        clip_option,
        clip_factor,
        max_norm,
        skip_update_on_spike,
        eps,
    )

    def scale_fn(norm: Array, step: _rules.RuleStep, count: Array) -> _apply.Factor:
        target = step.target.astype(norm.dtype)
        # the reference clips with torch's clip_grad_norm_ during warmup, then
        # scales by target / (n + 1e-6) only when n > target
        warmup = _apply.scale_for(norm, target, eps=_TORCH_EPS)
        adaptive = _apply.scale_for(norm, target, eps=_TORCH_EPS, eps_in_condition=False)
        return _apply.select(step.extra["warmup"] > 0, warmup, adaptive)

    return _clip.rule_clipper(owner, rule, scale_fn, policy, where, max_skips=max_skips)


def quantile_clip(
    target_quantile: Any = 0.5,
    learning_rate: Any = 0.2,
    initial_threshold: Any = 1.0,
    *,
    update: str = "geometric",
    nonfinite: str = "propagate",
    max_consecutive_skips: int | None = None,
    axis_name: Any = None,
    replicated: Any = None,
) -> optax.GradientTransformation:
    """Quantile tracking: a threshold that follows a quantile of the norm stream.

    Each step clips to the current threshold C, then moves it: with ``b = 1``
    if the norm was <= C, else 0, ``C <- C * exp(-learning_rate * (b -
    target_quantile))`` (``update="geometric"``, the paper's default) or ``C <- C
    - learning_rate * (b - target_quantile)`` (``"arithmetic"``, kept >= 0).
    C settles where a ``target_quantile`` fraction of norms lie below it. The
    state is one number: an O(1)-memory alternative to :func:`autoclip`.

    This is the rule of Andrew et al. applied to the global-norm stream, one
    record per step, without noise; for per-example (DP-SGD) use see the
    per-example clipping transforms.

    Args:
      target_quantile: in [0, 1]; 0.5 tracks the median.
      learning_rate: the step size eta, >= 0.
      initial_threshold: the starting C, >= 0. The default 1.0 starts as the
        common fixed clip; TensorFlow Federated uses 0.1 for per-example norms.
      update: ``"geometric"`` or ``"arithmetic"``.
      nonfinite: as in :func:`~jaxclip.clip_by_global_norm`; such steps leave C unchanged.
      max_consecutive_skips: the most skips in a row, as in :func:`~jaxclip.clip_by_global_norm`.
      axis_name: a sharded gradient's mapped axes (``docs/guides/distributed.md``).
      replicated: with ``axis_name``, the leaves that are whole on every device.
    Returns:
      An ``optax.GradientTransformation`` with state :class:`AdaptiveClipState`
      (``rule``: a ``QuantileState`` holding C); ``stats.extra``: ``below``, 1 when
      the norm was at most C (``docs/guides/statistics.md``).

    Example:
      >>> import jax.numpy as jnp, jaxclip
      >>> tx = jaxclip.quantile_clip(initial_threshold=1.0)
      >>> _, state = tx.update(jnp.array([3.0, 4.0]), tx.init(None))
      >>> round(float(state.rule.threshold), 4)  # exp(0.2 * 0.5): C grows
      1.1052

    References:
      Andrew, Thakkar, McMahan and Ramaswamy, "Differentially Private Learning
      with Adaptive Clipping", NeurIPS 2021 (arXiv:1905.03871).
    """
    owner = "jaxclip.quantile_clip"
    _checks.check_scalar(owner, "target_quantile", target_quantile, minimum=0.0, maximum=1.0)
    _checks.check_scalar(owner, "learning_rate", learning_rate, minimum=0.0)
    _checks.check_scalar(owner, "initial_threshold", initial_threshold, minimum=0.0)
    update_kind = _checks.check_choice(owner, "update", update, ("geometric", "arithmetic"))
    policy, max_skips = _checks.check_nonfinite(owner, nonfinite, max_consecutive_skips)
    where = _clip.mapped(owner, axis_name, replicated)
    rule = _rules.quantile_rule(target_quantile, learning_rate, initial_threshold, update_kind)

    def scale_fn(norm: Array, step: _rules.RuleStep, count: Array) -> _apply.Factor:
        return _apply.scale_for(norm, step.target.astype(norm.dtype))

    return _clip.rule_clipper(owner, rule, scale_fn, policy, where, max_skips=max_skips)


class AdaGCState(NamedTuple):
    """AdaGC's state: one gamma per unit, and the step count."""

    gamma: Array  # float[U]: per-unit EMA of clipped norms (U = 1 with scope="global")
    seen: Array  # int32[]: finite steps seen
    stats: ClipStats


def _unit_axes(owner: str, path: Any, x: Array, layer_axis: Any) -> tuple[int, ...] | None:
    """The axes of a leaf to reduce: None (whole leaf) or all but the layer axis."""
    axis = layer_axis(_checks.path_name(path), x) if callable(layer_axis) else layer_axis
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
        raise ValueError(
            f"{owner}: layer_axis={axis!r} does not fit leaf {_checks.path_str(path)} of "
            f"shape {x.shape}; give an axis the leaf has, or None for a whole-leaf unit."
        )
    return tuple(d for d in range(x.ndim) if d != axis % x.ndim)


def adagc(
    lambda_rel: Any = 1.04,
    beta: Any = 0.99,
    warmup_steps: Any = 100,
    warmup_max_norm: Any = 1.0,
    eps: Any = 1e-6,
    *,
    scope: str = "leaf",
    layer_axis: int | Callable[[str, Array], int | None] | None = None,
    nonfinite: str = "propagate",
    max_consecutive_skips: int | None = None,
    axis_name: Any = None,
    replicated: Any = None,
) -> optax.GradientTransformation:
    """AdaGC: a per-tensor threshold from an EMA of that tensor's clipped norms.

    Each unit (by default each leaf) keeps ``gamma``. During the first
    ``warmup_steps`` steps the whole gradient is clipped to
    ``warmup_max_norm`` (PyTorch's formula) and ``gamma`` is the smallest unit
    norm seen after that clip. Afterwards a unit with norm ``n > lambda_rel *
    gamma`` is scaled by ``lambda_rel * gamma / (n + eps)``, and ``gamma <- beta
    * gamma + (1 - beta) * min(n, lambda_rel * gamma)``. So gamma grows by at
    most a factor ``beta + (1 - beta) * lambda_rel`` per step.

    Args:
      lambda_rel: relative threshold, > 0.
      beta: EMA decay, in [0, 1).
      warmup_steps: steps of global clipping before the per-unit rule, >= 1
        (gamma starts from the warmup's norms).
      warmup_max_norm: the global clip during warmup, >= 0.
      eps: added to the norm in the per-unit and warmup scales.
      scope: ``"leaf"`` (default, the paper's per-tensor rule) or
        ``"global"`` (the same rule on the single global norm).
      layer_axis: for ``scope="leaf"``, keeps per-layer semantics when layers
        are stacked in one array (``scan`` over layers): an int (the stacked
        axis, for every leaf) or a function ``(path, leaf) -> int or None``,
        e.g. ``lambda path, x: 0 if path.startswith("layers/") else None``.
        Each slice along that axis is then a unit with its own gamma.
      nonfinite: as in :func:`~jaxclip.clip_by_global_norm`; such steps leave gamma unchanged.
      max_consecutive_skips: the most skips in a row, as in :func:`~jaxclip.clip_by_global_norm`.
      axis_name: a sharded gradient's mapped axes (``docs/guides/distributed.md``).
      replicated: with ``axis_name``, the leaves that are whole on every device.
    Returns:
      An ``optax.GradientTransformation`` with state :class:`AdaGCState`; it
      needs the parameters (or the gradient's shapes) at ``init``. ``stats.extra``:
      ``clipped_fraction``, ``gamma_min``, ``gamma_max``, ``warmup``
      (``docs/guides/statistics.md``).

    Example:
      >>> import jax.numpy as jnp, jaxclip
      >>> params = {"w": jnp.zeros(2), "b": jnp.zeros(1)}
      >>> tx = jaxclip.adagc(warmup_steps=1)
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.array([0.3, 0.4]), "b": jnp.array([0.2])}
      >>> _, state = tx.update(grads, state)  # warmup: gamma = the norms, 0.5 and 0.2
      >>> spike = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([0.2])}
      >>> updates, state = tx.update(spike, state)
      >>> round(float(jaxclip.global_norm(updates["w"])), 3)  # 1.04 * 0.5
      0.52

    References:
      Wang et al., "AdaGC: Improving Training Stability for Large Language
      Model Pretraining", ICML 2026 (arXiv:2502.11034).
    """
    owner = "jaxclip.adagc"
    _checks.check_scalar(owner, "lambda_rel", lambda_rel, minimum=0.0, strict=True)
    _checks.check_scalar(owner, "beta", beta, minimum=0.0, below=1.0)
    _checks.check_scalar(owner, "warmup_steps", warmup_steps, minimum=1)
    _checks.check_threshold(owner, "warmup_max_norm", warmup_max_norm)
    _checks.check_scalar(owner, "eps", eps, minimum=0.0)
    scope = _checks.check_choice(owner, "scope", scope, ("leaf", "global"))
    if layer_axis is not None and scope == "global":
        raise ValueError(f"{owner}: layer_axis applies to scope='leaf' only.")
    policy, max_skips = _checks.check_nonfinite(owner, nonfinite, max_consecutive_skips)
    where = _clip.mapped(owner, axis_name, replicated)

    def units_of(tree: Any, what: str) -> _clip.Selected:
        paths, leaves = _checks.float_leaves(tree, owner, what)
        axes = [_unit_axes(owner, path, x, layer_axis) for path, x in zip(paths, leaves)]
        return _clip.Selected(paths, leaves, axes)

    def init_rule(params: Any, dtype: Any) -> tuple[Array, Array]:
        n_units = 1
        if scope == "leaf":
            s = units_of(params, "params")
            n_units = sum(
                1 if a is None else x.size // math.prod(x.shape[d] for d in a)
                for x, a in zip(s.leaves, s.axes)
            )
        return jnp.zeros((n_units,), dtype), jnp.zeros((), jnp.int32)

    def decide(rule: tuple[Array, Array], units: _clip.Units, count: Array) -> _clip.UnitDecision:
        gamma, seen = rule
        dtype = gamma.dtype
        if units.norms.size != gamma.shape[0]:
            raise ValueError(
                f"{owner}: the gradient has {units.norms.size} units but the state was built "
                f"for {gamma.shape[0]}; call init with parameters of the gradient's "
                "structure and shapes (and the same layer_axis)."
            )
        warming = seen < jnp.asarray(warmup_steps)
        limit = _apply.as_array(warmup_max_norm, dtype)
        norms = units.norms.astype(dtype)
        warmup_scale = _apply.scale_for(_norms.combine_norms([norms], 2.0), limit, eps=eps)
        step = _rules.adagc_units(
            norms, gamma, warming, seen == 0, warmup_scale, lambda_rel, beta, eps
        )
        scale = step.scale._replace(value=jnp.where(jnp.isnan(norms), jnp.nan, step.scale.value))
        new_gamma = jnp.where(units.step_finite, step.gamma, gamma)
        limits = _apply.as_array(lambda_rel, dtype) * gamma
        extra = {
            "gamma_min": jnp.min(new_gamma) if new_gamma.size else jnp.zeros((), dtype),
            "gamma_max": jnp.max(new_gamma) if new_gamma.size else jnp.zeros((), dtype),
            "warmup": warming.astype(dtype),
        }
        threshold = jnp.where(warming, limit, jnp.sqrt(jnp.sum(limits * limits)))
        return _clip.UnitDecision(scale, threshold, (step.gamma, seen + 1), extra)

    return _clip.unit_clipper(
        owner,
        select=lambda updates, params: units_of(updates, "updates"),
        decide=decide,
        policy=policy,
        where=where,
        init_rule=init_rule,
        pack=lambda rule, stats: AdaGCState(rule[0], rule[1], stats),
        unpack=lambda state: ((state.gamma, state.seen), state.stats),
        extra_names=("gamma_min", "gamma_max", "warmup"),
        initial_threshold=warmup_max_norm,
        whole=scope == "global",
        max_skips=max_skips,
    )
