"""The suite's cases: what each one builds and times, against which contenders.

Each case returns plain data (medians, minima, every sample) for report.py to
turn into tables; suite.py runs them. The timing helpers below (``standalone``,
``time_steps``, ``compile_seconds``) are also what before_after.py times with.
Run as a script, this module is the child process that compiles one clipper
(see ``compile_one``).
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import (
    cores,
    cpu_model,
    interleaved,
    leaf_specs,
    on_accelerator,
    peak_gbps,
    training_run,
    transformer_tree,
    tree_megabytes,
)

import jaxclip

MAX_NORM = 1.0  # every tree below has a global norm far above 1: the scale is applied
NOT_INSTALLED = "not installed"


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
        # a call on a small tree is short and varies much from call to call: more
        # rounds, for about the same time in all
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
        Tree(128, 222, 1000),  # 176 MB in 2000 leaves (see report.MANY_LEAVES)
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


def standalone(tx: optax.GradientTransformation, grads: Any, params: Any = None) -> Any:
    """One jitted update of ``tx`` on ``grads`` (not donated), as a zero-argument
    function; ``params`` for the clippers that read them (agc)."""
    update, state = jax.jit(tx.update), tx.init(grads)
    return lambda: update(grads, state, params)


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
    ours = jaxclip.clip_by_global_norm(MAX_NORM)
    copy = jax.jit(scaled_copy)
    one = jnp.ones((), jnp.float32)
    norm = float(jaxclip.global_norm(tree))
    label = f"{mb:,.0f} MB {spec.dtype}"
    print(f"[clip] {label}: {len(jax.tree.leaves(tree))} leaves, norm {norm:.1f}", flush=True)

    # PyTorch clips in place; the JAX equivalent donates the gradient to the clip
    in_place = jax.jit(ours.update, donate_argnums=0)
    box = {"grads": jax.tree.map(jnp.copy, tree), "state": ours.init(tree)}

    def donated() -> Any:
        box["grads"], box["state"] = in_place(box["grads"], box["state"])
        return box["grads"]

    fns = {
        "copy": lambda: copy(tree, one),
        "jaxclip": standalone(ours, tree),
        "optax": standalone(optax.clip_by_global_norm(MAX_NORM), tree),
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
    values = {name: standalone(tx, tree) for name, tx in VALUE_CLIPPERS.items()}
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


ALONE = "AdamW alone"

# name -> (a factory of the clipper chained before AdamW, whether it is an adaptive jaxclip
# clipper); "AdamW alone" and the guard around the whole optimizer are built in optimizer().
# A jaxclip factory takes the module to build from (``lib``), so that before_after.py can
# build the same clipper from an earlier revision of jaxclip.
STEP_CLIPPERS: dict[str, tuple[Any, bool]] = {
    ALONE: (None, False),
    "jaxclip.clip_by_global_norm": (lambda lib=jaxclip: lib.clip_by_global_norm(MAX_NORM), False),
    "optax.clip_by_global_norm": (lambda: optax.clip_by_global_norm(MAX_NORM), False),
    "jaxclip.clip_by_norm": (lambda lib=jaxclip: lib.clip_by_norm(MAX_NORM), False),
    "jaxclip.clip_by_value": (lambda lib=jaxclip: lib.clip_by_value(VALUE_BOUND), False),
    "jaxclip.clip_by_value(statistics='light')": (
        lambda lib=jaxclip: lib.clip_by_value(VALUE_BOUND, statistics="light"),
        False,
    ),
    "optax.clip": (lambda: optax.clip(VALUE_BOUND), False),
    "jaxclip.autoclip": (lambda lib=jaxclip: lib.autoclip(10.0), True),
    "jaxclip.zclip": (lambda lib=jaxclip: lib.zclip(), True),
    "jaxclip.quantile_clip": (lambda lib=jaxclip: lib.quantile_clip(), True),
    "jaxclip.adagc": (lambda lib=jaxclip: lib.adagc(), True),
    "jaxclip.adagc(scope='global')": (lambda lib=jaxclip: lib.adagc(scope="global"), True),
    "jaxclip.agc": (lambda lib=jaxclip: lib.agc(0.01), True),
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
    if name == ALONE:
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


def time_steps(runs: dict[str, Callable[[], Any]], grads: Any, rounds: int) -> dict[str, Any]:
    """The steps ``runs`` (common.training_run, one of them ALONE), interleaved with
    one read of ``grads``. A global-norm clipper must read the whole gradient before
    its first update, so AdamW alone plus that read is its floor in the step: each
    step's time is also given over AdamW alone and over that floor."""
    read = jax.jit(naive_norm)
    times = interleaved({**runs, ONE_READ: lambda: read(grads)}, rounds=rounds, keep_samples=True)
    one_read = times.pop(ONE_READ)
    alone = times[ALONE]["median_ms"]
    floor = alone + one_read["median_ms"]
    for t in times.values():
        t["over_adamw"] = t["median_ms"] / alone
        t["over_floor"] = t["median_ms"] / floor
    return {"times": times, "one_read": one_read, "floor_over_adamw": floor / alone}


