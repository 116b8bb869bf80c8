"""Ghost clipping: DP-SGD's per-example clipping without per-example gradients.

:func:`~jaxclip.clipped_gradient_sum` forms every example's gradient (``vmap``
of ``grad``), which takes batch size times the parameters' memory. Most
parameters enter a network through a matrix product: for ``y_t = a_t W`` at
positions ``t`` of one example, that example's gradient is ``sum_t a_t (x) g_t``
(``g = dL/dy``), whose squared norm is ``sum_{t,s} (a_t . a_s)(g_t . g_s)``: it
needs the inputs and output gradients, which ordinary training computes anyway,
and never the ``d_in x d_out`` gradient itself (Li et al. 2021). An embedding
lookup is the same with one-hot inputs. The clipped sum then comes from the same
pieces, each example's output gradients weighted by its clip factor (the
book-keeping of Bu et al. 2023), with no second backward pass.

:func:`per_example_norms` and :func:`ghost_clipped_sum` trace the per-example
loss, find where each parameter enters, and take per use the cheaper of the
Gram form above and the explicit per-example gradient; parameters that enter
through anything else (convolutions, long ``scan`` loops, custom derivatives) get
their per-example gradients formed exactly, and a warning names them.

What takes which path (see ``_plan``): a parameter, possibly transposed or cast,
that is an operand of ``dot_general`` takes the Gram form (or the explicit
outer product where that is smaller); one gathered by rows (``table[ids]``,
``jnp.take``) the Gram form over equal ids; one read by an elementwise op
(``add``, ``mul``, ``sub``, a slice...) costs one copy of itself per example.
Calls (``jit``, ``checkpoint``) are looked into, and so is a ``scan`` of up to
256 steps that reads parameters as constants (unrolled: each step's uses are
uses of their own, one Gram over the steps); ``cond``, convolutions, longer
scans and ``custom_jvp``/``custom_vjp`` functions are not: parameters read
directly by them take the fallback. ``nonfinite="zero"`` needs every
element of every per-example gradient, so it forms them all. Squared norms are
summed without rescaling: a per-example norm above about 1e19 (float32)
overflows to inf.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxclip import _apply, _checks, _ghost_plan, _ghost_terms, _ghost_trace, _norms
from jaxclip.per_example import ClippedSum


def _per_device(f: Callable[..., Any], mesh: Any, in_specs: Any, out_specs: Any) -> Any:
    """``f`` on each device's piece (``shard_map``); its own vjps see per-device values."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map  # jax < 0.8

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


Array = jax.Array


def _prepare(
    owner: str, loss_fn: Callable[..., Any], params: Any, batch: Any, has_aux: bool, mode: str
) -> tuple[_ghost_terms.Traced, list[Array], Any, int]:
    if not callable(loss_fn):
        raise TypeError(f"{owner}: loss_fn must be callable, got {loss_fn!r}.")
    _checks.check_choice(owner, "mode", mode, _ghost_plan.MODES)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not flat:
        raise ValueError(f"{owner}: params has no leaves.")
    _checks.float_leaves(params, owner, "parameters")
    paths = [p for p, _ in flat]
    leaves = [jnp.asarray(x) for _, x in flat]
    batch_leaves, batch_def = jax.tree.flatten(batch)
    if not batch_leaves:
        raise ValueError(f"{owner}: batch has no leaves.")
    batch_leaves = [jnp.asarray(x) for x in batch_leaves]
    sizes = {x.shape[0] if x.ndim else None for x in batch_leaves}
    if len(sizes) != 1 or None in sizes:
        shapes = ", ".join(
            f"{_checks.path_str(p)}: {jnp.shape(x)}"
            for p, x in jax.tree_util.tree_flatten_with_path(batch)[0]
        )
        raise ValueError(
            f"{owner}: every batch leaf needs the same leading batch axis; got {shapes}."
        )
    size = int(batch_leaves[0].shape[0])
    if _varying_axes(batch_leaves[0]):
        # inside shard_map the batch differs per device: so must the parameters, or
        # their gradients would be summed over the devices (the caller merges the
        # devices' records: ClippedSum.across)
        zero = lambda x: jnp.zeros_like(batch_leaves[0], x.dtype, x.shape)  # noqa: E731
        leaves = [x + zero(x) for x in leaves]
    example = [jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for x in batch_leaves]
    _check_loss(owner, loss_fn, params, jax.tree.unflatten(batch_def, example), has_aux)

    def flat_loss(ls: Sequence[Any], ex: Sequence[Any]) -> Any:
        out = loss_fn(
            jax.tree_util.tree_unflatten(treedef, list(ls)), jax.tree.unflatten(batch_def, ex)
        )
        return out[0] if has_aux else out

    closed, sites, _ = _ghost_trace.trace(flat_loss, leaves, example)
    uses = _ghost_plan.classify(sites, len(leaves), mode)
    acc = _norms.accumulation_dtype([x.dtype for x in leaves])
    traced = _ghost_terms.Traced(treedef, paths, leaves, closed, sites, uses, acc)
    fallback = sorted(
        {_checks.path_str(paths[u.leaf]) for per in uses for u in per if u.kind == "fallback"}
    )
    if fallback:
        warnings.warn(
            f"{owner}: per-example gradients are formed explicitly (no ghost norm) for "
            f"{', '.join(fallback)}: they enter the loss through operations other than a "
            "matrix product, an embedding lookup or an elementwise op.",
            stacklevel=4,
        )
    return traced, batch_leaves, batch_def, size


