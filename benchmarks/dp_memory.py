"""Peak memory and time of a DP-SGD step on a transformer: ghost clipping against the rest.

    python benchmarks/dp_memory.py [--d-model 384] [--layers 6] [--seq-len 128]
                                   [--batches 16,64,256,1024] [--steps 3] [--fit-gb 24]

The model is char_transformer.py's decoder (vocabulary 128; about 10M
parameters at the defaults). Each variant and batch size runs in a fresh
process, which reports its peak resident memory (``ru_maxrss``, JAX's runtime
included), the temporary memory XLA's compiled step asks for, and the median
time of the steps after the first:

- ``non-private``: ``jax.grad`` of the mean loss, the floor;
- ``vmap``: per-example gradients with ``vmap(grad)``, then ``clip_and_sum``
  (what ``optax.contrib``'s and jax-privacy's per-example clipping do);
- ``microbatched``: ``clipped_gradient_sum(microbatch_size=32)``;
- ``ghost``: ``ghost_clipped_sum``;
- ``torch non-private`` and ``opacus ghost``: the same model in PyTorch, one
  SGD step without privacy and with Opacus's ghost clipping
  (``grad_sample_mode="ghost"``, noise 0), run with ``--torch-python`` (an
  interpreter with torch and opacus; skipped when it has none).

A process that runs out of memory is reported as such. With ``--fit-gb``, each
JAX variant's largest batch whose compiled step XLA sizes within that many GB
(compiled at growing batch sizes, not run). Results go to
benchmarks/results/dp_memory.{json,md,png} (``--render`` redraws them from the .json).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

VARIANTS = ("non-private", "vmap", "microbatched", "ghost")
TORCH_VARIANTS = ("torch non-private", "opacus ghost")

CHILD = r"""
import json, resource, statistics, sys, time
import jax, jax.numpy as jnp
import jaxclip
import char_transformer as ct

variant, batch_size, d_model, layers, seq_len, steps = sys.argv[1:7]
batch_size, steps = int(batch_size), int(steps)
model = ct.Model(d_model=int(d_model), heads=4, layers=int(layers), seq_len=int(seq_len))
params = ct.init(jax.random.PRNGKey(0), model)
data = jnp.asarray(ct.corpus())
tokens = ct.batch(jax.random.PRNGKey(1), data, batch_size, model)

def example_loss(p, ex):
    return ct.loss(p, ex[None], model)

def step(p, tokens):
    if variant == "non-private":
        return jax.grad(lambda q: ct.loss(q, tokens, model))(p)
    if variant == "vmap":
        grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(p, tokens)
        return jaxclip.clip_and_sum(grads, 1.0).total
    if variant == "microbatched":
        return jaxclip.clipped_gradient_sum(
            jax.grad(example_loss), p, tokens, 1.0, microbatch_size=min(32, batch_size)).total
    return jaxclip.ghost_clipped_sum(example_loss, p, tokens, 1.0).total

compiled = jax.jit(step).lower(params, tokens).compile()
analysis = compiled.memory_analysis()
temp = getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None
if steps == 0:  # only what XLA's compiled step would hold: temporaries, arguments, outputs
    sizes = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")
    print(json.dumps({"xla_total_mb": sum(getattr(analysis, k) for k in sizes) / 2**20}))
    sys.exit()
times = []
for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, tokens))
    times.append(time.perf_counter() - start)
print(json.dumps({
    "parameters": sum(x.size for x in jax.tree.leaves(params)),
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "xla_temp_mb": None if temp is None else temp / 2**20,
    "step_s": statistics.median(times[1:] or times),
}))
"""


TORCH_CHILD = r"""
import json, math, resource, statistics, sys, time
import opacus, torch
import torch.nn as nn
import torch.nn.functional as F

variant, batch_size, d, layers, seq_len, steps = sys.argv[1:7]
batch_size, d, layers, seq_len, steps = map(int, (batch_size, d, layers, seq_len, steps))
VOCAB, HEADS = 128, 4
torch.manual_seed(0)


