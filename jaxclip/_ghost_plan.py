"""Which path each use of a parameter takes in :mod:`jaxclip.ghost`.

A use read by ``dot_general`` (the parameter at most transposed or cast) takes
the Gram form, one gathered by rows (an embedding) the Gram form over equal ids,
one read elementwise costs a copy of the parameter per example; the rest fall
back to exact per-example gradients. Per use, the explicit outer product
replaces the Gram form where it is smaller.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from jax import lax

from jaxclip._ghost_trace import Chain, Site

# Uses whose per-example gradient is formed explicitly but is no bigger than the
# parameter itself per example (a bias, a norm's scale, a slice): not a fallback.
ELEMENTWISE = frozenset(
    {
        "identity",
        "add",
        "add_any",
        "sub",
        "mul",
        "div",
        "neg",
        "select_n",
        "slice",
        "dynamic_slice",
        "concatenate",
        "pad",
        "reduce_sum",
        "stop_gradient",
    }
)
MODES = ("auto", "gram", "outer")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one use's gradient ``sum_t x_t (x) y_t`` sits in its leaf's axes.

    The leaf's axes split into ``key = (h, p, q)``: block axes (batch dimensions
    of a ``dot_general``), the axes of ``x`` and those of ``y``.
    """

    key: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    sizes: tuple[int, int, int, int]  # H, T, P, Q
    x_order: tuple[int, ...] = ()  # the other operand's axes as (H, T, P)
    y_order: tuple[int, ...] = ()  # the output's axes as (H, T, Q)
    gather_fill: bool | None = None  # an embedding lookup: drops out-of-range ids


@dataclasses.dataclass(frozen=True)
class Use:
    site: int
    position: int
    leaf: int
    kind: str  # "gram", "index", "outer", "elementwise" or "fallback"
    layout: Layout | None = None
    swap: bool = False  # x and y exchange roles to match the leaf's reference key


def prod(xs: Sequence[int]) -> int:
    return int(math.prod(xs))


def dot_layout(site: Site, j: int, chain: Chain) -> Layout | None:
    w, a = site.in_avals[j], site.in_avals[1 - j]
    perm = chain.permutation(w.ndim)
    if perm is None:
        return None
    (lc, rc), (lb, rb) = site.params["dimension_numbers"]
    wc, ac = (tuple(lc), tuple(rc)) if j == 0 else (tuple(rc), tuple(lc))
    wb, ab = (tuple(lb), tuple(rb)) if j == 0 else (tuple(rb), tuple(lb))
    wf = [i for i in range(w.ndim) if i not in wc and i not in wb]
    af = [i for i in range(a.ndim) if i not in ac and i not in ab]
    nb = len(wb)
    # dot_general's output: batch axes, then the lhs's free axes, then the rhs's
    if j == 0:
        w_out, a_out = range(nb, nb + len(wf)), range(nb + len(wf), nb + len(wf) + len(af))
    else:
        a_out, w_out = range(nb, nb + len(af)), range(nb + len(af), nb + len(af) + len(wf))
    h, p, q = ([perm[i] for i in axes] for axes in (wb, wc, wf))
    ho, po, qo = (list(np.argsort(axes, kind="stable")) for axes in (h, p, q))
    x_order = (*(ab[i] for i in ho), *af, *(ac[i] for i in po))
    y_order = (*ho, *a_out, *(list(w_out)[i] for i in qo))
    sizes = (
        prod([w.shape[i] for i in wb]),
        prod([a.shape[i] for i in af]),
        prod([w.shape[i] for i in wc]),
        prod([w.shape[i] for i in wf]),
    )
    key = (tuple(sorted(h)), tuple(sorted(p)), tuple(sorted(q)))
    return Layout(key, sizes, tuple(int(i) for i in x_order), tuple(int(i) for i in y_order))


def gather_layout(site: Site, j: int, chain: Chain) -> Layout | None:
    """An embedding lookup ``table[ids]``: rows of the leaf gathered at integer ids."""
    table, ids = site.in_avals
    r = table.ndim
    if j != 0 or r < 1 or chain.permutation(r) != tuple(range(r)):
        return None
    if site.operands[1][0] != "capture" or ids.ndim < 1 or ids.shape[-1] != 1:
        return None
    dn = site.params["dimension_numbers"]
    out_ndim = site.out_avals[0].ndim
    if (
        tuple(dn.collapsed_slice_dims) != (0,)
        or tuple(dn.start_index_map) != (0,)
        or tuple(dn.operand_batching_dims)
        or tuple(dn.start_indices_batching_dims)
        or tuple(site.params["slice_sizes"]) != (1, *table.shape[1:])
        or tuple(dn.offset_dims) != tuple(range(out_ndim - (r - 1), out_ndim))
    ):
        return None
    fill = site.params["mode"] == lax.GatherScatterMode.FILL_OR_DROP
    sizes = (1, prod(ids.shape[:-1]), table.shape[0], prod(table.shape[1:]))
    return Layout(((), (0,), tuple(range(1, r))), sizes, gather_fill=fill)


def classify(sites: Sequence[Site], num_leaves: int, mode: str) -> list[list[Use]]:
    """Per leaf, its uses and the path each takes."""
    found: list[list[tuple[int, int, str, Layout | None]]] = [[] for _ in range(num_leaves)]
    for s, site in enumerate(sites):
        for j, (kind, chain) in enumerate(site.operands):
            if kind != "chain":
                continue
            layout, path = None, "fallback"
            if site.name == "dot_general":
                layout = dot_layout(site, j, chain)
                path = "gram" if layout is not None else "fallback"
            elif site.name == "gather":
                layout = gather_layout(site, j, chain)
                path = "index" if layout is not None else "fallback"
            elif site.name in ELEMENTWISE:
                path = "elementwise"
            found[chain.leaf].append((s, j, path, layout))
    uses: list[list[Use]] = []
    for leaf, items in enumerate(found):
        keys = [lay.key for _, _, path, lay in items if path == "index" and lay is not None]
        keys += [lay.key for _, _, path, lay in items if path == "gram" and lay is not None]
        ref = keys[0] if keys else None
        out = []
        for s, j, path, layout in items:
            swap = False
            if layout is not None:
                h, p, q = layout.key
                if layout.key != ref and path == "gram" and (h, q, p) == ref:
                    swap = True
                elif layout.key != ref:  # layouts whose cross terms we cannot form
                    path, layout = "fallback", None
            if layout is not None and mode != "gram":
                _, t, p_, q_ = layout.sizes
                gram = t * t * (p_ + q_) if path == "gram" else t * t * (q_ + 1)
                outer = t * p_ * q_ if path == "gram" else (t + p_) * q_
                if mode == "outer" or outer <= gram:
                    path, layout, swap = "outer", None, False
            out.append(Use(s, j, leaf, path, layout, swap))
        uses.append(out)
    return uses
