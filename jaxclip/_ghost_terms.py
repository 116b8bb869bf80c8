"""Ghost clipping's arithmetic: per-example squared norms and weighted sums from
the pieces one forward and backward pass gives (see :mod:`jaxclip.ghost`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxclip import _ghost_plan, _ghost_trace

Array = jax.Array


@dataclasses.dataclass
class Traced:
    """The per-example loss traced once: its parameters, sites and their uses."""

    treedef: Any
    paths: list[Any]
    leaves: list[Array]
    closed: Any
    sites: list[_ghost_trace.Site]
    uses: list[list[_ghost_plan.Use]]  # per leaf
    acc: Any  # the accumulation dtype


def site_grads_of(traced: Traced, grads: Sequence[Array]) -> list[list[Array]]:
    out, k = [], 0
    for site in traced.sites:
        out.append(list(grads[k : k + len(site.probed)]))
        k += len(site.probed)
    return out


def _operand(traced: Traced, site: _ghost_trace.Site, i: int, caps: Sequence[Array], size: int):
    kind, item = site.operands[i]
    if kind == "capture":
        return caps[site.first_capture + item]
    value = item.replay(traced.leaves[item.leaf]) if kind == "chain" else jnp.asarray(item)
    return jnp.broadcast_to(value, (size, *jnp.shape(value)))


def _factors(
    traced: Traced, use: _ghost_plan.Use, caps: Sequence[Array], site_grads: list[list[Array]]
):
    """The use's per-example ``(x, y)``, ``x`` either dense (B, H, T, P) or
    ``(ids, valid)`` (B, 1, T); ``y`` is (B, H, T, Q)."""
    site, layout = traced.sites[use.site], use.layout
    assert layout is not None
    h, t, p, q = layout.sizes
    g = site_grads[use.site][0].astype(traced.acc)
    size = g.shape[0]
    if layout.gather_fill is not None:
        ids = _operand(traced, site, 1, caps, size).reshape(size, 1, t)
        valid = (ids >= 0) & (ids < p) if layout.gather_fill else jnp.ones(ids.shape, bool)
        return (jnp.clip(ids, 0, p - 1), valid), g.reshape(size, 1, t, q)
    a = _operand(traced, site, 1 - use.position, caps, size).astype(traced.acc)
    x = a.transpose(0, *(i + 1 for i in layout.x_order)).reshape(size, h, t, p)
    y = g.transpose(0, *(i + 1 for i in layout.y_order)).reshape(size, h, t, q)
    return (y, x) if use.swap else (x, y)


def _einsum(spec: str, *xs: Array) -> Array:
    return jnp.einsum(spec, *xs, precision=lax.Precision.HIGHEST)


def _x_gram(u: Any, v: Any) -> Array:
    """``x_t . x_s`` for all t of one use and s of another: (B, H, Tu, Tv)."""
    if isinstance(u, tuple) and isinstance(v, tuple):
        same = u[0][..., :, None] == v[0][..., None, :]
        return (same & u[1][..., :, None] & v[1][..., None, :]).astype(jnp.float32)
    if isinstance(u, tuple):
        cols = jnp.take_along_axis(jnp.swapaxes(v, 2, 3), u[0][..., None], axis=2)
        return cols * u[1][..., None]
    if isinstance(v, tuple):
        return jnp.swapaxes(_x_gram(v, u), 2, 3)
    return _einsum("bhtp,bhsp->bhts", u, v)


def _key_layout(g: Array, key: tuple[tuple[int, ...], ...]) -> Array:
    """Per-example gradients (B, *leaf) as (B, H, P, Q) along ``key``'s axes."""
    order = [a for axes in key for a in axes]
    sizes = [_ghost_plan.prod([g.shape[a + 1] for a in axes]) for axes in key]
    return g.transpose(0, *(a + 1 for a in order)).reshape(g.shape[0], *sizes)


def explicit_grads(
    traced: Traced,
    uses: Sequence[_ghost_plan.Use],
    caps: Sequence[Array],
    site_grads: list[list[Array]],
) -> dict[int, Array]:
    """The per-example gradient (B, *leaf) of each leaf through ``uses`` alone."""
    if not uses:
        return {}
    positions: dict[int, set[int]] = {}
    for u in uses:
        positions.setdefault(u.site, set()).add(u.position)
    order = sorted(positions)
    varied = {u.leaf: traced.leaves[u.leaf] for u in uses}
    cots = [g for s in order for g in site_grads[s]]

    def outputs(values: dict[int, Array], example_caps: Sequence[Array]) -> list[Array]:
        return [
            o
            for s in order
            for o in traced.sites[s].outputs_with(
                traced.leaves, example_caps, values, sorted(positions[s])
            )
        ]

    def per_example(example_caps: Sequence[Array], example_cots: Sequence[Array]) -> Any:
        _, pull = jax.vjp(lambda v: outputs(v, example_caps), varied)
        return pull(list(example_cots))[0]

    return jax.vmap(per_example)(list(caps), cots)