class Block(nn.Module):  # char_transformer.py's block
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 4 * d, bias=False)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x, mask):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (a.view(b, t, HEADS, d // HEADS).transpose(1, 2) for a in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // HEADS)
        weights = scores.masked_fill(~mask, -1e9).softmax(-1)
        x = x + self.proj((weights @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, d)
        self.positions = nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.out = nn.Linear(d, VOCAB, bias=False)

    def forward(self, tokens):
        b, t = tokens.shape
        x = self.tokens(tokens) + self.positions(torch.arange(t).repeat(b, 1))
        mask = torch.tril(torch.ones(t, t, dtype=torch.bool))
        for block in self.blocks:
            x = block(x, mask)
        return self.out(self.ln_f(x))


net = Net()
data = torch.randint(0, VOCAB, (batch_size, seq_len + 1))
loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(data[:, :-1], data[:, 1:]), batch_size=batch_size
)
optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
criterion = nn.CrossEntropyLoss()
if variant == "opacus ghost":
    net, optimizer, criterion, loader = opacus.PrivacyEngine().make_private(
        module=net, optimizer=optimizer, data_loader=loader, criterion=criterion,
        noise_multiplier=0.0, max_grad_norm=1.0, grad_sample_mode="ghost",
        poisson_sampling=False,
    )
x, y = next(iter(loader))
times = []
for _ in range(steps):
    start = time.perf_counter()
    optimizer.zero_grad()
    logits = net(x)
    if variant == "opacus ghost":
        loss = criterion(logits.reshape(-1, VOCAB), y.reshape(-1), shape=logits.shape)
    else:
        loss = criterion(logits.reshape(-1, VOCAB), y.reshape(-1))
    loss.backward()
    optimizer.step()
    times.append(time.perf_counter() - start)
print(json.dumps({
    "parameters": sum(p.numel() for p in net.parameters()),
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "xla_temp_mb": None,
    "step_s": statistics.median(times[1:] or times),
    "versions": f"torch {torch.__version__}, opacus {opacus.__version__}",
}))
"""


def run(variant: str, batch: int, args: argparse.Namespace, steps: int | None = None) -> dict:
    here = pathlib.Path(__file__).parent
    python, child = (
        (args.torch_python, TORCH_CHILD)
        if variant in TORCH_VARIANTS
        else (
            sys.executable,
            CHILD,
        )
    )
    cmd = [python, "-c", child, variant, str(batch), str(args.d_model)]
    cmd += [str(args.layers), str(args.seq_len), str(args.steps if steps is None else steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=here)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["killed"]
        return {"error": tail[0] if done.returncode > 0 else "killed (out of memory)"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def largest_fit(variant: str, args: argparse.Namespace) -> int:
    """The largest batch whose compiled step XLA sizes within ``--fit-gb`` (compiled,
    not run): doubling from 16, then halving the gap three times."""
    fits = lambda b: run(variant, b, args, steps=0)["xla_total_mb"] <= args.fit_gb * 1024  # noqa: E731
    low, high = 0, 16
    while high <= args.fit_max and fits(high):
        low, high = high, 2 * high
    if low == 0 or high > args.fit_max:
        return low
    for _ in range(3):
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def report(
    rows: list[dict], seq_len: int, fits: dict | None = None, fit_gb: float = 0, fit_max: int = 0
) -> str:
    """The results as a Markdown table; each PyTorch row against PyTorch's own
    non-private step, each JAX row against JAX's."""
    lines = [
        "| batch | variant | peak RSS (MB) | XLA temporaries (MB) | step (s) | "
        "vs non-private: memory | time |",
        "|---|---|---|---|---|---|---|",
    ]
    floors = {
        (r["variant"], r["batch"]): r
        for r in rows
        if r["variant"] in ("non-private", "torch non-private") and "error" not in r
    }
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['variant']} | {r['error']} | | | | |")
            continue
        own = "torch non-private" if r["variant"] in TORCH_VARIANTS else "non-private"
        base = floors.get((own, r["batch"]))
        mem = f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x" if base else "-"
        time_ratio = f"{r['step_s'] / base['step_s']:.2f}x" if base else "-"
        temp = "-" if r["xla_temp_mb"] is None else f"{r['xla_temp_mb']:.0f}"
        lines.append(
            f"| {r['batch']} | {r['variant']} | {r['peak_rss_mb']:.0f} | {temp} | "
            f"{r['step_s']:.3f} | {mem} | {time_ratio} |"
        )
    params = next((r["parameters"] for r in rows if "parameters" in r), 0)
    torch_versions = next((r["versions"] for r in rows if "versions" in r), None)
    note = f"; PyTorch rows ({torch_versions}) against PyTorch's step" if torch_versions else ""
    table = "\n".join(lines) + "\n"
    if fits:
        vmap = fits.get("vmap") or 1
        table += (
            f"\nLargest batch whose compiled step XLA sizes within {fit_gb:g} GB (compiled, "
            "not run):\n\n| variant | largest batch | vs vmap |\n|---|---|---|\n"
        )
        for variant, batch in fits.items():
            shown = f"{batch} or more (the search's cap)" if batch >= fit_max else str(batch)
            table += f"| {variant} | {shown} | {batch / vmap:.2f}x |\n"
    return (
        f"Transformer, {params / 1e6:.1f}M parameters, sequence length {seq_len}, "
        f"CPU{note}\n\n" + table
    )


def figure(rows: list[dict], path: pathlib.Path) -> None:
    """Peak memory and step time against batch size, one line per variant."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, time_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for variant in VARIANTS + TORCH_VARIANTS:
        done = [r for r in rows if r["variant"] == variant and "error" not in r]
        if not done:
            continue
        style = "--" if variant in TORCH_VARIANTS else "-"
        batches = [r["batch"] for r in done]
        mem.plot(batches, [r["peak_rss_mb"] for r in done], style, marker="o", label=variant)
        time_ax.plot(batches, [r["step_s"] for r in done], style, marker="o", label=variant)
    sizes = sorted({r["batch"] for r in rows})
    for ax, label in ((mem, "peak resident memory (MB)"), (time_ax, "step time (s)")):
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel=label)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, alpha=0.3)
    mem.set_title("DP-SGD step, peak memory", fontsize="medium")
    time_ax.set_title("DP-SGD step, time (dashed: PyTorch)", fontsize="medium")
    time_ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batches", default="16,64,256,1024")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/dp_memory")
    parser.add_argument("--torch-python", default=sys.executable)
    parser.add_argument("--render", action="store_true", help="redraw from the .json")
    parser.add_argument(
        "--fit-gb", type=float, default=0, help="find each JAX path's largest batch"
    )
    parser.add_argument("--fit-max", type=int, default=16384)
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    if args.render:
        saved = json.loads(out.with_suffix(".json").read_text())
        fit_gb = saved["args"].get("fit_gb", 0)
        fit_max = saved["args"].get("fit_max", 0)
        md = report(saved["rows"], saved["args"]["seq_len"], saved.get("fits"), fit_gb, fit_max)
        out.with_suffix(".md").write_text(md)
        figure(saved["rows"], out.with_suffix(".png"))
        return
    probe = subprocess.run([args.torch_python, "-c", "import torch, opacus"], capture_output=True)
    variants = VARIANTS + (TORCH_VARIANTS if probe.returncode == 0 else ())
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from common import machine, write

    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for variant in variants:
            result = {"variant": variant, "batch": batch, **run(variant, batch, args)}
            rows.append(result)
            print(json.dumps(result), flush=True)
    fits = {v: largest_fit(v, args) for v in VARIANTS} if args.fit_gb else None
    print(json.dumps({"fits": fits}), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = {"machine": machine(), "args": vars(args), "rows": rows, "fits": fits}
    write(str(out.with_suffix(".json")), saved)
    out.with_suffix(".md").write_text(report(rows, args.seq_len, fits, args.fit_gb, args.fit_max))
    figure(rows, out.with_suffix(".png"))
    print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
