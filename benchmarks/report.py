"""The suite's report: suite.md (the tables, each target marked met or missed) and
time_vs_size.png from the results of cases.py, as suite.json holds them.

``python benchmarks/suite.py --render`` rewrites both from an existing suite.json.
"""

from __future__ import annotations

import pathlib
from typing import Any

from cases import (
    COMPILED,
    GUARDS,
    NOT_INSTALLED,
    UNIT_CLIPPERS,
    VALUE_BOUND,
    VALUE_CLIPPERS,
    ratio,
)

# The targets (see benchmarks/README.md): upper bounds on time ratios, except "torch",
# a lower bound on PyTorch's time over jaxclip's.
LIMITS = {
    "optax": 1.05,  # standalone clip / Optax's
    "copy": 1.6,  # standalone clip / the copy floor
    "adamw": 1.10,  # AdamW step with a fixed jaxclip clipper / AdamW alone
    "adaptive": 1.05,  # step with an adaptive clipper / step with clip_by_global_norm
    "torch": 2.5,  # PyTorch clip_grad_norm_(foreach=True) / jaxclip
    "compile": 1.0,  # compile time with 2000 leaves / Optax's
    "norm": 1.03,  # jaxclip.global_norm / a naive norm
}


def compiled_clipper(row: dict[str, Any]) -> str:
    # results written before the per-leaf rows were added hold the global clip alone
    return row.get("clipper", "clip_by_global_norm")


# ---------------------------------------------------------------------------
# Targets and the markdown report


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target, judged on its worst measured case."""
    clips = results["clip"]
    steps = results["step"]["times"]
    rows = []

    def add(target: str, key: str, value: float | None, text: str) -> None:
        at_least = key == "torch"
        met = (
            None if value is None else (value >= LIMITS[key] if at_least else value <= LIMITS[key])
        )
        rows.append({"target": target, "value": value, "measured": text, "met": met})

    def worst_clip(field: str, target: str, key: str) -> None:
        measured = [c for c in clips if c[field] is not None]
        if not measured:
            add(target, key, None, f"PyTorch {NOT_INSTALLED}")
            return
        pick = min if key == "torch" else max
        c = pick(measured, key=lambda c: c[field])
        add(target, key, c[field], f"{c[field]:.2f}x (worst: {c['label']})")

    worst_clip("jaxclip_over_optax", "standalone clip <= 1.05x Optax", "optax")
    worst_clip("jaxclip_over_copy", "standalone clip <= 1.6x the copy floor", "copy")
    floor = results["step"].get("floor_over_adamw")
    at_floor = "" if floor is None else f"; AdamW alone + one read of the gradient: {floor:.2f}x"
    r = steps["jaxclip.clip_by_global_norm"]["over_adamw"]
    add(
        "clip_by_global_norm in an AdamW step <= 1.10x AdamW alone",
        "adamw",
        r,
        f"{r:.2f}x{at_floor}",
    )
    fixed = [(n, t["over_adamw"]) for n, t in steps.items() if n.startswith("jaxclip.")]
    fixed = [(n, r) for n, r in fixed if not steps[n]["adaptive"]]
    name, r = max(fixed, key=lambda x: x[1])
    add(
        "every fixed clipper in an AdamW step <= 1.10x AdamW alone",
        "adamw",
        r,
        f"{r:.2f}x ({name}{at_floor})",
    )
    adaptive = [(n, t["over_fixed_clip"]) for n, t in steps.items() if t["adaptive"]]
    clippers = [(n, r) for n, r in adaptive if n not in GUARDS]
    name, r = max(clippers, key=lambda x: x[1])
    text = f"{r:.2f}x (worst clipper: {name})"
    for guard, peer in GUARDS.items():
        if guard in steps:
            text += f"; the guard {guard} {steps[guard]['over_fixed_clip']:.2f}x"
            if peer in steps:
                text += f" ({peer} {steps[peer]['over_fixed_clip']:.2f}x)"
    worst = max(r for _, r in adaptive)
    add("adaptive clippers <= 1.05x the fixed clip", "adaptive", worst, text)
    # PyTorch scales in place: judged against the clip with its input donated, also in place
    worst_clip("torch_over_jaxclip_donated", ">= 2.5x faster than PyTorch foreach", "torch")
    if rows[-1]["value"] is not None:
        copying = min(c["torch_over_jaxclip"] for c in clips if c["torch_over_jaxclip"])
        rows[-1]["measured"] += f", in place; {copying:.2f}x with a fresh output"

    def compile_target(target: str, clippers: tuple[str, ...]) -> None:
        compiled = [row for row in results["compile"] if compiled_clipper(row) in clippers]
        if not compiled:
            return
        most = max(row["leaves"] for row in compiled)
        texts, value = [], 0.0
        for row in compiled:
            if row["leaves"] != most:
                continue
            ours, theirs = row["jaxclip"].get("total_s"), row["optax"].get("total_s")
            # an Optax compile stopped at the time limit counts as taking the limit
            theirs = theirs if theirs is not None else row["optax"].get("timeout_s")
            value = (
                None
                if ours is None or theirs is None or value is None
                else max(value, ours / theirs)
            )
            label = row["dtype"] if len(clippers) == 1 else compiled_clipper(row)
            texts.append(f"{label}: {fmt_seconds(row['jaxclip'])} vs {fmt_seconds(row['optax'])}")
        add(target.format(most=most), "compile", value, "; ".join(texts))

    compile_target("compile time with {most} leaves <= Optax", ("clip_by_global_norm",))
    compile_target(
        "per-leaf and per-unit clippers: compile time with {most} leaves <= Optax's",
        UNIT_CLIPPERS,
    )
    worst_clip("robust_over_naive", "robust norm costs nothing measurable (<= 1.03x naive)", "norm")
    return rows


def fmt_seconds(entry: dict[str, Any]) -> str:
    if "total_s" in entry:
        return f"{entry['total_s']:.1f} s"
    if "timeout_s" in entry:
        return f"> {entry['timeout_s']} s (time limit)"
    return f"error: {entry.get('error', '?')}"


def fmt_ms(t: dict[str, Any]) -> str:
    return f"{t['median_ms']:.2f}"


def fmt_x(r: float | None, limit: float | None = None, at_least: bool = False) -> str:
    """A ratio; in bold when it misses ``limit`` (an upper bound, or a lower one)."""
    if r is None:
        return "-"
    missed = limit is not None and (r < limit if at_least else r > limit)
    return f"**{r:.2f}x**" if missed else f"{r:.2f}x"


def mark(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "**missed**")


def load_note(m: dict[str, Any]) -> str:
    """The machine's load (runnable processes, 1-minute average) when it was recorded."""
    start, end = m.get("load_average_at_start"), m.get("load_average_at_end")
    if start is None or end is None:
        return ""
    return (
        f" Load average on the {m['cores']} cores: {start:.1f} at the start, {end:.1f} at the end."
    )


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(row) + " |" for row in rows]


