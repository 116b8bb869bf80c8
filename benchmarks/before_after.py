"""jaxclip at an earlier git revision against the work tree, in one process.

    python benchmarks/before_after.py [--rev HEAD] [--quick] [--cases a,b,c,d,e]
                                      [--out benchmarks/results] [--render]

The revision's ``jaxclip/`` (``git archive``) is unpacked into a temporary folder
as ``jaxclip_before``, its imports of jaxclip rewritten to that name, so that both
versions import side by side. Each case times "before", "after" (the jaxclip that
``import jaxclip`` finds: the work tree) and a peer round after round in the same
process (common.interleaved) and reports medians; it reuses the suite's trees,
contenders and timing helpers (cases.py):

a. a standalone jitted ``clip_by_global_norm(1.0)`` update on the suite's trees
   under 300 MB (the 2000-leaf tree among them), against Optax's;
b. ``clip_by_global_norm`` in a jitted AdamW step on the suite's step tree and on
   the 2000-leaf tree, against AdamW alone, the floor (AdamW alone plus one read of
   the gradient) and the same step with Optax's clip;
c. compile time (lowering and compiling a fresh jit, median of 3) of
   ``clip_by_global_norm``, ``clip_by_norm`` and ``agc`` on 2000 leaves, against
   the suite's Optax counterparts;
d. run time of ``clip_by_norm`` and ``agc`` on the 2000-leaf tree, against the same
   counterparts;
e. the adaptive clippers in the AdamW step against the step with
   ``clip_by_global_norm``, each revision against its own.

Writes ``before_after.json`` (the machine, the versions, the revision and every
sample) and ``before_after.md``. ``--quick`` runs small trees and few rounds to
check that it works; ``--render`` rewrites the markdown from the JSON.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import jax
import numpy as np
import optax
from cases import (
    ALONE,
    COMPILED,
    FULL,
    QUICK,
    STEP_CLIPPERS,
    UNIT_CLIPPERS,
    Plan,
    Tree,
    adamw,
    compile_seconds,
    free,
    machine_info,
    standalone,
    time_steps,
)
from common import interleaved, leaf_specs, training_run, tree_megabytes
from report import fmt_x, load_note, table, where

import jaxclip

REPO = pathlib.Path(__file__).resolve().parent.parent
CASES = "abcde"
BEFORE, AFTER, OPTAX = "before", "after", "optax"
FIXED = "clip_by_global_norm"
ADAPTIVE = ("zclip", "autoclip", "quantile_clip", "adagc")


@dataclass(frozen=True)
class Settings:
    plan: Plan  # the suite's: rounds per tree, the step tree and its rounds
    trees: tuple[Tree, ...]  # case a
    many: Tree  # cases b and d: many small leaves, where what each leaf costs shows
    compile_leaves: int  # case c
    compile_rounds: int


FULL_SETTINGS = Settings(
    plan=FULL,
    # not the trees over 300 MB: each adds minutes of building and timing, through the
    # same code as the 148 MB tree
    trees=tuple(t for t in FULL.clip_trees if t.megabytes() < 300),
    many=max(FULL.clip_trees, key=lambda t: t.layers),  # 9 leaves per layer: the most leaves
    compile_leaves=max(FULL.compile_leaves),
    compile_rounds=3,
)
# compiling dominates a quick run: few leaves, one round
QUICK_SETTINGS = Settings(
    plan=QUICK, trees=QUICK.clip_trees, many=Tree(128, 7, 1000), compile_leaves=65, compile_rounds=1
)


# ---------------------------------------------------------------------------
# The earlier revision, importable as jaxclip_before

# ``import jaxclip`` keeps its name for the code that uses it; every other import
# of jaxclip or of one of its modules names jaxclip_before instead.
IMPORTS = (
    (
        re.compile(r"^(\s*)import jaxclip(\s*(?:#.*)?)$", re.M),
        r"\1import jaxclip_before as jaxclip\2",
    ),
    (re.compile(r"^(\s*)(from|import) jaxclip\b", re.M), r"\1\2 jaxclip_before"),
)


def git(repo: pathlib.Path, *args: str) -> bytes:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True)
    if proc.returncode:
        sys.exit(f"git {' '.join(args)}: {proc.stderr.decode().strip()}")
    return proc.stdout


def git_text(repo: pathlib.Path, *args: str) -> str:
    # rstrip, not strip: a line of ``git status --porcelain`` can start with a space
    return git(repo, *args).decode().rstrip("\n")


def import_before(
    repo: pathlib.Path, rev: str, folder: pathlib.Path, source: pathlib.Path | None = None
) -> ModuleType:
    """jaxclip as it was at ``rev``, unpacked into ``folder`` as jaxclip_before; or,
    where there is no git history, the ``jaxclip/`` found in the folder ``source``."""
    if source is not None:
        shutil.copytree(source / "jaxclip", folder / "jaxclip")
    else:
        archive = git(repo, "archive", rev, "jaxclip")
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            # the "data" filter refuses links and paths out of the folder, where Python has it
            filters = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(folder, **filters)
    package = folder / "jaxclip_before"
    (folder / "jaxclip").rename(package)
    for path in package.rglob("*.py"):
        text = path.read_text()
        for pattern, replacement in IMPORTS:
            text = pattern.sub(replacement, text)
        path.write_text(text)
    sys.path.insert(0, str(folder))
    import jaxclip_before

    # a module of the earlier revision that reached the work tree's would mix the two
    for name, module in list(sys.modules.items()):
        if name.startswith("jaxclip_before"):
            for value in vars(module).values():
                if isinstance(value, ModuleType) and value.__name__.split(".")[0] == "jaxclip":
                    raise RuntimeError(f"{name} imports {value.__name__} of the work tree")
    return jaxclip_before


def revisions(repo: pathlib.Path, rev: str, before: ModuleType) -> dict[str, Any]:
    changed = git_text(repo, "status", "--porcelain", "--", "jaxclip").splitlines()
    path = pathlib.Path(jaxclip.__file__).resolve().parent
    return {
        BEFORE: {
            "rev": rev,
            "commit": git_text(repo, "rev-parse", rev + "^{commit}"),
            "short": git_text(repo, "rev-parse", "--short", rev + "^{commit}"),
            "subject": git_text(repo, "log", "-1", "--format=%s", rev),
            "committed": git_text(repo, "log", "-1", "--format=%cI", rev),
            "version": before.__version__,
        },
        AFTER: {
            "head": git_text(repo, "rev-parse", "--short", "HEAD"),
            "uncommitted": [line[3:] for line in changed],
            "path": str(path),
            # False where PYTHONPATH or an installed copy put another jaxclip first
            "work_tree": path == (repo / "jaxclip").resolve(),
            "version": jaxclip.__version__,
        },
    }


# ---------------------------------------------------------------------------
# The cases; each returns plain data

RATIOS = ((BEFORE, OPTAX), (AFTER, OPTAX), (AFTER, BEFORE))


def ratios(medians: dict[str, float]) -> dict[str, float]:
    """before / peer, after / peer and after / before, from each side's median."""
    return {f"{a} / {b}": medians[a] / medians[b] for a, b in RATIOS}


