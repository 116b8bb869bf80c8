"""Clipping inside an Adam: wrappers that read the second moment ``nu`` of its state.

By default the part of the inner update that depends on the parameters
(``optax.adamw``'s decoupled weight decay) is not rescaled, as in both authors'
code. For an update affine in the parameters that part is its derivative along
the parameters themselves, which ``jax.jvp`` gives alongside the update at the
cost of the decay alone. ``scale_weight_decay=True`` rescales the whole update:
right for inners whose update is not affine in the parameters (``optax.lamb``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxclip import _checks, _clip
from jaxclip._stats import ClipStats, next_stats

Array = jax.Array


class SpikeAwareState(NamedTuple):
    """State of :func:`spike_aware`."""

    step: Array  # int32[]: updates seen (the reference's total_step)
    inner: Any  # the inner transformation's state
    stats: ClipStats


class StableUpdateState(NamedTuple):
    """State of :func:`stable_update`."""

    inner: Any  # the inner transformation's state
    stats: ClipStats


_is_adam = lambda node: isinstance(node, optax.ScaleByAdamState)  # noqa: E731


def _find_adam(owner: str, state: Any) -> tuple[optax.ScaleByAdamState, Any]:
    """The one ScaleByAdamState in ``state``, and the ``b2`` injected above it (or None)."""
    found, kinds = [], []

    def walk(node: Any, b2: Any) -> None:
        if _is_adam(node):
            found.append((node, b2))
            return
        if hasattr(node, "_fields"):
            kinds.append(type(node).__name__)
        hyper = getattr(node, "hyperparams", None)
        if isinstance(hyper, dict) and "b2" in hyper:
            b2 = hyper["b2"]
        children = node.values() if isinstance(node, dict) else node
        for child in children if isinstance(node, (tuple, list, dict)) else ():
            walk(child, b2)

    walk(state, None)
    if not found:
        seen = ", ".join(dict.fromkeys(kinds)) or type(state).__name__
        raise TypeError(
            f"{owner}: the inner state holds no optax.ScaleByAdamState (found {seen}). Wrap "
            "optax.adam, optax.adamw or a chain containing optax.scale_by_adam."
        )
    if len(found) > 1:
        raise ValueError(f"{owner}: the inner state holds {len(found)} ScaleByAdamStates.")
    return found[0]


def _nu_leaves(owner: str, adam: optax.ScaleByAdamState, grads: Any) -> list[Array]:
    treedef = jax.tree.structure(grads)
    if jax.tree.structure(adam.nu) != treedef:
        raise ValueError(
            f"{owner}: the Adam second moment has the structure {jax.tree.structure(adam.nu)}, "
            f"the gradient {treedef}. Wrap an Adam that sees the whole gradient."
        )
    return treedef.flatten_up_to(adam.nu)


def _zero_moments(state: Any, reset: Array) -> Any:
    """``state`` with the Adam moments zeroed where ``reset`` (its count kept)."""
    zero = lambda x: jnp.where(reset, jnp.zeros_like(x), x)  # noqa: E731
    fix = lambda n: n._replace(mu=jax.tree.map(zero, n.mu), nu=jax.tree.map(zero, n.nu))  # noqa: E731
    return jax.tree.map(lambda n: fix(n) if _is_adam(n) else n, state, is_leaf=_is_adam)


def _inner_step(inner: Any, grads: Any, state: Any, params: Any, extra: dict, whole: bool):
    """The inner update, its state and, unless ``whole``, the update's part that
    depends on the parameters (None when it is not separated)."""
    if whole or params is None:
        updates, new_state = inner.update(grads, state, params, **extra)
        return updates, None, new_state
    run = lambda p: inner.update(grads, state, p, **extra)  # noqa: E731
    (updates, new_state), (decay, _) = jax.jvp(run, (params,), (params,))
    return updates, decay, new_state


def _rescale(updates: Any, decay: Any, factors: list[Array]) -> Any:
    """Each leaf's update times its factor, but for its ``decay`` part (if any):
    ``d + f * (u - d)``."""
    leaves, treedef = jax.tree.flatten(updates)
    decays = treedef.flatten_up_to(decay) if decay is not None else [None] * len(leaves)
    out = []
    for u, d, f in zip(leaves, decays, factors):
        dtype = jnp.promote_types(u.dtype, jnp.float32)  # rescale low precision in float32
        f, x = f.astype(dtype), u.astype(dtype)
        x = x * f if d is None else d.astype(dtype) + f * (x - d.astype(dtype))
        out.append(x.astype(u.dtype))
    return treedef.unflatten(out)


def _measure(owner: str, where: _clip.Mapped, updates: Any) -> tuple[Array, Array, list[bool]]:
    """The gradient's global L2 norm, whether it is finite, and which leaves are replicated."""
    measured = _clip.measure(owner, updates, 2.0, "propagate", where)
    return measured.norm, measured.finite, where.flags(owner, measured.paths, measured.leaves)


