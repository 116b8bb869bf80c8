"""The benchmark suite: jaxclip against Optax, PyTorch and the memory-bandwidth floor.

    python benchmarks/suite.py [--quick] [--out benchmarks/results]

Writes ``suite.json`` (every figure, every sample and the machine), ``suite.md``
(the tables, each target marked met or missed) and ``time_vs_size.png`` to the
output folder. ``--quick`` runs small trees and few rounds, to check that the
suite works; the full run takes about 8 to 11 minutes on 2 cores. ``--render`` only
rewrites ``suite.md`` and the plot from an existing ``suite.json``. PyTorch is
optional: without it the PyTorch columns read "not installed".
benchmarks/README.md describes each case and the targets.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import interleaved, training_run, transformer_tree, tree_megabytes

import jaxclip

MAX_NORM = 1.0  # every tree below has a global norm far above 1: the scale is applied
NOT_INSTALLED = "not installed"

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


# Peak memory bandwidth in GB/s from the vendors' data sheets, by the start of JAX's
# device_kind; --peak-gbps gives it for any other device.
PEAK_GBPS = {
    "NVIDIA H200": 4800,
    "NVIDIA H100 80GB HBM3": 3350,  # SXM
    "NVIDIA H100 PCIe": 2000,
    "NVIDIA A100-SXM4-80GB": 2039,
    "NVIDIA A100-SXM4-40GB": 1555,
    "NVIDIA A100 80GB PCIe": 1935,
    "NVIDIA A100-PCIE-40GB": 1555,
    "NVIDIA L4": 300,
    "NVIDIA A10G": 600,
    "Tesla V100-SXM2": 900,
    "Tesla T4": 320,
}


def on_accelerator() -> bool:
    return jax.devices()[0].platform != "cpu"


def peak_gbps(device_kind: str, given: float | None) -> float | None:
    """The device's peak memory bandwidth: ``given``, else from PEAK_GBPS, else None."""
    if given is not None:
        return given
    for kind, gbps in PEAK_GBPS.items():
        if device_kind.startswith(kind):
            return float(gbps)
    return None


# ---------------------------------------------------------------------------
# What to run


@dataclass(frozen=True)
class Tree:
    """A transformer-like tree (see common.transformer_tree)."""

    d_model: int
    layers: int
    vocab: int
    dtype: str = "float32"

    def build(self, seed: int = 0) -> Any:
        return transformer_tree(self.d_model, self.layers, self.vocab, jnp.dtype(self.dtype), seed)

    def megabytes(self) -> float:
        d = self.d_model
        count = self.vocab * d + d + self.layers * (12 * d * d + 6 * d)
        return count * jnp.dtype(self.dtype).itemsize / 1e6


@dataclass(frozen=True)
class Plan:
    clip_trees: tuple[Tree, ...]  # case 1 and the robust-norm case
    clip_rounds: int  # rounds for trees of 150 MB; smaller trees get more, up to 10x
    big_rounds: int  # rounds for trees over 300 MB
    step_tree: Tree  # cases 2 and 3
    step_rounds: int
    compile_leaves: tuple[int, ...]  # case 4, float32
    compile_bf16_leaves: tuple[int, ...]  # case 4, bfloat16
    compile_unit_leaves: tuple[int, ...]  # case 4, the per-leaf and per-unit clippers
    compile_timeout_s: int
    batch: int  # case 5
    mlp: tuple[int, int, int]  # case 5: inputs, hidden units, outputs
    example_rounds: int

    def rounds_for(self, tree: Tree) -> int:
        # a call on a small tree takes about a millisecond and varies by tens of
        # percent from call to call: more rounds for the same time in all
        mb = tree.megabytes()
        if mb > 300:
            return self.big_rounds
        return max(self.clip_rounds, min(10 * self.clip_rounds, round(self.clip_rounds * 150 / mb)))


FULL = Plan(
    clip_trees=(
        Tree(256, 2, 4096),  # 10 MB
        Tree(512, 3, 4096),  # 46 MB
        Tree(768, 5, 2048),  # 148 MB
        Tree(1024, 12, 8192),  # 638 MB
        Tree(1536, 10, 8192),  # 1.18 GB
        Tree(128, 222, 1000),  # 176 MB in 2000 leaves (see MANY_LEAVES)
        Tree(256, 2, 4096, "bfloat16"),
        Tree(768, 5, 2048, "bfloat16"),
        Tree(1536, 10, 8192, "bfloat16"),
    ),
    clip_rounds=30,
    big_rounds=12,
    step_tree=Tree(768, 5, 2048),
    step_rounds=40,
    compile_leaves=(10, 100, 2000),
    compile_bf16_leaves=(2000,),
    compile_unit_leaves=(100, 2000),
    compile_timeout_s=400,
    batch=256,
    mlp=(784, 1024, 200),  # 1.01M parameters
    example_rounds=10,
)