def described(spec: Tree, tree: Any) -> dict[str, Any]:
    mb = tree_megabytes(tree)
    leaves = len(jax.tree.leaves(tree))
    return {"label": f"{mb:,.0f} MB {spec.dtype}", "megabytes": mb, "leaves": leaves}


def standalone_clip(s: Settings, libs: dict[str, ModuleType]) -> list[dict[str, Any]]:
    make, peer, _ = COMPILED[FIXED]
    rows = []
    for spec in s.trees:
        tree = spec.build()
        row = described(spec, tree)
        print(f"[a] clip_by_global_norm, {row['label']}, {row['leaves']} leaves", flush=True)
        fns = {side: standalone(make(lib), tree) for side, lib in libs.items()}
        fns[OPTAX] = standalone(peer(), tree)
        rounds = s.plan.rounds_for(spec)
        times = interleaved(fns, rounds=rounds, keep_samples=True)
        medians = {name: t["median_ms"] for name, t in times.items()}
        rows.append({**row, "rounds": rounds, "times": times, "ratios": ratios(medians)})
        del tree, fns
        free()
    return rows


def in_step(s: Settings, libs: dict[str, ModuleType]) -> list[dict[str, Any]]:
    make = STEP_CLIPPERS["jaxclip.clip_by_global_norm"][0]
    peer = STEP_CLIPPERS["optax.clip_by_global_norm"][0]
    rows = []
    for spec in (s.plan.step_tree, s.many):
        params, grads = spec.build(seed=0), spec.build(seed=1)
        row = described(spec, grads)
        print(f"[b] clip_by_global_norm in an AdamW step, {row['label']}", flush=True)
        txs = {ALONE: adamw()}
        txs.update({side: optax.chain(make(lib), adamw()) for side, lib in libs.items()})
        txs[OPTAX] = optax.chain(peer(), adamw())
        runs = {name: training_run(tx, params, grads) for name, tx in txs.items()}
        steps = time_steps(runs, grads, s.plan.step_rounds)
        medians = {name: steps["times"][name]["median_ms"] for name in (BEFORE, AFTER, OPTAX)}
        rows.append({**row, "rounds": s.plan.step_rounds, **steps, "ratios": ratios(medians)})
        del params, grads, runs
        free()
    return rows


