"""jaxclip on whatever accelerator JAX finds, in one run of a few minutes.

    python benchmarks/accelerator.py [--quick] [--before-rev REV | --before-dir DIR]
                                     [--out benchmarks/results]

Every figure is a ratio of medians taken round after round in the same process
(common.interleaved), against a peer measured beside it:

1. a standalone jitted ``clip_by_global_norm`` against ``optax.clip_by_global_norm``
   and against the bytes-moved floor (a clip reads the gradient twice and writes
   it once: 1.5 times a jitted scaled copy, which reads and writes it once), in
   float32 and bfloat16, on trees from 10 MB to 2 GB as the device memory allows;
2. a jitted AdamW step with each clipper against AdamW alone and against its
   floor (AdamW alone plus one read of the gradient), with ``spike_aware`` and
   ``stable_update`` around the AdamW against the step with the fixed clip;
3. 200 steps dispatched without waiting, then one wait: the time per step with
   jaxclip's clip against Optax's, which exposes a wait on the host in every step;
4. compile time of ``clip_by_global_norm`` on 2000 leaves, and of the per-leaf
   clippers on 500, against their Optax counterparts;
5. per-example clipping against ``optax.per_example_global_norm_clip``.

With ``--before-rev`` (a git revision) or ``--before-dir`` (a folder holding an
earlier ``jaxclip/``, for a machine without the git history) that jaxclip is
measured too, beside the work tree's, in cases 1, 3 and 4. Writes
``accelerator-<device>.json`` and ``.md`` with the device, driver and versions.
``--quick`` runs small trees and few rounds (to check the script on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import subprocess
import tempfile
import time
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import optax
from before_after import import_before
from cases import (
    COMPILED,
    FULL,
    MAX_NORM,
    QUICK,
    STEP_CLIPPERS,
    Tree,
    adamw,
    compile_seconds,
    optimizer,
    per_example_case,
    scaled_copy,
    standalone,
    time_steps,
)
from common import interleaved, leaf_specs, training_run, tree_megabytes

import jaxclip

REPO = pathlib.Path(__file__).resolve().parent.parent
OURS, PEER, BEFORE = "jaxclip", "optax", "jaxclip before"

# name, trees of case 1, rounds of cases 1-2, step tree, pipelined steps, compile leaves
SIZES = {
    "full": (
        [Tree(256, 2, 4096), Tree(768, 5, 2048), Tree(1024, 12, 8192), Tree(2048, 10, 16384)],
        20,
        Tree(768, 5, 2048),
        200,
        (2000, 500),
    ),
    "quick": ([Tree(128, 1, 1024), Tree(256, 1, 8192)], 5, Tree(256, 1, 8192), 20, (100, 50)),
}
# the wrappers of AdamW itself, timed in case 2 against the step with the fixed clip
WRAPPERS = {
    "jaxclip.spike_aware(adamw)": jaxclip.spike_aware,
    "jaxclip.stable_update(adamw)": jaxclip.stable_update,
}
FIXED_CLIP = "jaxclip.clip_by_global_norm"
TARGETS = {
    "standalone / optax": 1.05,
    "standalone / floor": 1.15,
    "step / floor": 1.05,
    "Adam wrapper step / fixed clip": 1.10,
    "pipelined / optax": 1.02,
    "compile / optax": 1.0,
}


def device_info() -> dict[str, Any]:
    device = jax.devices()[0]
    driver = "n/a"
    if device.platform == "gpu":
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            driver = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout
            driver = driver.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            driver = "unknown"
    stats = device.memory_stats() or {}
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "driver": driver,
        "memory_bytes": stats.get("bytes_limit"),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
    }


def fits(spec: Tree, memory: int | None) -> bool:
    """Room for the tree, the clip's output and a copy, twice over."""
    return memory is None or 6 * spec.megabytes() * 1e6 < memory


