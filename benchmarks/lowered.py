"""What each clipper's training step asks of an accelerator, read from its lowered program.

For every public clipper in a jitted AdamW step (and its Optax counterpart), the
step is lowered on this machine for other platforms (``lowering_platforms``; no
accelerator needed) and its StableHLO is searched for what can cost on a GPU or
TPU besides arithmetic:

- conditionals (``stablehlo.if``/``case``): on a GPU XLA may copy each branch
  predicate to the host, so one evaluated every step can stall the pipeline;
- loops (``stablehlo.while``);
- custom calls (``stablehlo.custom_call``), by target;
- host transfers: send, recv, infeed, outfeed and host callbacks.

Each is counted twice: on the path every step runs (outside any branch or loop
body) and inside branches and loops (run only when taken). Calls into private
functions are followed. Writes ``results/lowered.json`` and ``results/lowered.md``;
``tests/test_perf_contracts.py`` fails when a count grows past the recorded one.

Usage: ``python benchmarks/lowered.py [--platforms cuda,tpu] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
from collections import Counter
from inspect import signature
from typing import Any

import jax
import jax.numpy as jnp
import optax
from cases import GUARDS, MAX_NORM, STEP_CLIPPERS, optimizer
from common import transformer_tree

import jaxclip

KINDS = ("conditionals", "loops", "custom_calls", "host_transfers")
_CONDITIONAL = re.compile(r'"?stablehlo\.(if|case)"?[ (]')
_LOOP = re.compile(r'"?stablehlo\.while"?[ (]')
_CUSTOM = re.compile(r'stablehlo\.custom_call"?\s*@?([\w.]*)')
_TARGET = re.compile(r'call_target_name\s*=\s*"([^"]+)"')
_TRANSFER = re.compile(r'"?stablehlo\.(send|recv|infeed|outfeed)"?[ (]')
_CALL = re.compile(r"\bcall @([\w.$-]+)\(")
_FUNC = re.compile(r"func\.func (?:public |private )?@([\w.$-]+)")


def _region_opener(line: str) -> bool:
    return bool(_CONDITIONAL.search(line) or _LOOP.search(line))


def census(text: str) -> dict[str, dict[str, Any]]:
    """Counts in a StableHLO module's text, per kind: ``every_step`` (outside any
    branch or loop body, calls followed from ``main``), ``in_branches`` and, for
    custom calls and host transfers, the targets seen."""
    functions: dict[str, list[tuple[str, str, int]]] = {}
    current: list[tuple[str, str, int]] = []
    # per open conditional or loop: the indentation of its line
    open_regions: list[int] = []
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        stripped = line.strip()
        func = _FUNC.search(line)
        if func:
            current = functions.setdefault(func.group(1), [])
            open_regions = []
            continue
        closing = stripped.startswith("}") and not stripped.startswith(("}, {", "} do {"))
        if open_regions and closing and indent <= open_regions[-1]:
            open_regions.pop()
        depth = len(open_regions)
        if _CONDITIONAL.search(line):
            current.append(("conditionals", "", depth))
        elif _LOOP.search(line):
            current.append(("loops", "", depth))
        custom = _CUSTOM.search(line)
        if custom:
            named = _TARGET.search(line)
            target = named.group(1) if named else (custom.group(1) or "?")
            kind = "host_transfers" if "callback" in target else "custom_calls"
            current.append((kind, target, depth))
        transfer = _TRANSFER.search(line)
        if transfer:
            current.append(("host_transfers", transfer.group(1), depth))
        for callee in _CALL.findall(line):
            current.append(("call", callee, depth))
        if _region_opener(line):
            open_regions.append(indent)

    totals = {k: {"every_step": 0, "in_branches": 0, "targets": Counter()} for k in KINDS}

    def visit(name: str, nested: bool, seen: tuple[str, ...]) -> None:
        for kind, detail, depth in functions.get(name, []):
            inside = nested or depth > 0
            if kind == "call":
                if detail not in seen:
                    visit(detail, inside, (*seen, detail))
                continue
            totals[kind]["in_branches" if inside else "every_step"] += 1
            if detail:
                totals[kind]["targets"][detail] += 1

    visit("main", False, ("main",))
    return {
        k: {"every_step": v["every_step"], "in_branches": v["in_branches"]}
        | ({"targets": dict(v["targets"])} if v["targets"] else {})
        for k, v in totals.items()
    }


def _per_example_steps() -> dict[str, Any]:
    """DP steps over per-example gradients (leading batch axis), and Optax's."""
    aggregate = optax.contrib.differentially_private_aggregate
    # optax 0.2.6 renamed seed to key
    seed = {"key": jax.random.key(0)} if "key" in signature(aggregate).parameters else {"seed": 0}
    return {
        "jaxclip.per_example_clip": lambda: optax.chain(
            jaxclip.per_example_clip(MAX_NORM), optax.adamw(1e-3)
        ),
        "optax.contrib.differentially_private_aggregate": lambda: optax.chain(
            aggregate(MAX_NORM, 0.0, **seed),
            optax.adamw(1e-3),
        ),
    }


