"""Each adaptive clipper in a jitted AdamW step, against the same step with clip_by_global_norm.

Also the wrappers of the AdamW itself (spike_aware, stable_update).

    python benchmarks/adaptive_step.py [--rounds 20] [--out benchmarks/results/adaptive_step.json]

Model: transformer-like float32 leaves, about 150 MB. Each step takes fixed
gradients, updates the parameters and the optimizer state (both donated, as in
a training loop), and the timings are interleaved. Reported: median step time
and its ratio to the clip_by_global_norm step.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import optax
from common import interleaved, machine, training_run, transformer_tree, tree_megabytes, write

import jaxclip

CLIPPERS = {
    "clip_by_global_norm": lambda: jaxclip.clip_by_global_norm(1.0),
    "autoclip": lambda: jaxclip.autoclip(10.0),
    "zclip": lambda: jaxclip.zclip(),
    "quantile_clip": lambda: jaxclip.quantile_clip(),
    "adagc": lambda: jaxclip.adagc(),
    "adagc_global": lambda: jaxclip.adagc(scope="global"),
    "agc": lambda: jaxclip.agc(0.01),
    "skip_on_spike+clip": None,  # built below: the guard around the whole optimizer
    "spike_aware(adamw)": None,  # built below: wrappers of the AdamW itself
    "stable_update(adamw)": None,
}


PEERS = {
    # the same jobs done by Optax, for comparison in the same run
    "optax.adaptive_grad_clip": lambda: optax.adaptive_grad_clip(0.01),
}


def optimizer(name: str) -> optax.GradientTransformation:
    if name == "optax.apply_if_finite+clip":
        tx = optax.apply_if_finite(
            optax.chain(jaxclip.clip_by_global_norm(1.0), optax.adamw(1e-4)), 10
        )
    elif name in PEERS:
        tx = optax.chain(PEERS[name](), optax.adamw(1e-4))
    elif name == "skip_on_spike+clip":
        tx = jaxclip.skip_on_spike(optax.chain(jaxclip.clip_by_global_norm(1.0), optax.adamw(1e-4)))
    elif name == "spike_aware(adamw)":
        tx = jaxclip.spike_aware(optax.adamw(1e-4))
    elif name == "stable_update(adamw)":
        tx = jaxclip.stable_update(optax.adamw(1e-4))
    elif name == "adamw alone":
        tx = optax.adamw(1e-4)
    else:
        tx = optax.chain(CLIPPERS[name](), optax.adamw(1e-4))
    return tx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--out", default="benchmarks/results/adaptive_step.json")
    args = parser.parse_args()

    params = transformer_tree(args.d_model, args.layers, vocab=2048)
    grads = transformer_tree(args.d_model, args.layers, vocab=2048, seed=1)
    size = tree_megabytes(params)
    print(f"model: {size:.0f} MB float32, {len(jax.tree.leaves(params))} leaves")

    names = ["adamw alone", *CLIPPERS, *PEERS, "optax.apply_if_finite+clip"]
    runs = {name: training_run(optimizer(name), params, grads) for name in names}

    results = interleaved(runs, rounds=args.rounds)
    base = results["clip_by_global_norm"]["median_ms"]
    alone = results["adamw alone"]["median_ms"]
    print(f"{'step':<28}{'median ms':>10}{'vs clip':>10}{'vs adamw':>10}")
    for name, r in results.items():
        r["ratio_vs_clip_by_global_norm"] = r["median_ms"] / base
        r["ratio_vs_adamw_alone"] = r["median_ms"] / alone
        print(
            f"{name:<28}{r['median_ms']:>10.2f}{r['ratio_vs_clip_by_global_norm']:>10.3f}"
            f"{r['ratio_vs_adamw_alone']:>10.3f}"
        )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write(
        str(out),
        {"machine": machine(), "model_mb": size, "rounds": args.rounds, "results": results},
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
