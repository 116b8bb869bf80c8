"""Where each parameter enters a per-example loss, and zero probes added there.

:mod:`jaxclip.ghost` needs, for every use of a parameter, the gradient of the
loss with respect to that use's output and the use's other inputs. This module
evaluates the loss's jaxpr one equation at a time:

- the parameters are the jaxpr's first inputs; a value computed from one of them
  alone by a layout or dtype change (transpose, reshape, broadcast, convert) is a
  *chain* of that parameter, replayable from it;
- calls (``jit``, ``closed_call``, ``checkpoint``) that receive a chain are
  evaluated inline, so that uses inside them are seen; so is a ``scan`` that
  reads parameters as constants, one step after another;
- any other equation that reads a chain is a *site*: a zero probe is added to
  each of its floating-point outputs and its other inputs are returned, so that
  one backward pass of the summed batch loss gives, per example, the gradient
  with respect to each site's outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

# longer scans that read parameters stay sites (each step unrolled is traced and compiled)
_MAX_UNROLL = 256
# evaluated inline when a parameter flows into them
_INLINE = frozenset({"jit", "pjit", "closed_call", "core_call", "checkpoint", "remat"})
# single-input ops whose output is still "the parameter" for the analysis
_ALIAS = frozenset(
    {
        "transpose",
        "convert_element_type",
        "copy",
        "copy_p",
        "reshape",
        "broadcast_in_dim",
        "squeeze",
        "expand_dims",
    }
)


def bind(primitive: Any, values: Sequence[Any], params: Any) -> Any:
    """Applies a jaxpr equation's primitive to ``values``."""
    bind_params = primitive.get_bind_params(params)
    if isinstance(bind_params, tuple):  # jax < 0.8: (subfunctions, params)
        subfuns, bind_params = bind_params
        return primitive.bind(*subfuns, *values, **bind_params)
    return primitive.bind(*values, **bind_params)


@dataclasses.dataclass(frozen=True)
class Chain:
    """A value computed from parameter leaf ``leaf`` by the single-input ``ops``."""

    leaf: int
    ops: tuple[tuple[Any, Any], ...] = ()

    def replay(self, leaf_value: Any) -> Any:
        v = leaf_value
        for prim, params in self.ops:
            v = bind(prim, [v], params)
        return v

    def permutation(self, ndim: int) -> tuple[int, ...] | None:
        """The leaf axis behind each of the value's ``ndim`` axes, when ``ops`` only
        transpose or change the float dtype; None otherwise."""
        perm = tuple(range(ndim))
        for prim, params in self.ops:
            if prim.name == "transpose":
                perm = tuple(perm[i] for i in params["permutation"])
            elif prim.name not in ("convert_element_type", "copy", "copy_p"):
                return None
        return perm


@dataclasses.dataclass
class Site:
    """An equation that reads a parameter: where probes go."""

    primitive: Any  # None: the loss is itself a parameter chain (identity)
    params: dict[str, Any]
    # per operand: ("chain", Chain), ("capture", k) or ("const", value)
    operands: list[tuple[str, Any]]
    in_avals: list[Any]
    out_avals: list[Any]
    probed: list[int]  # the floating-point outputs, which get probes
    multiple_results: bool
    first_capture: int = 0  # index of this site's first capture in the flat list

    @property
    def name(self) -> str:
        return "identity" if self.primitive is None else self.primitive.name

    def apply(self, values: Sequence[Any]) -> list[Any]:
        if self.primitive is None:
            return [values[0]]
        out = bind(self.primitive, values, self.params)
        return list(out) if self.multiple_results else [out]

    def outputs_with(
        self,
        leaves: Sequence[Any],
        captures: Sequence[Any],
        varied: dict[int, Any],
        positions: Sequence[int] | None = None,
    ) -> list[Any]:
        """The probed outputs, the chain operands at ``positions`` (all when None)
        replayed from ``varied[leaf]`` where their leaf is there, the others from
        ``leaves``."""
        values = []
        for idx, (kind, item) in enumerate(self.operands):
            if kind == "chain":
                use = item.leaf in varied and (positions is None or idx in positions)
                values.append(item.replay(varied[item.leaf] if use else leaves[item.leaf]))
            elif kind == "capture":
                values.append(captures[self.first_capture + item])
            else:
                values.append(item)
        outs = self.apply(values)
        return [outs[i] for i in self.probed]