def compile_times(s: Settings, libs: dict[str, ModuleType]) -> list[dict[str, Any]]:
    n = s.compile_leaves
    specs = leaf_specs(n, "float32")
    shuffle = np.random.default_rng(0).shuffle
    rows = []
    for clipper, (make, peer, peer_name) in COMPILED.items():
        print(f"[c] compile {clipper}, {n} leaves, {s.compile_rounds} rounds", flush=True)
        factories = {side: functools.partial(make, lib) for side, lib in libs.items()}
        factories[OPTAX] = peer
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in factories}
        order = list(factories)
        for _ in range(s.compile_rounds):  # round after round, as interleaved() times runs
            shuffle(order)
            for name in order:
                free()  # else JAX reuses what it traced and compiled the round before
                samples[name].append(compile_seconds(factories[name](), specs))
        times = {
            name: {key: statistics.median(x[key] for x in runs) for key in runs[0]}
            | {"samples": runs}
            for name, runs in samples.items()
        }
        medians = {name: t["total_s"] for name, t in times.items()}
        rows.append(
            {"clipper": clipper, "leaves": n, "peer": peer_name, "times": times}
            | {"ratios": ratios(medians)}
        )
    return rows


def per_leaf(s: Settings, libs: dict[str, ModuleType]) -> dict[str, Any]:
    params, grads = s.many.build(seed=0), s.many.build(seed=1)
    row = described(s.many, grads)
    print(f"[d] clip_by_norm and agc, {row['label']}, {row['leaves']} leaves", flush=True)
    fns, peers = {}, {}
    for clipper in UNIT_CLIPPERS:
        make, peer, peers[clipper] = COMPILED[clipper]
        for side, lib in libs.items():
            fns[f"{clipper} {side}"] = standalone(make(lib), grads, params)
        fns[f"{clipper} {OPTAX}"] = standalone(peer(), grads, params)
    rounds = s.plan.rounds_for(s.many)
    times = interleaved(fns, rounds=rounds, keep_samples=True)
    per_clipper = {
        clipper: ratios({k: times[f"{clipper} {k}"]["median_ms"] for k in (*libs, OPTAX)})
        for clipper in peers
    }
    return {**row, "rounds": rounds, "peers": peers, "times": times, "ratios": per_clipper}


def adaptive(s: Settings, libs: dict[str, ModuleType]) -> dict[str, Any]:
    spec = s.plan.step_tree
    params, grads = spec.build(seed=0), spec.build(seed=1)
    row = described(spec, grads)
    print(f"[e] adaptive clippers in an AdamW step, {row['label']}", flush=True)
    txs = {ALONE: adamw()}
    for side, lib in libs.items():
        for clipper in (FIXED, *ADAPTIVE):
            make = STEP_CLIPPERS[f"jaxclip.{clipper}"][0]
            txs[f"{clipper} {side}"] = optax.chain(make(lib), adamw())
    runs = {name: training_run(tx, params, grads) for name, tx in txs.items()}
    steps = time_steps(runs, grads, s.plan.step_rounds)
    med = {name: t["median_ms"] for name, t in steps["times"].items()}
    over_fixed = {
        side: {c: med[f"{c} {side}"] / med[f"{FIXED} {side}"] for c in ADAPTIVE} for side in libs
    }
    return {**row, "rounds": s.plan.step_rounds, **steps, "over_fixed_clip": over_fixed}