def _count_and_max(flags: Array, values: Array) -> tuple[Array, Array]:
    """How many ``flags`` are set and the largest of ``values`` (>= 0), as float32,
    in one pass over both (XLA on CPU would also write out the input of a lone
    count or maximum)."""
    flags, values = lax.stop_gradient((flags, values))  # a general reduce has no derivative
    return lax.reduce(
        (flags.astype(jnp.float32), values.astype(jnp.float32)),
        (jnp.float32(0), jnp.float32(0)),
        lambda a, b: (a[0] + b[0], jnp.maximum(a[1], b[1])),
        tuple(range(values.ndim)),
    )


def _sum(values: list[Array]) -> Array:
    return functools.reduce(jnp.add, values, jnp.zeros((), jnp.float32))


def spike_aware(
    inner: optax.GradientTransformation,
    *,
    theta: float = 5000.0,
    reset_interval: int = 500,
    warmup_steps: int = 150,
    no_clip_steps: int = 20,
    warmup_depth: float = 0.99,
    scale_weight_decay: bool = False,
    axis_name: Any = None,
    replicated: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """SPAM: spike-aware clipping, momentum reset and warmup around an Adam.

    At update ``k`` (1, 2, ...), in the order of the authors' code: (1) when
    ``k`` is a multiple of ``reset_interval``, the inner Adam's ``mu`` and
    ``nu`` are zeroed, its ``count`` kept (bias correction goes on from the
    global step); (2) when ``k >= no_clip_steps`` and ``k % reset_interval >=
    no_clip_steps``, each coordinate with ``g**2 > theta * v`` (``v``: ``nu``
    before this step's update, not bias-corrected) becomes ``sign(g) *
    sqrt(theta * v)``; (3) the inner update runs on that gradient; (4) from
    the first reset on, while ``t = k % reset_interval < warmup_steps``, the
    update is multiplied by ``1 - warmup_depth * (1 + cos(pi * t /
    (warmup_steps + 1))) / 2``. Transforms that precede Adam (e.g. global-norm
    clipping) go before the wrapper: it must see the gradient Adam sees.

    Args:
      inner: the optimizer; its state holds exactly one ``optax.ScaleByAdamState``.
      theta: the spike threshold on ``g**2 / v``, >= 0; 0 turns clipping off.
      reset_interval: updates between resets, an int >= 1 (the reference's ``DeltaT``).
      warmup_steps: length of the warmup after each reset, an int >= 0.
      no_clip_steps: the reference's hidden ``grad_accu_steps``, an int >= 0
        (0 clips from update 1 against ``v = 0``: every gradient becomes 0, as
        in the reference).
      warmup_depth: the reference's hidden 0.99, in [0, 1]: the factor at a
        reset is ``1 - warmup_depth``.
      scale_weight_decay: whether the warmup also scales the part of the inner
        update that depends on the parameters. False (default) as the
        reference, which decays ``p -= lr * wd * p`` without the warmup factor
        (after the Adam step, where ``optax.adamw`` decays the weights from
        before it: a difference of order ``lr**2 * wd``).
      axis_name: a sharded gradient's mapped axes (``docs/guides/distributed.md``):
        the statistics then cover the whole gradient (the clip is per element).
      replicated: with ``axis_name``, the leaves that are whole on every device.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`SpikeAwareState`.
      Its :class:`~jaxclip.ClipStats`: ``norm``, the global gradient norm
      before clipping; ``threshold``, ``theta``; ``scale``, the warmup factor;
      ``clipped``, whether a coordinate was clipped; ``extra``:
      ``clipped_fraction`` (of coordinates), ``max_ratio`` (the largest
      ``g**2 / v`` where ``v > 0``, also when clipping is off) and
      ``steps_since_reset`` (``k % reset_interval``).

    Example:
      >>> import jax.numpy as jnp, optax, jaxclip
      >>> tx = jaxclip.spike_aware(optax.adam(0.1, b2=0.5), theta=10.0, no_clip_steps=2)
      >>> params = jnp.zeros(3)
      >>> state = tx.init(params)
      >>> for g in ([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1e4, 1.0]):
      ...     updates, state = tx.update(jnp.array(g), state, params)
      >>> stats = jaxclip.get_stats(state)
      >>> bool(stats.clipped), round(float(stats.extra["clipped_fraction"]), 3)
      (True, 0.333)

    References:
      Huang et al., "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
      Training", ICLR 2025, arXiv:2501.06842; the authors' optimizer,
      ``galore_torch/SPAM.py`` in github.com/ffuhu/SPAM-Optimizer.
    """
    owner = "jaxclip.spike_aware"
    _checks.check_scalar(owner, "theta", theta, minimum=0.0)
    R = _checks.check_static_int(owner, "reset_interval", reset_interval, 1)
    W = _checks.check_static_int(owner, "warmup_steps", warmup_steps, 0)
    N = _checks.check_static_int(owner, "no_clip_steps", no_clip_steps, 0)
    _checks.check_scalar(owner, "warmup_depth", warmup_depth, minimum=0.0, maximum=1.0)
    where = _clip.mapped(owner, axis_name, replicated)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: Any) -> SpikeAwareState:
        inner_state = inner.init(params)
        _find_adam(owner, inner_state)
        stats = _clip.initial(params, ("clipped_fraction", "max_ratio"), None, theta)[1]
        stats = stats._replace(extra={**stats.extra, "steps_since_reset": jnp.zeros((), jnp.int32)})
        return SpikeAwareState(jnp.zeros((), jnp.int32), inner_state, stats)

    def update_fn(updates: Any, state: SpikeAwareState, params: Any = None, **extra_args: Any):
        norm, finite, flags = _measure(owner, where, updates)
        k = jnp.asarray(optax.safe_int32_increment(state.step))
        t, reset = k % R, k % R == 0
        inner_state = _zero_moments(state.inner, reset)
        nus = _nu_leaves(owner, _find_adam(owner, inner_state)[0], updates)
        gate = (jnp.asarray(theta) != 0) & (k >= N) & (t >= N)
        leaves, treedef = jax.tree.flatten(updates)
        clipped, counts, ratios = [], [], []
        for g, nu in zip(leaves, nus):
            dtype = jnp.promote_types(g.dtype, jnp.float32)  # ratios in float32 at least
            g32 = g.astype(dtype)
            # one square root per element, shared by the clip and the statistics:
            # |g| > sqrt(theta) * sqrt(v) is the reference's g**2 > theta * v, and its
            # sign(g) * sqrt(theta * v) is a clip to that bound
            root_v = jnp.sqrt(nu.astype(dtype))
            bound = jnp.where(gate, jnp.sqrt(jnp.asarray(theta, dtype)) * root_v, jnp.inf)
            clipped.append(jnp.clip(g32, -bound, bound).astype(g.dtype))
            positive = root_v > 0
            ratio = jnp.where(positive, jnp.square(g32 / jnp.where(positive, root_v, 1)), 0)
            count, largest = _count_and_max(jnp.abs(g32) > bound, ratio)
            counts.append(count)
            ratios.append(largest)
        n_clipped = _sum(where.combine(flags, counts, lax.psum))
        sizes = [jnp.asarray(g.size, jnp.float32) for g in leaves]
        n_total = _sum(where.combine(flags, sizes, lax.psum))
        max_ratio = functools.reduce(jnp.maximum, where.combine(flags, ratios, lax.pmax), 0.0)
        new_updates, decay, new_inner = _inner_step(
            inner, treedef.unflatten(clipped), inner_state, params, extra_args, scale_weight_decay
        )
        dtype = state.stats.norm.dtype
        # the reference rewinds its warmup counter at the end of update 1 at the earliest
        warm = (k >= max(R, 2)) & (t < W)
        cosine = (1 + jnp.cos(math.pi * t.astype(dtype) / (W + 1))) / 2
        factor = jnp.where(warm, 1 - warmup_depth * cosine, 1).astype(dtype)
        stats = next_stats(
            state.stats,
            norm=norm,
            threshold=jnp.asarray(theta),
            scale=factor,
            clipped=n_clipped > 0,
            finite=finite,
            extra={
                "clipped_fraction": n_clipped / jnp.maximum(n_total, 1),
                "max_ratio": jnp.asarray(max_ratio),
                "steps_since_reset": t,
            },
        )
        new_updates = _rescale(new_updates, decay, [factor] * len(leaves))
        return new_updates, SpikeAwareState(k, new_inner, stats)

    return _clip.transformation_with_extra_args(init_fn, update_fn)