def _inner(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
    for key in ("jaxpr", "call_jaxpr"):
        inner = eqn.params.get(key)
        if isinstance(inner, jcore.ClosedJaxpr):
            return inner.jaxpr, inner.consts
        if isinstance(inner, jcore.Jaxpr):
            return inner, ()
    return None


def _is_float(aval: Any) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def _alias_ok(eqn: Any) -> bool:
    if eqn.primitive.name not in _ALIAS or len(eqn.invars) != 1 or len(eqn.outvars) != 1:
        return False
    # an integer or bool cast is not differentiable: the reader is a site
    return _is_float(eqn.invars[0].aval) and _is_float(eqn.outvars[0].aval)


class Interpreter:
    """Evaluates a closed jaxpr with probes at the sites.

    With ``probes=None`` nothing is added (the discovery run); ``sites`` is
    filled in the order the sites are met, the same order on every run.
    """

    def __init__(self, probes: Sequence[Any] | None = None):
        self.probes = probes
        self.sites: list[Site] = []
        self.captures: list[Any] = []
        self._next_probe = 0

    def run(self, closed: Any, leaves: Sequence[Any], inputs: Sequence[Any]) -> list[Any]:
        jaxpr = closed.jaxpr
        chains = {v: Chain(i) for i, v in enumerate(jaxpr.invars[: len(leaves)])}
        outs, out_chains = self._eval(jaxpr, closed.consts, [*leaves, *inputs], chains)
        if out_chains[0] is not None:  # the loss is a parameter (or a cast of one)
            aval = jaxpr.outvars[0].aval
            site = Site(None, {}, [("chain", out_chains[0])], [aval], [aval], [0], False)
            outs[0] = self._site(site, [outs[0]])[0]
        return outs

    def _eval(
        self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], chains: dict[Any, Chain]
    ) -> tuple[list[Any], list[Chain | None]]:
        env: dict[Any, Any] = {}

        def read(v: Any) -> Any:
            return v.val if isinstance(v, jcore.Literal) else env[v]

        def chain_of(v: Any) -> Chain | None:
            return None if isinstance(v, jcore.Literal) else chains.get(v)

        env.update(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            in_chains = [chain_of(v) for v in eqn.invars]
            if not any(c is not None for c in in_chains):
                outs = bind(eqn.primitive, invals, eqn.params)
                outs = list(outs) if eqn.primitive.multiple_results else [outs]
            elif eqn.primitive.name in _INLINE and (called := _inner(eqn)) is not None:
                inner, inner_consts = called
                inner_chains = {v: c for v, c in zip(inner.invars, in_chains) if c is not None}
                outs, out_chains = self._eval(inner, inner_consts, invals, inner_chains)
                for v, c in zip(eqn.outvars, out_chains):
                    if c is not None:
                        chains[v] = c
            elif (
                eqn.primitive.name == "scan"
                and (unrolled := self._unrolled_scan(eqn, invals, in_chains)) is not None
            ):
                outs = unrolled
            elif _alias_ok(eqn):
                (c,) = in_chains
                assert c is not None
                outs = [bind(eqn.primitive, invals, eqn.params)]
                chains[eqn.outvars[0]] = Chain(c.leaf, (*c.ops, (eqn.primitive, eqn.params)))
            else:
                operands: list[tuple[str, Any]] = []
                captured = []
                for v, c, x in zip(eqn.invars, in_chains, invals):
                    if c is not None:
                        operands.append(("chain", c))
                    elif isinstance(v, jcore.Literal):
                        operands.append(("const", x))
                    else:
                        operands.append(("capture", len(captured)))
                        captured.append(x)
                avals = [v.aval for v in eqn.outvars]
                site = Site(
                    eqn.primitive,
                    eqn.params,
                    operands,
                    [v.aval for v in eqn.invars],
                    avals,
                    [i for i, a in enumerate(avals) if _is_float(a)],
                    eqn.primitive.multiple_results,
                )
                outs = Site.apply(site, invals)
                outs = self._site(site, outs, captured)
            for v, x in zip(eqn.outvars, outs):
                env[v] = x
        out_chains = [chain_of(v) for v in jaxpr.outvars]
        return [read(v) for v in jaxpr.outvars], out_chains

    def _unrolled_scan(
        self, eqn: Any, invals: Sequence[Any], in_chains: Sequence[Chain | None]
    ) -> list[Any] | None:
        """A ``scan`` that reads parameters as constants (an RNN's weights), evaluated
        step after step, each step's uses sites of their own; None (the scan is then
        a site) when a parameter enters as a carry or input, or leaves the body as
        itself, or the scan is longer than ``_MAX_UNROLL``."""
        params = eqn.params
        n_consts, n_carry, length = params["num_consts"], params["num_carry"], params["length"]
        body = params["jaxpr"]
        if not 0 < length <= _MAX_UNROLL or any(c is not None for c in in_chains[n_consts:]):
            return None
        chains = {v: c for v, c in zip(body.jaxpr.invars, in_chains[:n_consts]) if c is not None}
        consts, carry, xs = (
            list(invals[:n_consts]),
            list(invals[n_consts : n_consts + n_carry]),
            list(invals[n_consts + n_carry :]),
        )

        def step(values: list[Any], run: Interpreter) -> tuple[list[Any], list[Chain | None]]:
            return run._eval(body.jaxpr, body.consts, values, dict(chains))

        first = [*consts, *carry, *(x[0] for x in xs)]
        shapes = [jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)) for v in first]
        out_chains: list[Chain | None] = []

        def dry_run(*values: Any) -> int:  # abstract, with no probes: no site is recorded
            out_chains.extend(step(list(values), Interpreter())[1])
            return 0

        jax.eval_shape(dry_run, *shapes)
        if any(c is not None for c in out_chains):  # a parameter leaves the body as itself
            return None
        ys = []
        for t in range(length - 1, -1, -1) if params["reverse"] else range(length):
            outs = step([*consts, *carry, *(x[t] for x in xs)], self)[0]
            carry, y = outs[:n_carry], outs[n_carry:]
            ys.append(y)
        if params["reverse"]:
            ys.reverse()
        return [*carry, *(jnp.stack(column) for column in zip(*ys))] if ys[0] else carry

    def _site(self, site: Site, outs: list[Any], captured: Sequence[Any] = ()) -> list[Any]:
        site.first_capture = len(self.captures)
        self.captures.extend(captured)
        self.sites.append(site)
        outs = list(outs)
        if self.probes is not None:
            for i in site.probed:
                outs[i] = outs[i] + self.probes[self._next_probe]
                self._next_probe += 1
        return outs


def probe_avals(sites: Sequence[Site]) -> list[Any]:
    """The shape and dtype of every probe, site after site."""
    return [site.out_avals[i] for site in sites for i in site.probed]


def trace(
    fn: Any, leaves: Sequence[Any], example: Sequence[Any]
) -> tuple[Any, list[Site], list[Any]]:
    """The closed jaxpr of ``fn(leaves, example) -> loss``, its sites and the
    shapes of the captures (per example)."""
    spec = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in (*leaves, *example)]
    closed = jax.make_jaxpr(lambda *xs: fn(xs[: len(leaves)], xs[len(leaves) :]))(*spec)
    found = Interpreter()

    def discover(*xs: Any) -> Any:
        return found.run(closed, xs[: len(leaves)], xs[len(leaves) :])[0], found.captures

    capture_shapes = jax.eval_shape(discover, *spec)[1]
    return closed, found.sites, capture_shapes