def _check_loss(
    owner: str, loss_fn: Callable[..., Any], params: Any, example: Any, has_aux: bool
) -> None:
    out = jax.eval_shape(loss_fn, params, example)
    if has_aux:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ValueError(
                f"{owner}: with has_aux=True loss_fn must return a pair (loss, aux), got {out}."
            )
        out = out[0]
    elif isinstance(out, (tuple, list)):
        raise ValueError(
            f"{owner}: loss_fn returned a {type(out).__name__}, not a scalar loss; if it "
            "returns (loss, aux), pass has_aux=True."
        )
    shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    if shape != ():
        raise ValueError(
            f"{owner}: loss_fn(params, example) must return the scalar loss of one example "
            f"(no batch axis), got shape {shape}."
        )
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{owner}: loss_fn must return a floating-point loss, got {dtype}.")


def _pieces(
    traced: _ghost_terms.Traced, batch_leaves: Sequence[Array], mask: Array | None
) -> tuple[list[Array], list[Array]]:
    """Per example: the sites' other inputs and the loss's gradients at their outputs.

    One forward and one backward pass of the summed loss, with zero probes added
    at the sites: examples are independent under ``vmap``, so the probes'
    gradients are the per-example output gradients.
    """
    size = batch_leaves[0].shape[0]
    avals = _ghost_trace.probe_avals(traced.sites)
    # typed like the batch: per device inside shard_map
    probes = [jnp.zeros_like(batch_leaves[0], a.dtype, (size, *a.shape)) for a in avals]

    def one(ps: Sequence[Array], example: Sequence[Array]) -> tuple[Array, list[Array]]:
        run = _ghost_trace.Interpreter(ps)
        return run.run(traced.closed, traced.leaves, example)[0], run.captures

    def summed(ps: list[Array]) -> tuple[Array, list[Array]]:
        return jax.vmap(one)(ps, list(batch_leaves))

    losses, pull, caps = jax.vjp(summed, probes, has_aux=True)
    (grads,) = pull(jnp.ones_like(losses))
    if mask is not None:
        # padding examples may hold anything (NaN included): zero what they give
        def keep(x: Array) -> Array:
            if not jnp.issubdtype(x.dtype, jnp.inexact):
                return x
            m = mask.reshape((size,) + (1,) * (x.ndim - 1))
            return jnp.where(m, x, jnp.zeros_like(x))

        grads = [keep(g) for g in grads]
        caps = [keep(c) for c in caps]
    return caps, grads


def _finish(
    traced: _ghost_terms.Traced,
    norms: Array,
    clip_norm: Any,
    mask: Array | None,
    weights: Array | None,
    total_for: Callable[[Array], list[Array]],
) -> ClippedSum:
    c = jnp.asarray(clip_norm).astype(norms.dtype)
    factors = _apply.scale_for(norms, c)
    counted = jnp.ones_like(norms, bool) if mask is None else mask
    # as clip_and_sum: scales below 2^-100 are two factors, the second applied last
    shift = jnp.min(jnp.where(counted, factors.tiny, 1.0), initial=1.0)
    coef = factors.value * (factors.tiny / shift)
    if weights is not None:
        coef = coef * weights.astype(coef.dtype)
    coef = jnp.where(counted, coef, jnp.zeros_like(coef))
    summed = total_for(coef)
    total = [(s.astype(coef.dtype) * shift).astype(x.dtype) for s, x in zip(summed, traced.leaves)]
    zero = jnp.zeros_like(norms)
    return ClippedSum(
        total=jax.tree_util.tree_unflatten(traced.treedef, total),
        num_examples=jnp.sum(counted, dtype=jnp.int32),
        clipped=jnp.sum(counted & (norms > c), dtype=jnp.int32),
        norm_sum=jnp.sum(jnp.where(counted, norms, zero)),
        scale_sum=jnp.sum(jnp.where(counted, factors.product(), zero)),
        max_norm=jnp.max(jnp.where(counted, norms, zero)),
        clip_norm=c,
        finite=jnp.all(jnp.isfinite(norms) | ~counted),
    )