RUNS = {"a": standalone_clip, "b": in_step, "c": compile_times, "d": per_leaf, "e": adaptive}


# ---------------------------------------------------------------------------
# The report


def ms(t: dict[str, Any]) -> str:
    return f"{t['median_ms']:.2f}"


def compared(
    head: list[str], medians: list[float], rs: dict[str, float], unit: str = ""
) -> list[str]:
    """A table row: ``head``, the medians of before, after and the peer, their ratios."""
    return [*head, *(f"{x:.2f}{unit}" for x in medians), *(fmt_x(r) for r in rs.values())]


RATIO_COLUMNS = ["before / peer", "after / peer", "after / before"]


def markdown(r: dict[str, Any]) -> str:
    m, before, after = r["machine"], r["revisions"][BEFORE], r["revisions"][AFTER]
    changed = ", ".join(after["uncommitted"])
    subject = before["subject"]
    if after.get("work_tree", True):
        what = f"the work tree ({after['head']}"
        what += f", with uncommitted changes to {changed})" if changed else ")"
    else:
        what = f"jaxclip from {after['path']}"
    lines = [
        f"Measured on {where(m)}, JAX {m['jax']}, Optax {m['optax']}, on {m['date'][:10]}, "
        f"with `{m['command']}`.",
        "",
        f"Before: `{before['rev']}` ({before['short']}, {before['committed'][:10]}: "
        f"{subject if len(subject) < 100 else subject[:99] + '…'}). After: {what}.",
        "",
        "Times are medians of interleaved rounds in one process, in milliseconds; "
        "the peer is Optax's counterpart." + load_note(m),
    ]
    c = r["cases"]
    sides = (BEFORE, AFTER, OPTAX)
    if "a" in c:
        lines += ["", "### a. Standalone clip_by_global_norm", ""]
        lines += ["One jitted update (max_norm 1, always clipping), its input not donated.", ""]
        rows = [
            compared(
                [x["label"], str(x["leaves"])],
                [x["times"][k]["median_ms"] for k in sides],
                x["ratios"],
            )
            for x in c["a"]
        ]
        header = ["tree", "leaves", "before ms", "after ms", "Optax ms", *RATIO_COLUMNS]
        lines += table(header, rows)
    if "b" in c:
        lines += ["", "### b. clip_by_global_norm in a jitted AdamW step", ""]
        lines += [
            "`optax.chain(clip, optax.adamw(1e-3))`, parameters and optimizer state donated. "
            "A global-norm clip must read the whole gradient before its first update, so "
            "its floor in the step is AdamW alone plus one read of the gradient (its plain "
            "jitted norm, timed in the same rounds).",
            "",
        ]
        rows = []
        for x in c["b"]:
            t, r = x["times"], x["ratios"]
            tree = f"{x['label']}, {x['leaves']} leaves"
            floor = x["floor_over_adamw"]
            floor_ms = t[ALONE]["median_ms"] * floor
            rows.append([tree, ALONE, ms(t[ALONE]), "1.00x", fmt_x(1 / floor), "", ""])
            rows.append(
                [tree, "AdamW + one read", f"{floor_ms:.2f}", fmt_x(floor), "1.00x", "", ""]
            )
            for k, vs_peer, vs_before in (
                (BEFORE, r["before / optax"], ""),
                (AFTER, r["after / optax"], fmt_x(r["after / before"])),
                (OPTAX, 1.0, ""),
            ):
                row = [ms(t[k]), fmt_x(t[k]["over_adamw"]), fmt_x(t[k]["over_floor"])]
                rows.append([tree, f"{k} clip", *row, fmt_x(vs_peer), vs_before])
        header = ["tree", "step", "ms", "vs AdamW alone", "vs AdamW + one read"]
        lines += table([*header, "vs Optax's clip", "vs before"], rows)
    if "c" in c:
        lines += ["", "### c. Compile time", ""]
        lines += [
            "Lowering plus compiling one jitted update in seconds, a fresh jit after "
            "`jax.clear_caches()` each time, in this process (the suite compiles each in a "
            "fresh process); leaves shaped like a transformer's (d_model 128).",
            "",
        ]
        rows = [
            compared(
                [x["clipper"], str(x["leaves"]), f"`{x['peer']}`"],
                [x["times"][k]["total_s"] for k in sides],
                x["ratios"],
                " s",
            )
            for x in c["c"]
        ]
        header = ["clipper", "leaves", "peer", "before", "after", "peer", *RATIO_COLUMNS]
        lines += table(header, rows)
    if "d" in c:
        x = c["d"]
        lines += ["", f"### d. Per-leaf and per-unit clips, {x['label']}, {x['leaves']} leaves"]
        lines += ["", "One jitted update, its input not donated; agc reads the parameters.", ""]
        rows = [
            compared(
                [clipper, f"`{peer}`"],
                [x["times"][f"{clipper} {k}"]["median_ms"] for k in sides],
                x["ratios"][clipper],
            )
            for clipper, peer in x["peers"].items()
        ]
        header = ["clipper", "peer", "before ms", "after ms", "peer ms", *RATIO_COLUMNS]
        lines += table(header, rows)
    if "e" in c:
        x = c["e"]
        t = {name: t["median_ms"] for name, t in x["times"].items()}
        lines += ["", f"### e. Adaptive clippers in the AdamW step, {x['label']}", ""]
        lines += [
            f"Each step over the same revision's step with {FIXED} (before "
            f"{t[f'{FIXED} {BEFORE}']:.2f} ms, after {t[f'{FIXED} {AFTER}']:.2f} ms; "
            f"AdamW alone {t[ALONE]:.2f} ms).",
            "",
        ]
        rows = [
            [name, f"{t[f'{name} {BEFORE}']:.2f}", f"{t[f'{name} {AFTER}']:.2f}"]
            + [fmt_x(x["over_fixed_clip"][side][name]) for side in (BEFORE, AFTER)]
            + [fmt_x(t[f"{name} {AFTER}"] / t[f"{name} {BEFORE}"])]
            for name in ADAPTIVE
        ]
        header = ["clipper", "before ms", "after ms", f"before / its {FIXED}"]
        lines += table([*header, f"after / its {FIXED}", "after / before"], rows)
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], out: pathlib.Path) -> None:
    text = markdown(results)
    (out / "before_after.md").write_text(text)
    print(text)
    print(f"wrote {out / 'before_after.md'}")


# ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rev", default="HEAD", help="the earlier revision (default HEAD)")
    parser.add_argument("--repo", default=str(REPO), help="the git repository holding it")
    parser.add_argument("--quick", action="store_true", help="small trees, few rounds")
    parser.add_argument("--cases", default=",".join(CASES), help="which cases, e.g. a,c")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument(
        "--render", action="store_true", help="only rewrite before_after.md from its JSON"
    )
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    if args.render:
        write_report(json.loads((out / "before_after.json").read_text()), out)
        return
    chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(chosen) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {','.join(CASES)}")

    settings = QUICK_SETTINGS if args.quick else FULL_SETTINGS
    command = "python benchmarks/before_after.py " + " ".join(sys.argv[1:])
    machine = machine_info(None, command.strip(), None)
    for key in ("torch", "torch_device", "torch_threads", "omp_wait_policy"):
        machine.pop(key)
    repo = pathlib.Path(args.repo)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="jaxclip_before_") as folder:
        before = import_before(repo, args.rev, pathlib.Path(folder))
        results: dict[str, Any] = {
            "machine": machine,
            "quick": args.quick,
            "revisions": revisions(repo, args.rev, before),
        }
        print(json.dumps(results, indent=1), flush=True)
        libs = {BEFORE: before, AFTER: jaxclip}
        seconds: dict[str, float] = {}
        results["seconds"], results["cases"] = seconds, {}
        for case in chosen:
            start = time.perf_counter()
            results["cases"][case] = RUNS[case](settings, libs)
            free()
            seconds[case] = time.perf_counter() - start
            # after every case: a run stopped later keeps what it measured (see --render)
            if hasattr(os, "getloadavg"):
                machine["load_average_at_end"] = os.getloadavg()[0]
            (out / "before_after.json").write_text(json.dumps(results, indent=1))
    write_report(results, out)
    print(", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