def squared_norms(
    traced: Traced, caps: Sequence[Array], grads: Sequence[Array], size: int
) -> tuple[Array, dict[int, Array]]:
    """Each example's squared gradient norm (B,), and the explicit per-example
    gradients that were formed on the way."""
    site_grads = site_grads_of(traced, grads)
    explicit_uses = [u for per in traced.uses for u in per if u.layout is None]
    explicit = explicit_grads(traced, explicit_uses, caps, site_grads)
    total = jnp.zeros((size,), traced.acc)
    for leaf, uses in enumerate(traced.uses):
        factored = [u for u in uses if u.layout is not None]
        pieces = [_factors(traced, u, caps, site_grads) for u in factored]
        dense = explicit.get(leaf)
        if dense is not None:
            dense = dense.astype(traced.acc)
            total = total + jnp.sum(jnp.square(dense.reshape(size, -1)), axis=1)
        if not factored:
            continue
        if dense is not None:
            key = factored[0].layout.key  # type: ignore[union-attr]
            if factored[0].swap:
                key = (key[0], key[2], key[1])
            blocks = _key_layout(dense, key)
            for x, y in pieces:
                if isinstance(x, tuple):
                    rows = jnp.take_along_axis(blocks, x[0][..., None], axis=2) * x[1][..., None]
                else:
                    rows = _einsum("bhpq,bhtp->bhtq", blocks, x)
                total = total + 2 * jnp.sum(rows * y, axis=(1, 2, 3))
        pieces = _merged(pieces)
        for i, (xu, yu) in enumerate(pieces):
            for j in range(i, len(pieces)):
                xv, yv = pieces[j]
                cross = jnp.sum(_x_gram(xu, xv) * _einsum("bhtq,bhsq->bhts", yu, yv), (1, 2, 3))
                total = total + (cross if i == j else 2 * cross)
    return total, explicit


def _merged(pieces: list[Any]) -> list[Any]:
    """Dense pieces of one leaf whose blocks and features agree, joined along the
    positions: one Gram holds all their cross terms (the steps of an unrolled RNN)."""
    groups: dict[Any, list[Any]] = {}
    out = []
    for x, y in pieces:
        if isinstance(x, tuple):
            out.append((x, y))
        else:
            groups.setdefault((x.shape[:2], x.shape[3:], y.shape[3:]), []).append((x, y))
    for group in groups.values():
        xs, ys = zip(*group)
        out.append((jnp.concatenate(xs, axis=2), jnp.concatenate(ys, axis=2)))
    return out


def weighted_total(
    traced: Traced,
    caps: Sequence[Array],
    grads: Sequence[Array],
    explicit: dict[int, Array],
    coef: Array,
) -> list[Array]:
    """``sum_b coef_b * gradient_b`` for every leaf (book-keeping): the factored
    uses' share from one vector-Jacobian product of their sites, batch and
    positions contracted together, with the output gradients weighted by
    ``coef``; the explicit per-example gradients' share by a contraction."""
    factored: dict[int, set[int]] = {}
    for u in (u for per in traced.uses for u in per if u.layout is not None):
        factored.setdefault(u.site, set()).add(u.position)
    order = sorted(factored)
    site_grads = site_grads_of(traced, grads)

    def weigh(g: Array) -> Array:
        c = coef.reshape((-1,) + (1,) * (g.ndim - 1))
        return (g.astype(coef.dtype) * c).astype(g.dtype)

    def outputs(values: list[Array], example_caps: Sequence[Array]) -> list[Array]:
        varied = dict(enumerate(values))
        return [
            o
            for s in order
            for o in traced.sites[s].outputs_with(
                traced.leaves, example_caps, varied, sorted(factored[s])
            )
        ]

    def batched(values: list[Array]) -> list[Array]:
        return jax.vmap(outputs, in_axes=(None, 0))(values, list(caps))

    totals = [jnp.zeros(x.shape, coef.dtype) for x in traced.leaves]
    if order:
        _, pull = jax.vjp(batched, list(traced.leaves))
        shares = pull([weigh(g) for s in order for g in site_grads[s]])[0]
        totals = [t + s.astype(coef.dtype) for t, s in zip(totals, shares)]
    for leaf, g in explicit.items():
        totals[leaf] = totals[leaf] + jnp.tensordot(coef, g.astype(coef.dtype), axes=(0, 0))
    return totals