def _chunk_sum(
    traced: _ghost_terms.Traced,
    batch_leaves: Sequence[Array],
    clip_norm: Any,
    weights: Array | None,
    nonfinite: str,
) -> tuple[ClippedSum, Array]:
    size = batch_leaves[0].shape[0]
    mask = None if weights is None else weights != 0
    caps, grads = _pieces(traced, batch_leaves, mask)
    if nonfinite == "zero":
        # every example's gradient is needed to zero its non-finite elements
        uses = [dataclasses.replace(u, kind="outer", layout=None) for p in traced.uses for u in p]
        site_grads = _ghost_terms.site_grads_of(traced, grads)
        per = _ghost_terms.explicit_grads(traced, uses, caps, site_grads)
        full = [
            jnp.where(jnp.isfinite(g), g, 0.0) if g is not None else None
            for g in (per.get(i) for i in range(len(traced.leaves)))
        ]
        sq = sum(
            jnp.sum(jnp.square(g.astype(traced.acc).reshape(size, -1)), axis=1)
            for g in full
            if g is not None
        )
        norms = jnp.sqrt(jnp.zeros((size,), traced.acc) + sq)

        def total_for(coef: Array) -> list[Array]:
            return [
                jnp.zeros(x.shape, coef.dtype)
                if g is None
                else jnp.tensordot(coef, g.astype(coef.dtype), axes=(0, 0))
                for g, x in zip(full, traced.leaves)
            ]

        return _finish(traced, norms, clip_norm, mask, weights, total_for), norms
    sq, explicit = _ghost_terms.squared_norms(traced, caps, grads, size)
    norms = jnp.sqrt(jnp.maximum(sq, 0.0))

    def total_for(coef: Array) -> list[Array]:
        return _ghost_terms.weighted_total(traced, caps, grads, explicit, coef)

    out = _finish(traced, norms, clip_norm, mask, weights, total_for)
    return out, norms


def _ghost_sum(
    loss_fn: Callable[..., Any],
    params: Any,
    batch: Any,
    clip_norm: Any,
    *,
    has_aux: bool = False,
    microbatch_size: int | None = None,
    nonfinite: str = "propagate",
    weights: Any = None,
    mode: str = "auto",
    owner: str = "jaxclip.ghost_clipped_sum",
    with_norms: bool = False,
) -> Any:
    """:func:`ghost_clipped_sum`, with the path forced by ``mode`` and, when
    ``with_norms``, the per-example norms as well."""
    _checks.check_choice(owner, "nonfinite", nonfinite, ("propagate", "zero"))
    _checks.check_scalar(owner, "clip_norm", clip_norm, minimum=0.0, allow_inf=True)
    traced, batch_leaves, _, size = _prepare(owner, loss_fn, params, batch, has_aux, mode)
    if weights is not None:
        weights = jnp.asarray(weights)
        if weights.shape != (size,) or not jnp.issubdtype(weights.dtype, jnp.floating):
            raise ValueError(
                f"{owner}: weights must be a float array of shape ({size},) (one per "
                f"example), got {weights.dtype}{list(weights.shape)}."
            )
    step = size if microbatch_size is None else microbatch_size
    if isinstance(step, bool) or not isinstance(step, int) or step < 1 or size % step:
        raise ValueError(
            f"{owner}: microbatch_size must be a positive int dividing the batch size "
            f"{size}, got {microbatch_size!r}."
        )
    if step == size:
        out, norms = _chunk_sum(traced, batch_leaves, clip_norm, weights, nonfinite)
        return (out, norms) if with_norms else out
    chunks = size // step
    micro = [x.reshape(chunks, step, *x.shape[1:]) for x in batch_leaves]
    micro_w = None if weights is None else weights.reshape(chunks, step)

    def body(carry: ClippedSum | None, chunk: Any) -> tuple[ClippedSum, Array]:
        leaves, w = chunk
        part, norms = _chunk_sum(traced, leaves, clip_norm, w, nonfinite)
        return part.merge(carry), norms

    first, norms0 = body(None, jax.tree.map(lambda x: x[0], (micro, micro_w)))
    out, norms = jax.lax.scan(body, first, jax.tree.map(lambda x: x[1:], (micro, micro_w)))
    return (out, jnp.concatenate([norms0, norms.reshape(-1)])) if with_norms else out