def stable_update(
    inner: optax.GradientTransformation,
    *,
    eps: float = 1e-16,
    b2: float | None = None,
    threshold: float = 1.0,
    scale_weight_decay: bool = False,
    axis_name: Any = None,
    replicated: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """StableAdamW's update clipping: each tensor's Adam step shrunk by its RMS.

    After the inner update, per tensor (leaf),
    ``RMS = sqrt(mean(g**2 / max(v_hat, eps)))``, with ``g`` this step's
    gradient and ``v_hat = nu / (1 - b2**count)`` the inner Adam's second
    moment, bias-corrected and including ``g`` (the authors' debiased
    ``beta2`` makes their ``exp_avg_sq`` exactly this ``v_hat``). The tensor's
    update is divided by ``max(1, RMS / threshold)``.

    Args:
      inner: the optimizer; its state holds exactly one ``optax.ScaleByAdamState``.
      eps: the floor on ``v_hat``, > 0. The reference floors at the square of
        its Adam epsilon: the default is the square of ``optax.adam``'s 1e-8.
      b2: the inner Adam's ``b2``, for the bias correction (Optax's state does
        not carry it); it must equal the inner's. None (default): the value
        injected by ``optax.inject_hyperparams`` if any (a different ``b2``
        given here is refused at ``init``), else 0.999, Optax's default.
      threshold: the RMS above which the update shrinks, > 0 (the reference's
        ``clip_thresh``, 1).
      scale_weight_decay: whether the division also applies to the part of the
        inner update that depends on the parameters. False (default) as the
        authors' code, which decays by ``lr * wd`` unclipped; optimi's
        StableAdamW clips the decay too (True).
      axis_name: a sharded gradient's mapped axes (``docs/guides/distributed.md``):
        each tensor's RMS then covers its whole tensor.
      replicated: with ``axis_name``, the leaves that are whole on every device.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`StableUpdateState`.
      Its :class:`~jaxclip.ClipStats`: ``norm``, the global gradient norm;
      ``threshold``; ``scale``, the smallest factor ``1 / max(1, RMS / threshold)``;
      ``clipped``, whether a tensor shrank; ``extra``: ``clipped_fraction``
      (of tensors) and ``max_rms``.

    Example:
      >>> import jax.numpy as jnp, optax, jaxclip
      >>> tx = jaxclip.stable_update(optax.adam(1.0, b2=0.5), b2=0.5)
      >>> params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> _, state = tx.update({"a": jnp.ones(2), "b": jnp.ones(2)}, state, params)
      >>> updates, state = tx.update({"a": jnp.ones(2), "b": jnp.full(2, 10.0)}, state)
      >>> stats = jaxclip.get_stats(state)
      >>> round(float(stats.extra["max_rms"]), 4), float(stats.extra["clipped_fraction"])
      (1.2217, 0.5)

    References:
      Wortsman et al., "Stable and low-precision training for large-scale
      vision-language models", NeurIPS 2023, arXiv:2304.13013; the authors'
      ``StableAdamWUnfused`` (gist.github.com/mitchellnw/d42e22a0b9ec02ceaf4f7b4457f51423).
    """
    owner = "jaxclip.stable_update"
    _checks.check_scalar(owner, "eps", eps, minimum=0.0, strict=True)
    _checks.check_scalar(owner, "threshold", threshold, minimum=0.0, strict=True)
    if b2 is not None:
        _checks.check_scalar(owner, "b2", b2, minimum=0.0, below=1.0)
    where = _clip.mapped(owner, axis_name, replicated)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: Any) -> StableUpdateState:
        inner_state = inner.init(params)
        injected = _find_adam(owner, inner_state)[1]
        value = None if injected is None else _checks.concrete_value(injected)
        if b2 is not None and value is not None and not np.isclose(value, b2, rtol=1e-6):
            raise ValueError(f"{owner}: b2={b2}, but the inner's injected b2 is {value:g}.")
        stats = _clip.initial(params, ("clipped_fraction", "max_rms"), None, threshold)[1]
        return StableUpdateState(inner_state, stats)

    def update_fn(updates: Any, state: StableUpdateState, params: Any = None, **extra_args: Any):
        norm, finite, flags = _measure(owner, where, updates)
        # the barrier keeps XLA from computing the norm's g * g once for the norm and
        # Adam's g**2, an array it would write out and read back
        grads = jax.tree.map(lax.optimization_barrier, updates)
        new_updates, decay, new_inner = _inner_step(
            inner, grads, state.inner, params, extra_args, scale_weight_decay
        )
        adam, injected = _find_adam(owner, new_inner)
        beta2 = b2 if b2 is not None else (injected if injected is not None else 0.999)
        sums, sizes = [], []
        for g, nu in zip(jax.tree.leaves(updates), _nu_leaves(owner, adam, updates)):
            dtype = jnp.promote_types(g.dtype, jnp.float32)
            debias = 1 - jnp.asarray(beta2, dtype) ** jnp.asarray(adam.count).astype(dtype)
            # sum(g**2 / max(nu / debias, eps)) as debias * sum(g * (g / max(nu, eps *
            # debias))): the correction leaves the element-wise work, and Adam's g * g
            # is not shared
            g32, floor = g.astype(dtype), jnp.asarray(eps, dtype) * debias
            sums.append(jnp.sum(g32 * (g32 / jnp.maximum(nu.astype(dtype), floor))) * debias)
            sizes.append(jnp.asarray(g.size, dtype))
        sums, sizes = where.combine(flags, sums, lax.psum), where.combine(flags, sizes, lax.psum)
        rmss = [jnp.sqrt(s / jnp.maximum(n, 1)) for s, n in zip(sums, sizes)]
        factors = [1 / jnp.maximum(1, r / jnp.asarray(threshold, r.dtype)) for r in rmss]
        rmss = [r.astype(jnp.float32) for r in rmss]
        shrunk = jnp.stack(rmss or [jnp.zeros(())]) > jnp.float32(threshold)
        stats = next_stats(
            state.stats,
            norm=norm,
            threshold=jnp.asarray(threshold),
            scale=jnp.min(jnp.stack([jnp.float32(1)] + [f.astype(jnp.float32) for f in factors])),
            clipped=jnp.any(shrunk),
            finite=finite,
            extra={
                "clipped_fraction": jnp.sum(shrunk, dtype=jnp.float32) / max(len(factors), 1),
                "max_rms": functools.reduce(jnp.maximum, rmss, jnp.zeros((), jnp.float32)),
            },
        )
        new_updates = _rescale(new_updates, decay, factors)
        return new_updates, StableUpdateState(new_inner, stats)

    return _clip.transformation_with_extra_args(init_fn, update_fn)