def where(m: dict[str, Any]) -> str:
    """The machine of ``m`` (cases.machine_info) in words: the accelerator, the host."""
    host = f"{m['cpu']} ({m['cores']} cores, {m['memory_gb']} GB"
    if not m.get("accelerator"):
        return f"{host}, CPU only)"
    peak = m.get("peak_gbps")
    return f"{m['accelerator']}" + (f" (peak {peak:,.0f} GB/s)" if peak else "") + f", host {host})"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Measured on {where(m)}, "
        f"JAX {m['jax']}, Optax {m['optax']}, PyTorch {m['torch']}, on {m['date'][:10]}, "
        f"with `{m['command']}`.",
        "",
        "Times are medians of interleaved rounds in one process, in milliseconds; "
        "a ratio in bold misses its target." + load_note(m),
        "",
        "### Targets",
        "",
    ]
    lines += table(
        ["target", "measured", ""],
        [[t["target"], t["measured"], mark(t["met"])] for t in results["targets"]],
    )

    lines += ["", "### Standalone clip_by_global_norm", ""]
    lines += [
        "One jitted clip of the whole tree (max_norm 1, always clipping), its input "
        "not donated. The copy multiplies every leaf by a run-time 1: it reads and "
        "writes each byte once, the floor for any clip, which must also read the "
        "tree once for the norm. GB/s counts bytes read and written: 2x the tree for "
        "the copy, 3x for a clip.",
        "",
    ]
    peak = m.get("peak_gbps")
    rows = []
    for c in results["clip"]:
        t = c["times"]
        rows.append(
            [
                c["label"],
                str(c["leaves"]),
                fmt_ms(t["jaxclip"]),
                fmt_ms(t["optax"]),
                fmt_ms(t["copy"]),
                f"{t['jaxclip']['gb_per_s']:.1f}",
                f"{t['copy']['gb_per_s']:.1f}",
                fmt_x(c["jaxclip_over_optax"], LIMITS["optax"]),
                fmt_x(c["jaxclip_over_copy"], LIMITS["copy"]),
            ]
        )
        if peak:
            rows[-1].insert(6, f"{t['jaxclip']['gb_per_s'] / peak:.0%}")
    header = ["tree", "leaves", "jaxclip ms", "Optax ms", "copy ms", "jaxclip GB/s"]
    header += ["of peak"] if peak else []
    header += ["copy GB/s", "jaxclip / Optax", "jaxclip / copy"]
    lines += table(header, rows)

    lines += ["", "#### Against PyTorch", ""]
    lines += [
        "`torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)` on "
        + (
            "CUDA tensors holding the same values. "
            if m.get("torch_device") == "cuda"
            else f"CPU tensors holding the same values, {m['torch_threads'] or m['cores']} "
            f"threads (as many as JAX uses), OMP_WAIT_POLICY={m['omp_wait_policy']}. "
        )
        + "PyTorch scales the gradients in "
        "place; the in-place JAX equivalent is the clip with the gradient donated "
        "(`jax.jit(..., donate_argnums=0)`). Ratios above 1: jaxclip is faster.",
        "",
    ]
    rows = []
    for c in results["clip"]:
        t = c["times"]
        if "torch" not in t:
            rows.append([c["label"], NOT_INSTALLED, "-", "-", "-", "-", "-"])
            continue
        rows.append(
            [
                c["label"],
                fmt_ms(t["torch"]),
                fmt_ms(t["jaxclip"]),
                fmt_ms(t["jaxclip donated"]),
                f"{t['torch']['gb_per_s']:.1f}",
                fmt_x(c["torch_over_jaxclip"]),
                fmt_x(c["torch_over_jaxclip_donated"], LIMITS["torch"], at_least=True),
            ]
        )
    header = ["tree", "PyTorch ms", "jaxclip ms", "jaxclip donated ms", "PyTorch GB/s"]
    header += ["PyTorch / jaxclip", "PyTorch / jaxclip donated"]
    lines += table(header, rows)

    step = results["step"]
    lines += ["", f"### Clippers inside a jitted AdamW step ({step['label']})", ""]
    lines += [
        "`optax.chain(clipper, optax.adamw(1e-3))`, parameters and optimizer state "
        "donated. skip_on_spike guards the whole optimizer with clip_by_global_norm "
        "inside it; optax.apply_if_finite, the nearest Optax guard, wraps the same optimizer. "
        "Fresh memory: what a step touches for the first time (minor page faults, averaged "
        "over 3 steps). XLA on CPU allocates a call's temporaries afresh, so a step that "
        "writes a gradient-sized intermediate to memory pays the page faults as well as "
        "the traffic.",
        "",
    ]
    if "one_read" in step:
        read_ms = step["one_read"]["median_ms"]
        lines += [
            f"One read of the gradient (its plain jitted norm) took {read_ms:.2f} ms in the "
            "same rounds. A global-norm clipper must read the whole gradient before its first "
            "update, so AdamW alone plus that read is its floor in the step: "
            f"{step['floor_over_adamw']:.2f}x AdamW alone.",
            "",
        ]
    rows = []
    for name, t in step["times"].items():
        fixed = name.startswith("jaxclip.") and not t["adaptive"]
        rows.append(
            [
                name + (" (adaptive)" if t["adaptive"] else ""),
                f"{t['median_ms']:.2f}",
                fmt_x(t["over_adamw"], LIMITS["adamw"] if fixed else None),
                fmt_x(t["over_fixed_clip"], LIMITS["adaptive"] if t["adaptive"] else None),
                fmt_x(t.get("over_floor")),
                "-" if t.get("fresh_mb") is None else f"{t['fresh_mb']:,.0f}",
            ]
        )
    header = [
        "step",
        "ms",
        "vs AdamW alone",
        "vs jaxclip.clip_by_global_norm",
        "vs AdamW + one read",
        "fresh memory / step (MB)",
    ]
    lines += table(header, rows)

    lines += ["", "### Compile time against the number of leaves", ""]
    lines += [
        "Lowering plus compiling one jitted clip update, each in a fresh process; "
        "leaves shaped like a transformer's (d_model 128). Optax's counterparts: "
        + ", ".join(f"`{c}`: `{peer}`" for c, (_, _, peer) in COMPILED.items())
        + ".",
        "",
    ]
    rows = []
    for row in results["compile"]:
        ours, theirs = row["jaxclip"], row["optax"]
        r = ratio(ours.get("total_s"), theirs.get("total_s"))
        rows.append(
            [
                compiled_clipper(row),
                f"{row['leaves']} {row['dtype']}",
                fmt_seconds(ours),
                fmt_seconds(theirs),
                fmt_x(r, LIMITS["compile"]),
            ]
        )
    lines += table(["clipper", "leaves", "jaxclip", "Optax", "jaxclip / Optax"], rows)

    pe = results["per_example"]
    lines += ["", "### Per-example clipping", ""]
    lines += [
        f"Per-example gradients of a {pe['parameters']:,}-parameter MLP, batch {pe['batch']} "
        f"({pe['megabytes']:,.0f} MB); each example clipped to the median norm and the "
        "results summed. Both return the sum and the number clipped; "
        f"results agree: {'yes' if pe['results_agree'] else 'NO'}. GB/s counts the "
        "gradients read twice (norms, then the sum).",
        "",
    ]
    base = pe["times"]["optax.per_example_global_norm_clip"]["median_ms"]
    rows = [
        [name, f"{t['median_ms']:.2f}", f"{t['gb_per_s']:.1f}", fmt_x(t["median_ms"] / base)]
        for name, t in pe["times"].items()
    ]
    lines += table(["", "ms", "GB/s", "vs Optax"], rows)

    if all("value_times" in c for c in results["clip"]):
        lines += ["", "### Standalone clip_by_value", ""]
        lines += [
            f"One jitted element-wise clip to [-{VALUE_BOUND}, {VALUE_BOUND}] (about a third "
            "of the elements clipped), its input not donated. jaxclip also records its "
            "statistics (by default the norms before and after and the fraction clipped); "
            "`optax.clip` records none.",
            "",
        ]
        names = list(VALUE_CLIPPERS)
        rows = []
        for c in results["clip"]:
            t = c["value_times"]
            base = t["optax.clip"]["median_ms"]
            rows.append(
                [c["label"]]
                + [fmt_ms(t[name]) for name in names]
                + [fmt_x(t[name]["median_ms"] / base) for name in names[:2]]
            )
        header = ["tree", "jaxclip ms", "jaxclip light ms", "optax.clip ms"]
        header += ["jaxclip / optax.clip", "light / optax.clip"]
        lines += table(header, rows)

    lines += ["", "### Robust global norm", ""]
    lines += [
        "`jaxclip.global_norm` (with its overflow and underflow rescue, which runs "
        "only when needed) against a plain `sqrt(sum(x**2))` accumulated in float32, "
        "and `optax.tree.norm`. GB/s counts the tree read once.",
        "",
    ]
    rows = []
    for c in results["clip"]:
        t = c["norm_times"]
        rows.append(
            [
                c["label"],
                fmt_ms(t["jaxclip.global_norm"]),
                fmt_ms(t["naive"]),
                fmt_ms(t["optax.tree.norm"]),
                f"{t['jaxclip.global_norm']['gb_per_s']:.1f}",
                fmt_x(c["robust_over_naive"], LIMITS["norm"]),
            ]
        )
    lines += table(
        ["tree", "jaxclip ms", "naive ms", "optax.tree.norm ms", "jaxclip GB/s", "jaxclip / naive"],
        rows,
    )
    return "\n".join(lines) + "\n"