def _varying_axes(x: Array) -> frozenset:
    """The ``shard_map`` axes over which ``x`` differs from device to device."""
    aval = jax.typeof(x)
    found = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    return frozenset(found if found is not None else getattr(aval, "vma", ()))


def _batch_split(batch: Any) -> tuple[Any, tuple[str, ...]] | None:
    """The mesh and axes a batch's leading axis is split over, by its type (explicit
    sharding); None when it is not. Such a batch is handled a piece per device."""
    for x in jax.tree.leaves(batch):
        sharding = getattr(jax.typeof(x), "sharding", None)
        spec = getattr(sharding, "spec", None)
        if sharding is not None and spec and spec[0] is not None:
            return sharding.mesh, spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    return None


def _example_norms(
    loss_fn: Callable[..., Any],
    params: Any,
    batch: Any,
    *,
    has_aux: bool = False,
    mode: str = "auto",
    owner: str = "jaxclip.per_example_norms",
) -> Array:
    traced, batch_leaves, _, size = _prepare(owner, loss_fn, params, batch, has_aux, mode)
    caps, grads = _pieces(traced, batch_leaves, None)
    sq, _ = _ghost_terms.squared_norms(traced, caps, grads, size)
    return jnp.sqrt(jnp.maximum(sq, 0.0))