def standalone_case(trees: list[Tree], rounds: int, libs: dict[str, Any]) -> list[dict]:
    rows = []
    memory = device_info()["memory_bytes"]
    for spec in trees:
        for dtype in ("float32", "bfloat16"):
            spec = dataclasses.replace(spec, dtype=dtype)
            if not fits(spec, memory if jax.devices()[0].platform != "cpu" else None):
                continue
            tree = spec.build()
            one = jnp.ones((), jnp.float32)
            fns = {
                name: standalone(lib.clip_by_global_norm(MAX_NORM), tree)
                for name, lib in libs.items()
            }
            fns[PEER] = standalone(optax.clip_by_global_norm(MAX_NORM), tree)
            fns["copy"] = lambda f=jax.jit(scaled_copy), t=tree, one=one: f(t, one)
            times = interleaved(fns, rounds=rounds)
            med = {k: v["median_ms"] for k, v in times.items()}
            floor = 1.5 * med["copy"]
            rows.append(
                {
                    "label": f"{tree_megabytes(tree):,.0f} MB {dtype}",
                    "leaves": len(jax.tree.leaves(tree)),
                    "median_ms": med,
                    "floor_ms": floor,
                    "over_optax": {k: med[k] / med[PEER] for k in libs},
                    "over_floor": {k: med[k] / floor for k in [*libs, PEER]},
                }
            )
            print(f"[standalone] {rows[-1]['label']}: {rows[-1]['over_optax']}", flush=True)
            del tree, fns
    return rows


def step_case(spec: Tree, rounds: int) -> dict[str, Any]:
    params, grads = spec.build(seed=0), spec.build(seed=1)
    runs = {name: training_run(optimizer(name), params, grads) for name in STEP_CLIPPERS}
    runs |= {name: training_run(wrap(adamw()), params, grads) for name, wrap in WRAPPERS.items()}
    steps = time_steps(runs, grads, rounds)
    fixed = steps["times"][FIXED_CLIP]["median_ms"]
    for t in steps["times"].values():
        t.pop("samples_ms", None)
        t["over_fixed_clip"] = t["median_ms"] / fixed
    print(f"[step] {spec.megabytes():,.0f} MB: {len(runs)} steps", flush=True)
    return {"label": f"{spec.megabytes():,.0f} MB {spec.dtype}", **steps}


def pipelined_case(spec: Tree, n_steps: int, libs: dict[str, Any]) -> dict[str, Any]:
    """Per-step time of ``n_steps`` steps dispatched back to back, then one wait."""
    params, grads = spec.build(seed=0), spec.build(seed=1)
    txs = {name: lib.clip_by_global_norm(MAX_NORM) for name, lib in libs.items()}
    txs[PEER] = optax.clip_by_global_norm(MAX_NORM)
    runs = {
        name: training_run(optax.chain(tx, optax.adamw(1e-3)), params, grads)
        for name, tx in txs.items()
    }

    def burst(run: Any) -> Any:
        return lambda: [run() for _ in range(n_steps)][-1]

    times = interleaved({name: burst(run) for name, run in runs.items()}, rounds=5, warmup=1)
    per_step = {name: t["median_ms"] / n_steps for name, t in times.items()}
    print(f"[pipelined] {per_step}", flush=True)
    return {
        "steps": n_steps,
        "per_step_ms": per_step,
        "over_optax": {k: per_step[k] / per_step[PEER] for k in libs},
    }