# A tree of this many leaves or more measures what each leaf costs, not bandwidth:
# it is in the tables, not in the plot of time against size.
MANY_LEAVES = 1000


def plot(results: dict[str, Any], path: pathlib.Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return False
    clips = sorted(
        (c for c in results["clip"] if c["dtype"] == "float32" and c["leaves"] < MANY_LEAVES),
        key=lambda c: c["megabytes"],
    )
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {
        "jaxclip": ("jaxclip", "o-"),
        "jaxclip donated": ("jaxclip, gradient donated (in place)", "o:"),
        "optax": ("Optax", "s--"),
        "torch": ("PyTorch clip_grad_norm_ (foreach)", "^-."),
        "copy": ("copy floor (read + write once)", "k:"),
    }
    for key, (label, style) in styles.items():
        points = [
            (c["megabytes"], c["times"][key]["median_ms"]) for c in clips if key in c["times"]
        ]
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("tree size (MB, float32)")
    ax.set_ylabel("median time (ms)")
    m = results["machine"]
    where = m.get("accelerator") or f"{m['cpu']}, {m['cores']} cores"
    ax.set_title(f"clip by global norm, {where}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_reports(results: dict[str, Any], out: pathlib.Path) -> None:
    """suite.md and the plot, from the results (the targets are judged again)."""
    results["targets"] = targets(results)
    text = markdown(results)
    (out / "suite.md").write_text(text)
    plotted = plot(results, out / "time_vs_size.png")
    print(text)
    print(f"wrote {out / 'suite.md'}", end="")
    print(f", {out / 'time_vs_size.png'}" if plotted else " (no matplotlib: no plot)")