def _plan(
    loss_fn: Callable[..., Any],
    params: Any,
    batch: Any,
    *,
    has_aux: bool = False,
    mode: str = "auto",
) -> dict[str, list[tuple[str, str]]]:
    """Per parameter leaf, ``(primitive, path)`` for each of its uses; the path is
    ``"gram"``, ``"index"`` (embedding), ``"outer"`` (formed: cheaper than the
    Gram form), ``"elementwise"`` or ``"fallback"``. For tests and debugging."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = _prepare("jaxclip.ghost", loss_fn, params, batch, has_aux, mode)[0]
    return {
        _checks.path_str(traced.paths[leaf]): [(traced.sites[u.site].name, u.kind) for u in uses]
        for leaf, uses in enumerate(traced.uses)
    }


def per_example_norms(
    loss_fn: Callable[..., Any], params: Any, batch: Any, *, has_aux: bool = False
) -> Array:
    """Each example's gradient norm, without forming per-example gradients where it can.

    The global L2 norm over all parameters of ``grad(loss_fn)(params, example)``
    for every example of ``batch``, as ``jax.vmap(jax.grad(loss_fn), (None, 0))``
    followed by a norm would give it, from one forward and one backward pass of
    the summed loss. Parameters used by matrix products (dense layers, einsums,
    attention projections, at every position of a sequence) and by embedding
    lookups get their norms from Gram matrices over the positions (ghost norms);
    the others (biases, norm scales) cost one copy of themselves per example;
    the body of a ``scan`` of up to 256 steps (an RNN) is followed step by step;
    those used by other operations (convolutions, longer scans, custom
    derivatives) have their per-example gradients formed, with a warning.

    Args:
      loss_fn: ``loss_fn(params, example) -> loss``, the scalar loss of one
        example (no batch axis).
      params: the parameters, a pytree of floating-point arrays.
      batch: a pytree of arrays with a leading batch axis.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``; aux is ignored.

    Returns:
      float32[B] (float64 when a parameter is float64): the per-example norms.

    Example:
      >>> import jax.numpy as jnp, jaxclip
      >>> loss = lambda w, ex: jnp.sum(ex["x"] @ w)
      >>> batch = {"x": jnp.array([[3.0, 4.0], [0.0, 1.0]])}
      >>> norms = jaxclip.per_example_norms(loss, jnp.ones((2, 5)), batch)  # |x| * sqrt(5)
      >>> [round(n, 3) for n in norms.tolist()]
      [11.18, 2.236]

    References:
      Goodfellow, "Efficient Per-Example Gradient Computations", 2015
      (arXiv:1510.01799); Li, Tramer, Liang and Hashimoto, "Large Language
      Models Can Be Strong Differentially Private Learners", ICLR 2022
      (arXiv:2110.05679).
    """
    split = _batch_split(batch)
    if split is None:
        return _example_norms(loss_fn, params, batch, has_aux=has_aux)
    mesh, axes = split
    return _per_device(
        lambda p, b: _example_norms(loss_fn, p, b, has_aux=has_aux),
        mesh=mesh,
        in_specs=(P(), P(axes)),
        out_specs=P(axes),
    )(params, batch)


def ghost_clipped_sum(
    loss_fn: Callable[..., Any],
    params: Any,
    batch: Any,
    clip_norm: Any,
    *,
    has_aux: bool = False,
    microbatch_size: int | None = None,
    nonfinite: str = "propagate",
    weights: Any = None,
) -> ClippedSum:
    """Per-example gradients clipped and summed, at about the memory of one gradient.

    The same :class:`~jaxclip.ClippedSum` as
    ``jaxclip.clipped_gradient_sum(jax.grad(loss_fn), params, batch, clip_norm)``:
    each example's gradient is clipped to global L2 norm ``clip_norm`` and the
    clipped gradients are summed, ready for :func:`~jaxclip.per_example_clip`.
    The norms come from :func:`per_example_norms`'s ghost norms; the sum from
    the same forward and backward pass, each example's output gradients
    weighted by its clip factor (book-keeping), so no per-example gradient of a
    matrix-product or embedding parameter is formed.

    Args:
      loss_fn: ``loss_fn(params, example) -> loss``, the scalar loss of one
        example (no batch axis).
      params: the parameters, a pytree of floating-point arrays.
      batch: a pytree of arrays with a leading batch axis. A batch split over
        devices by its type (``jax.make_mesh``'s explicit axes) is clipped a
        piece per device under ``jit`` and the records added; inside your own
        ``shard_map``, merge them with :meth:`~jaxclip.ClippedSum.across`.
      clip_norm: the per-example norm bound C >= 0.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``; aux is ignored.
      microbatch_size: examples per microbatch; must divide the batch size.
        None: the whole batch at once.
      nonfinite: ``"propagate"`` (default) or ``"zero"``, as in
        :func:`~jaxclip.clip_and_sum`. ``"zero"`` needs each example's gradient
        elements, so it forms the per-example gradients (no memory saving).
      weights: None, or float[B]: the clipped gradient of example b is
        multiplied by ``weights[b]``; an example of weight 0 (padding) adds
        nothing and is not counted in any statistic.

    Returns:
      A :class:`~jaxclip.ClippedSum` over the examples of nonzero weight.

    Example:
      >>> import jax.numpy as jnp, jaxclip
      >>> loss = lambda w, ex: jnp.sum(ex["x"] @ w)
      >>> batch = {"x": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
      >>> out = jaxclip.ghost_clipped_sum(loss, jnp.ones((2, 1)), batch, 1.0)
      >>> [round(x, 3) for x in out.total.ravel().tolist()], int(out.clipped)
      ([0.9, 1.2], 1)

    References:
      Li, Tramer, Liang and Hashimoto, "Large Language Models Can Be Strong
      Differentially Private Learners", ICLR 2022 (arXiv:2110.05679); Bu,
      Wang, Zha and Karypis, "Differentially Private Optimization on Large
      Model at Small Cost", ICML 2023 (arXiv:2210.00038); Abadi et al., "Deep
      Learning with Differential Privacy", CCS 2016 (arXiv:1607.00133).
    """

    def local(params: Any, batch: Any, weights: Any) -> ClippedSum:
        return _ghost_sum(
            loss_fn,
            params,
            batch,
            clip_norm,
            has_aux=has_aux,
            microbatch_size=microbatch_size,
            nonfinite=nonfinite,
            weights=weights,
        )

    split = _batch_split(batch)
    if split is None:
        return local(params, batch, weights)
    mesh, axes = split
    return _per_device(
        lambda p, b, w: local(p, b, w).across(axes),
        mesh=mesh,
        in_specs=(P(), P(axes), None if weights is None else P(axes)),
        out_specs=P(),
    )(params, batch, weights)