def compile_case(leaves: tuple[int, int], libs: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for clipper, (make, peer, peer_name) in COMPILED.items():
        n = leaves[0] if clipper == "clip_by_global_norm" else leaves[1]
        specs = leaf_specs(n, "float32")
        seconds = {name: compile_seconds(make(lib), specs)["total_s"] for name, lib in libs.items()}
        seconds[PEER] = compile_seconds(peer(), specs)["total_s"]
        rows.append(
            {
                "clipper": clipper,
                "peer": peer_name,
                "leaves": n,
                "seconds": seconds,
                "over_optax": {k: seconds[k] / seconds[PEER] for k in libs},
            }
        )
        print(f"[compile] {clipper}, {n} leaves: {seconds}", flush=True)
    return rows


def fmt(x: float) -> str:
    return f"{x:.2f}x"


def markdown(r: dict[str, Any]) -> str:
    d = r["device"]
    lines = [
        f"# jaxclip on {d['device_kind']} ({d['platform']})",
        "",
        f"Driver {d['driver']}; jax {d['jax']}, jaxlib {d['jaxlib']}, optax {d['optax']}.",
        f"Targets: {', '.join(f'{k} at most {v:.2f}x' for k, v in TARGETS.items())}.",
        "",
        "## Standalone clip_by_global_norm",
        "",
        "| tree | leaves | "
        + " | ".join(f"{k} / optax" for k in r["libs"])
        + " | "
        + " | ".join(f"{k} / floor" for k in [*r["libs"], PEER])
        + " |",
        "|" + " --- |" * (2 + 2 * len(r["libs"]) + 1),
    ]
    for row in r["standalone"]:
        cells = [fmt(row["over_optax"][k]) for k in r["libs"]]
        cells += [fmt(row["over_floor"][k]) for k in [*r["libs"], PEER]]
        lines.append(f"| {row['label']} | {row['leaves']} | " + " | ".join(cells) + " |")
    step = r["step"]
    lines += [
        "",
        f"## AdamW step ({step['label']})",
        "",
        "| step | ms | / AdamW alone | / floor | / fixed clip |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, t in step["times"].items():
        ratios = " | ".join(fmt(t[k]) for k in ("over_adamw", "over_floor", "over_fixed_clip"))
        lines.append(f"| {name} | {t['median_ms']:.3f} | {ratios} |")
    p = r["pipelined"]
    lines += ["", f"## {p['steps']} steps dispatched, then one wait", ""]
    lines += [f"- {k}: {v:.3f} ms per step" for k, v in p["per_step_ms"].items()]
    lines += [f"- {k} / optax: {fmt(v)}" for k, v in p["over_optax"].items()]
    lines += [
        "",
        "## Compile",
        "",
        "| clipper | leaves | peer | seconds | / peer |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in r["compile"]:
        secs = ", ".join(f"{k} {v:.1f}" for k, v in row["seconds"].items())
        ratio = ", ".join(f"{k} {fmt(v)}" for k, v in row["over_optax"].items())
        lines.append(f"| {row['clipper']} | {row['leaves']} | {row['peer']} | {secs} | {ratio} |")
    e = r["per_example"]
    lines += [
        "",
        f"## Per-example clipping (batch {e['batch']}, {e['parameters']:,} parameters)",
        "",
        f"jaxclip.clip_and_sum / optax.per_example_global_norm_clip: {fmt(e['jaxclip_over_optax'])}"
        f" (results agree: {e['results_agree']}).",
        "",
        f"Run took {r['seconds']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small trees, few rounds")
    parser.add_argument("--before-rev", help="an earlier git revision to measure beside")
    parser.add_argument("--before-dir", help="a folder holding an earlier jaxclip/")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    started = time.perf_counter()
    trees, rounds, step_tree, n_steps, leaves = SIZES["quick" if args.quick else "full"]
    libs: dict[str, ModuleType] = {OURS: jaxclip}
    if args.before_rev or args.before_dir:
        folder = pathlib.Path(tempfile.mkdtemp())
        source = pathlib.Path(args.before_dir) if args.before_dir else None
        libs[BEFORE] = import_before(REPO, args.before_rev or "", folder, source)
    plan = QUICK if args.quick else dataclasses.replace(FULL, batch=128, example_rounds=10)
    results = {
        "device": device_info(),
        "libs": list(libs),
        "before": args.before_rev or args.before_dir,
        "standalone": standalone_case(trees, rounds, libs),
        "step": step_case(step_tree, 2 * rounds),
        "pipelined": pipelined_case(step_tree, n_steps, libs),
        "compile": compile_case(leaves, libs),
        "per_example": per_example_case(plan),
    }
    results["per_example"]["times"] = {
        k: {"median_ms": v["median_ms"]} for k, v in results["per_example"]["times"].items()
    }
    results["seconds"] = time.perf_counter() - started
    kind = re.sub(r"[^A-Za-z0-9]+", "-", results["device"]["device_kind"]).strip("-").lower()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"accelerator-{kind}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"accelerator-{kind}.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out / f'accelerator-{kind}.md'}")


if __name__ == "__main__":
    main()