# each jaxclip step and the Optax step it is read against
PEERS = {
    "jaxclip.clip_by_global_norm": "optax.clip_by_global_norm",
    "jaxclip.clip_by_norm": "optax.clip_by_block_rms",
    "jaxclip.clip_by_value": "optax.clip",
    "jaxclip.clip_by_value(statistics='light')": "optax.clip",
    "jaxclip.autoclip": "optax.clip_by_global_norm",
    "jaxclip.zclip": "optax.clip_by_global_norm",
    "jaxclip.quantile_clip": "optax.clip_by_global_norm",
    "jaxclip.adagc": "optax.clip_by_global_norm",
    "jaxclip.adagc(scope='global')": "optax.clip_by_global_norm",
    "jaxclip.agc": "optax.adaptive_grad_clip",
    "jaxclip.per_example_clip": "optax.contrib.differentially_private_aggregate",
    **GUARDS,
}


def step_text(name: str, platform: str) -> str:
    """The StableHLO of one jitted AdamW step with clipper ``name``, lowered for ``platform``."""
    params = transformer_tree(d_model=16, layers=2, vocab=32)
    grads = params
    if name in _per_example_steps():
        tx = _per_example_steps()[name]()
        grads = jax.tree.map(lambda x: jnp.stack([x, -x]), params)
    elif name == "optax.clip_by_block_rms":
        tx = optax.chain(optax.clip_by_block_rms(MAX_NORM), optax.adamw(1e-3))
    else:
        tx = optimizer(name)

    def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    traced = jax.jit(step).trace(params, tx.init(params), grads)
    return traced.lower(lowering_platforms=(platform,)).as_text()


def names() -> list[str]:
    jaxclip_names = [n for n in STEP_CLIPPERS if n.startswith("jaxclip.")]
    jaxclip_names.append("jaxclip.per_example_clip")
    return jaxclip_names + sorted(set(PEERS[n] for n in jaxclip_names))


def measure(platforms: list[str]) -> dict[str, Any]:
    return {
        "jax": jax.__version__,
        "optax": optax.__version__,
        "peers": PEERS,
        "steps": {n: {p: census(step_text(n, p)) for p in platforms} for n in names()},
    }


def render(results: dict[str, Any]) -> str:
    """A Markdown table: per jaxclip step and platform, its counts beside its peer's."""
    platforms = sorted({p for step in results["steps"].values() for p in step})
    steps = results["steps"]
    others = KINDS[1:]
    quiet = all(
        counts[kind]["every_step"] + counts[kind]["in_branches"] == 0
        for per_platform in steps.values()
        for counts in per_platform.values()
        for kind in others
    )

    def cell(counts: dict[str, Any], peer: dict[str, Any]) -> str:
        ours, theirs = counts["conditionals"], peer["conditionals"]
        text = f"{ours['every_step']} ({theirs['every_step']})"
        if ours["in_branches"]:
            text += f", {ours['in_branches']} more inside a branch"
        for kind in [] if quiet else others:
            text += f"; {kind.replace('_', ' ')} {counts[kind]} ({peer[kind]})"
        return text

    lines = [
        "Conditionals evaluated on every step (each a branch predicate a GPU may copy to",
        "the host), the peer's in brackets, in one jitted AdamW step with the clipper.",
        "None of the steps has a loop, a custom call or a host transfer."
        if quiet
        else "Loops, custom calls and host transfers as counted.",
        "",
        "| step | peer | " + " | ".join(platforms) + " |",
        "|" + " --- |" * (2 + len(platforms)),
    ]
    for name, per_platform in steps.items():
        if name.startswith("jaxclip."):
            peer = results["peers"][name]
            cells = [cell(per_platform[p], steps[peer][p]) for p in platforms]
            lines.append(f"| `{name}` | `{peer}` | " + " | ".join(cells) + " |")
    lines += ["", f"jax {results['jax']}, optax {results['optax']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--platforms", default="cuda,tpu")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args()
    results = measure(args.platforms.split(","))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lowered.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "lowered.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