QUICK = Plan(
    # one layer each: few leaves keep the compile times short
    clip_trees=(Tree(128, 1, 1024), Tree(256, 1, 8192), Tree(256, 1, 8192, "bfloat16")),
    clip_rounds=5,
    big_rounds=3,
    step_tree=Tree(256, 1, 8192),
    step_rounds=5,
    compile_leaves=(10, 100),
    compile_bf16_leaves=(),
    compile_unit_leaves=(10,),
    compile_timeout_s=60,
    batch=32,
    mlp=(784, 256, 10),
    example_rounds=5,
)


# ---------------------------------------------------------------------------
# Machine and PyTorch


def cores() -> int:
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_torch() -> Any:
    """PyTorch set to use as many threads as JAX, or None when it is not installed."""
    # Idle OpenMP workers sleep instead of spinning; spinning workers would take
    # the cores from whatever runs next (the JAX contenders, and on a busy
    # machine PyTorch itself). A value set by the user is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(cores())
    return torch


def machine_info(torch: Any, command: str, given_peak: float | None) -> dict[str, Any]:
    device = jax.devices()[0]
    kind = device.device_kind if on_accelerator() else None
    return {
        "accelerator": kind,
        "peak_gbps": peak_gbps(kind, given_peak) if kind else None,
        "torch_device": torch_device(torch),
        "cpu": cpu_model(),
        "cores": cores(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_device": f"{device.platform}:{device.device_kind}",
        "optax": optax.__version__,
        "jaxclip": jaxclip.__version__,
        "torch": torch.__version__ if torch else NOT_INSTALLED,
        "torch_threads": torch.get_num_threads() if torch else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


# ---------------------------------------------------------------------------
# Helpers


def gb_per_s(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def scaled_copy(tree: Any, one: jax.Array) -> Any:
    """Reads and writes every leaf once. ``one`` is only known at run time, so
    XLA cannot fold the multiply away and must write a new buffer per leaf."""
    return jax.tree.map(lambda x: x * one.astype(x.dtype), tree)


def naive_norm(tree: Any) -> jax.Array:
    """The textbook global norm, accumulated in float32 like jaxclip's: no rescue."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def torch_device(torch: Any) -> str | None:
    """Where PyTorch runs: on the GPU when JAX does and PyTorch can, else on the CPU."""
    if torch is None:
        return None
    return "cuda" if on_accelerator() and torch.cuda.is_available() else "cpu"


def torch_clipper(torch: Any, tree: Any) -> Any:
    """``clip_grad_norm_(foreach=True)`` on PyTorch copies of ``tree``'s leaves."""
    dtype = getattr(torch, str(jax.tree.leaves(tree)[0].dtype))
    device = torch_device(torch)
    params = []
    for x in jax.tree.leaves(tree):
        # a private float32 copy (the JAX buffer must not be scaled in place)
        grad = torch.from_numpy(np.array(x, dtype=np.float32)).to(device=device, dtype=dtype)
        param = torch.nn.Parameter(torch.empty(grad.shape, dtype=dtype, device=device))
        param.grad = grad  # the parameter itself is never touched
        params.append(param)

    def run() -> None:
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
        if device == "cuda":  # PyTorch launches asynchronously, as JAX does
            torch.cuda.synchronize()

    return run


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def free() -> None:
    gc.collect()
    jax.clear_caches()


# ---------------------------------------------------------------------------
# Case 1, the robust-norm case and clip_by_value: standalone clips of one tree

VALUE_BOUND = 0.02  # the trees' elements have standard deviation 0.02: about a third clipped
VALUE_CLIPPERS = {
    "jaxclip.clip_by_value": jaxclip.clip_by_value(VALUE_BOUND),
    "jaxclip.clip_by_value(statistics='light')": jaxclip.clip_by_value(
        VALUE_BOUND, statistics="light"
    ),
    "optax.clip": optax.clip(VALUE_BOUND),
}


def clip_case(spec: Tree, rounds: int, torch: Any) -> dict[str, Any]:
    tree = spec.build()
    mb = tree_megabytes(tree)
    nbytes = mb * 1e6
    ours, theirs = jaxclip.clip_by_global_norm(MAX_NORM), optax.clip_by_global_norm(MAX_NORM)
    ours_state, theirs_state = ours.init(tree), theirs.init(tree)
    ours_update, theirs_update = jax.jit(ours.update), jax.jit(theirs.update)
    copy = jax.jit(scaled_copy)
    one = jnp.ones((), jnp.float32)
    norm = float(jaxclip.global_norm(tree))
    label = f"{mb:,.0f} MB {spec.dtype}"
    print(f"[clip] {label}: {len(jax.tree.leaves(tree))} leaves, norm {norm:.1f}", flush=True)

    # PyTorch clips in place; the JAX equivalent donates the gradient to the clip
    in_place = jax.jit(ours.update, donate_argnums=0)
    box = {"grads": jax.tree.map(jnp.copy, tree), "state": ours_state}

    def donated() -> Any:
        box["grads"], box["state"] = in_place(box["grads"], box["state"])
        return box["grads"]

    fns = {
        "copy": lambda: copy(tree, one),
        "jaxclip": lambda: ours_update(tree, ours_state),
        "optax": lambda: theirs_update(tree, theirs_state),
        "jaxclip donated": donated,
    }
    if torch is not None:
        fns["torch"] = torch_clipper(torch, tree)
    times = interleaved(fns, rounds=rounds, keep_samples=True)

    # bytes moved: the copy reads and writes each leaf; a clip also reads it once for the norm
    for name, t in times.items():
        t["gb_per_s"] = gb_per_s((2 if name == "copy" else 3) * nbytes, t["median_ms"])
    med = {name: t["median_ms"] for name, t in times.items()}

    norms = interleaved(
        {
            "naive": lambda f=jax.jit(naive_norm): f(tree),
            "jaxclip.global_norm": lambda f=jax.jit(jaxclip.global_norm): f(tree),
            "optax.tree.norm": lambda f=jax.jit(optax.tree.norm): f(tree),
        },
        rounds=rounds,
        keep_samples=True,
    )
    for t in norms.values():
        t["gb_per_s"] = gb_per_s(nbytes, t["median_ms"])

    # element-wise clips: jaxclip with either statistics, and Optax's (which records none)
    values = {}
    for name, tx in VALUE_CLIPPERS.items():
        update, state = jax.jit(tx.update), tx.init(tree)
        values[name] = lambda update=update, state=state: update(tree, state)
    value_times = interleaved(values, rounds=rounds, keep_samples=True)
    return {
        "label": label,
        "tree": spec.__dict__,
        "megabytes": mb,
        "dtype": spec.dtype,
        "leaves": len(jax.tree.leaves(tree)),
        "global_norm": norm,
        "rounds": rounds,
        "times": times,
        "torch": "measured" if torch is not None else NOT_INSTALLED,
        "jaxclip_over_optax": med["jaxclip"] / med["optax"],
        "jaxclip_over_copy": med["jaxclip"] / med["copy"],
        "torch_over_jaxclip": ratio(med.get("torch"), med["jaxclip"]),
        "torch_over_jaxclip_donated": ratio(med.get("torch"), med["jaxclip donated"]),
        "norm_times": norms,
        "value_times": value_times,
        "robust_over_naive": norms["jaxclip.global_norm"]["median_ms"]
        / norms["naive"]["median_ms"],
    }


# ---------------------------------------------------------------------------
# Cases 2 and 3: clippers inside a jitted AdamW step


def adamw() -> optax.GradientTransformation:
    return optax.adamw(1e-3)


# name -> (a factory of the clipper chained before AdamW, whether it is an adaptive jaxclip
# clipper); "AdamW alone" and the guard around the whole optimizer are built in optimizer()
STEP_CLIPPERS: dict[str, tuple[Any, bool]] = {
    "AdamW alone": (None, False),
    "jaxclip.clip_by_global_norm": (lambda: jaxclip.clip_by_global_norm(MAX_NORM), False),
    "optax.clip_by_global_norm": (lambda: optax.clip_by_global_norm(MAX_NORM), False),
    "jaxclip.clip_by_norm": (lambda: jaxclip.clip_by_norm(MAX_NORM), False),
    "jaxclip.clip_by_value": (lambda: jaxclip.clip_by_value(0.02), False),
    "jaxclip.clip_by_value(statistics='light')": (
        lambda: jaxclip.clip_by_value(0.02, statistics="light"),
        False,
    ),
    "optax.clip": (lambda: optax.clip(0.02), False),
    "jaxclip.autoclip": (lambda: jaxclip.autoclip(10.0), True),
    "jaxclip.zclip": (jaxclip.zclip, True),
    "jaxclip.quantile_clip": (jaxclip.quantile_clip, True),
    "jaxclip.adagc": (jaxclip.adagc, True),
    "jaxclip.adagc(scope='global')": (lambda: jaxclip.adagc(scope="global"), True),
    "jaxclip.agc": (lambda: jaxclip.agc(0.01), True),
    "optax.adaptive_grad_clip": (lambda: optax.adaptive_grad_clip(0.01), False),
    # the guards wrap the whole optimizer, global-norm clip included
    "jaxclip.skip_on_spike": (None, True),
    "optax.apply_if_finite": (None, False),
}


# timed beside the steps: the plain jitted norm of the gradient, one read of it
ONE_READ = "one read of the gradient"

# the guards around the whole optimizer (not clippers), each with its Optax peer
GUARDS = {"jaxclip.skip_on_spike": "optax.apply_if_finite"}


def optimizer(name: str) -> optax.GradientTransformation:
    if name == "AdamW alone":
        return adamw()
    if name == "jaxclip.skip_on_spike":
        return jaxclip.skip_on_spike(optax.chain(jaxclip.clip_by_global_norm(MAX_NORM), adamw()))
    if name == "optax.apply_if_finite":
        return optax.apply_if_finite(
            optax.chain(jaxclip.clip_by_global_norm(MAX_NORM), adamw()), max_consecutive_errors=10
        )
    return optax.chain(STEP_CLIPPERS[name][0](), adamw())


def fresh_megabytes(run: Any, calls: int = 3) -> float | None:
    """Memory a call touches for the first time (minor page faults), MB per call.

    XLA on CPU allocates a call's temporaries afresh each time, so every
    intermediate the size of the gradient written to memory shows up here (a
    gradient-sized temporary in a real training step may reuse pages the
    backward pass touched). None where the platform does not count faults.
    """
    if on_accelerator():  # page faults count host memory only
        return None
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    jax.block_until_ready(run())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        jax.block_until_ready(run())
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return faults * resource.getpagesize() / calls / 1e6


def step_case(spec: Tree, rounds: int) -> dict[str, Any]:
    params = spec.build(seed=0)
    grads = spec.build(seed=1)
    mb = tree_megabytes(params)
    print(f"[step] {mb:,.0f} MB {spec.dtype}, {len(STEP_CLIPPERS)} steps", flush=True)
    runs = {name: training_run(optimizer(name), params, grads) for name in STEP_CLIPPERS}
    # the floor of a global-norm clipper in the step: AdamW alone plus one read of the gradient
    read = jax.jit(naive_norm)
    runs[ONE_READ] = lambda: read(grads)
    times = interleaved(runs, rounds=rounds, keep_samples=True)
    one_read = times.pop(ONE_READ)
    for name in times:
        times[name]["fresh_mb"] = fresh_megabytes(runs[name])
    alone = times["AdamW alone"]["median_ms"]
    fixed = times["jaxclip.clip_by_global_norm"]["median_ms"]
    floor = alone + one_read["median_ms"]
    for name, t in times.items():
        t["over_adamw"] = t["median_ms"] / alone
        t["over_fixed_clip"] = t["median_ms"] / fixed
        t["over_floor"] = t["median_ms"] / floor
        t["adaptive"] = STEP_CLIPPERS[name][1]
    return {
        "label": f"{mb:,.0f} MB {spec.dtype}",
        "megabytes": mb,
        "rounds": rounds,
        "times": times,
        "one_read": one_read,
        "floor_over_adamw": floor / alone,
    }


# ---------------------------------------------------------------------------
# Case 4: compile time against the number of leaves, each in a fresh process


def leaf_specs(n_leaves: int, dtype: str) -> dict[str, jax.ShapeDtypeStruct]:
    """``n_leaves`` shapes as a transformer has them (d_model 128): an embedding,
    then per layer four attention matrices, two MLP matrices, a bias, two norms."""
    d = 128
    layer = [(d, d)] * 4 + [(d, 4 * d), (4 * d, d), (4 * d,), (d,), (d,)]
    shapes = [(1000, d), (d,)]
    while len(shapes) < n_leaves:
        shapes += layer
    return {f"leaf{i:04d}": jax.ShapeDtypeStruct(s, dtype) for i, s in enumerate(shapes[:n_leaves])}


# Per clipper compiled: jaxclip's, its Optax counterpart and that one's name (per
# leaf: Optax's clip_by_block_rms, which clips each leaf's norm divided by sqrt(size)).
COMPILED = {
    "clip_by_global_norm": (
        lambda: jaxclip.clip_by_global_norm(MAX_NORM),
        lambda: optax.clip_by_global_norm(MAX_NORM),
        "optax.clip_by_global_norm",
    ),
    "clip_by_norm": (
        lambda: jaxclip.clip_by_norm(MAX_NORM),
        lambda: optax.clip_by_block_rms(1.0),
        "optax.clip_by_block_rms",
    ),
    "agc": (
        lambda: jaxclip.agc(0.01),
        lambda: optax.adaptive_grad_clip(0.01),
        "optax.adaptive_grad_clip",
    ),
}
UNIT_CLIPPERS = ("clip_by_norm", "agc")


def compiled_clipper(row: dict[str, Any]) -> str:
    # results written before the per-leaf rows were added hold the global clip alone
    return row.get("clipper", "clip_by_global_norm")


def compile_child(clipper: str, impl: str, n_leaves: int, dtype: str) -> None:
    """Runs in the child process: times lowering and compiling one clip update."""
    specs = leaf_specs(n_leaves, dtype)
    ours, theirs, _ = COMPILED[clipper]
    tx = ours() if impl == "jaxclip" else theirs()
    state = jax.eval_shape(tx.init, specs)
    start = time.perf_counter()
    # the parameters are the gradient's shapes (agc reads them)
    lowered = jax.jit(tx.update).lower(specs, state, specs)
    mid = time.perf_counter()
    lowered.compile()
    end = time.perf_counter()
    print(json.dumps({"lower_s": mid - start, "compile_s": end - mid}))


def compile_one(
    clipper: str, impl: str, n_leaves: int, dtype: str, timeout_s: int
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--compile-child", clipper, impl, str(n_leaves), dtype]
    print(
        f"[compile] {clipper}, {impl}, {n_leaves} {dtype} leaves (limit {timeout_s} s)",
        flush=True,
    )
    try:
        # a child on a GPU must not try to preallocate memory this process holds
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"timeout_s": timeout_s}
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["total_s"] = out["lower_s"] + out["compile_s"]
    return out


def compile_case(plan: Plan) -> list[dict[str, Any]]:
    rows = []
    cases = [("clip_by_global_norm", n, "float32") for n in plan.compile_leaves]
    cases += [("clip_by_global_norm", n, "bfloat16") for n in plan.compile_bf16_leaves]
    cases += [(c, n, "float32") for c in UNIT_CLIPPERS for n in plan.compile_unit_leaves]
    for clipper, n, dtype in cases:
        row = {"clipper": clipper, "leaves": n, "dtype": dtype}
        for impl in ("jaxclip", "optax"):
            row[impl] = compile_one(clipper, impl, n, dtype, plan.compile_timeout_s)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------
# Case 5: per-example clipping


def per_example_case(plan: Plan) -> dict[str, Any]:
    n_in, n_hidden, n_out = plan.mlp
    shapes = {"w1": (n_in, n_hidden), "b1": (n_hidden,), "w2": (n_hidden, n_out), "b2": (n_out,)}

    rng = np.random.default_rng(0)
    # per-example norms spread over a factor of ~50; the clip norm is their median
    spread = np.exp(rng.standard_normal(plan.batch, dtype=np.float32)) * 0.01
    grads = {}
    for name, shape in shapes.items():
        g = rng.standard_normal((plan.batch, *shape), dtype=np.float32)
        g *= spread.reshape(-1, *[1] * len(shape))
        grads[name] = jnp.asarray(g)
    clip = float(jax.jit(lambda g: jnp.median(jax.vmap(jaxclip.global_norm)(g)))(grads))
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    mb = tree_megabytes(grads)
    print(f"[per-example] batch {plan.batch}, {n_params:,} parameters, {mb:,.0f} MB", flush=True)

    transform = jaxclip.per_example_clip(clip, reduce="sum")
    state = transform.init(jax.tree.map(lambda x: x[0], grads))

    # each returns the sum of the clipped per-example gradients and the number clipped
    def ours(g: Any) -> Any:
        out = jaxclip.clip_and_sum(g, clip)
        return out.total, out.clipped

    def theirs(g: Any) -> Any:
        return optax.per_example_global_norm_clip(jax.tree.leaves(g), clip)

    def transform_update(g: Any, s: Any) -> Any:
        return transform.update(g, s)

    ours_j, theirs_j, update_j = jax.jit(ours), jax.jit(theirs), jax.jit(transform_update)
    a, b = ours_j(grads), theirs_j(grads)
    agree = bool(int(a[1]) == int(b[1])) and all(
        np.allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
        for x, y in zip(jax.tree.leaves(a[0]), b[0])
    )
    times = interleaved(
        {
            "jaxclip.clip_and_sum": lambda: ours_j(grads),
            "jaxclip.per_example_clip": lambda: update_j(grads, state),
            "optax.per_example_global_norm_clip": lambda: theirs_j(grads),
        },
        rounds=plan.example_rounds,
        keep_samples=True,
    )
    for t in times.values():  # the gradients are read twice: for the norms and for the sum
        t["gb_per_s"] = gb_per_s(2 * mb * 1e6, t["median_ms"])
    result = {
        "batch": plan.batch,
        "parameters": n_params,
        "megabytes": mb,
        "clip_norm": clip,
        "clipped": int(a[1]),
        "results_agree": agree,
        "rounds": plan.example_rounds,
        "times": times,
        "jaxclip_over_optax": times["jaxclip.clip_and_sum"]["median_ms"]
        / times["optax.per_example_global_norm_clip"]["median_ms"],
    }
    return result


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


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    host = f"{m['cpu']} ({m['cores']} cores, {m['memory_gb']} GB"
    if m.get("accelerator"):
        peak = m.get("peak_gbps")
        where = f"{m['accelerator']}" + (f" (peak {peak:,.0f} GB/s)" if peak else "")
        where += f", host {host})"
    else:
        where = f"{host}, CPU only)"
    lines = [
        f"Measured on {where}, "
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


# ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small trees, few rounds")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    parser.add_argument(
        "--render", action="store_true", help="only rewrite suite.md and the plot from suite.json"
    )
    parser.add_argument(
        "--peak-gbps",
        type=float,
        help="the accelerator's peak memory bandwidth in GB/s, when PEAK_GBPS lacks it",
    )
    parser.add_argument("--compile-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_child:
        clipper, impl, n, dtype = args.compile_child
        compile_child(clipper, impl, int(n), dtype)
        return
    out = pathlib.Path(args.out)
    if args.render:
        results = json.loads((out / "suite.json").read_text())
        write_reports(results, out)
        return

    plan = QUICK if args.quick else FULL
    command = "python benchmarks/suite.py" + (" --quick" if args.quick else "")
    torch = load_torch()
    machine = machine_info(torch, command, args.peak_gbps)
    results: dict[str, Any] = {"machine": machine, "quick": args.quick}
    print(json.dumps(results["machine"], indent=1), flush=True)
    started = time.perf_counter()

    seconds = results["seconds"] = {}

    def timed(name: str, case: Any, *case_args: Any) -> Any:
        start = time.perf_counter()
        out = case(*case_args)
        free()  # the case's arrays die with it, before the next one starts
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
        return out

    results["clip"] = [
        timed("clip", clip_case, spec, plan.rounds_for(spec), torch) for spec in plan.clip_trees
    ]
    results["step"] = timed("step", step_case, plan.step_tree, plan.step_rounds)
    results["per_example"] = timed("per_example", per_example_case, plan)
    results["compile"] = timed("compile", compile_case, plan)
    seconds["total"] = time.perf_counter() - started
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_at_end"] = os.getloadavg()[0]
    results["targets"] = targets(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(results, indent=1))
    write_reports(results, out)
    print(", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))


def write_reports(results: dict[str, Any], out: pathlib.Path) -> None:
    """suite.md and the plot, from the results (the targets are judged again)."""
    results["targets"] = targets(results)
    text = markdown(results)
    (out / "suite.md").write_text(text)
    plotted = plot(results, out / "time_vs_size.png")
    print(text)
    print(f"wrote {out / 'suite.md'}", end="")
    print(f", {out / 'time_vs_size.png'}" if plotted else " (no matplotlib: no plot)")


if __name__ == "__main__":
    main()