def step_case(spec: Tree, rounds: int) -> dict[str, Any]:
    params = spec.build(seed=0)
    grads = spec.build(seed=1)
    mb = tree_megabytes(params)
    print(f"[step] {mb:,.0f} MB {spec.dtype}, {len(STEP_CLIPPERS)} steps", flush=True)
    runs = {name: training_run(optimizer(name), params, grads) for name in STEP_CLIPPERS}
    steps = time_steps(runs, grads, rounds)
    fixed = steps["times"]["jaxclip.clip_by_global_norm"]["median_ms"]
    for name, t in steps["times"].items():
        t["fresh_mb"] = fresh_megabytes(runs[name])
        t["over_fixed_clip"] = t["median_ms"] / fixed
        t["adaptive"] = STEP_CLIPPERS[name][1]
    return {"label": f"{mb:,.0f} MB {spec.dtype}", "megabytes": mb, "rounds": rounds, **steps}


# ---------------------------------------------------------------------------
# Case 4: compile time against the number of leaves, each in a fresh process


# Per clipper compiled: jaxclip's (from the module ``lib``, as in STEP_CLIPPERS), its Optax
# counterpart and that one's name (per leaf: Optax's clip_by_block_rms, which clips each
# leaf's norm divided by sqrt(size)).
COMPILED = {
    "clip_by_global_norm": (
        lambda lib=jaxclip: lib.clip_by_global_norm(MAX_NORM),
        lambda: optax.clip_by_global_norm(MAX_NORM),
        "optax.clip_by_global_norm",
    ),
    "clip_by_norm": (
        lambda lib=jaxclip: lib.clip_by_norm(MAX_NORM),
        lambda: optax.clip_by_block_rms(1.0),
        "optax.clip_by_block_rms",
    ),
    "agc": (
        lambda lib=jaxclip: lib.agc(0.01),
        lambda: optax.adaptive_grad_clip(0.01),
        "optax.adaptive_grad_clip",
    ),
}
UNIT_CLIPPERS = ("clip_by_norm", "agc")


def compile_seconds(tx: optax.GradientTransformation, specs: Any) -> dict[str, float]:
    """Seconds to lower and to compile one jitted update of ``tx`` on the shapes
    ``specs``. A compile is timed once per process or after ``jax.clear_caches()``:
    JAX reuses what it traced and compiled for the same function and shapes."""
    state = jax.eval_shape(tx.init, specs)
    start = time.perf_counter()
    # the parameters are the gradient's shapes (agc reads them)
    lowered = jax.jit(tx.update).lower(specs, state, specs)
    mid = time.perf_counter()
    lowered.compile()
    end = time.perf_counter()
    return {"lower_s": mid - start, "compile_s": end - mid, "total_s": end - start}


def compile_child(clipper: str, impl: str, n_leaves: int, dtype: str) -> None:
    """Runs in the child process (this module run as a script): one compile."""
    ours, theirs, _ = COMPILED[clipper]
    tx = ours() if impl == "jaxclip" else theirs()
    print(json.dumps(compile_seconds(tx, leaf_specs(n_leaves, dtype))))


def compile_one(
    clipper: str, impl: str, n_leaves: int, dtype: str, timeout_s: int
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, clipper, impl, str(n_leaves), dtype]
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
    return json.loads(proc.stdout.strip().splitlines()[-1])


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

    ours_j, theirs_j, update_j = jax.jit(ours), jax.jit(theirs), jax.jit(transform.update)
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
    return {
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


# ---------------------------------------------------------------------------


def run_all(plan: Plan, torch: Any) -> dict[str, Any]:
    """Every case of ``plan``, and the seconds each kind of case took."""
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    results: dict[str, Any] = {"seconds": seconds}

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
    return results


if __name__ == "__main__":  # the child process of compile_one
    compile_child(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
