"""Per-leaf and per-row clipping in a jitted AdamW step when some units are all zero.

    python benchmarks/zero_units.py [--rounds 20] [--out benchmarks/results/zero_units.json]

A unit whose gradient is exactly zero (a frozen bias, embedding rows no token
used, a layer cut off from the loss) has a zero sum of squares, as one whose
elements underflow does. jaxclip tells the two apart in its first pass where
the units are small, so only underflow runs the second pass. Each gradient
below is clipped by ``clip_by_global_norm``, ``clip_by_norm`` (one norm per
leaf) and ``clip_by_norm(axis=-1)`` (one per row) inside the same AdamW step,
interleaved; reported: the median step and its ratio to the global-norm
clip's step on the same gradient.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import optax
from common import interleaved, machine, training_run, transformer_tree, tree_megabytes, write

import jaxclip

CLIPPERS = {
    "clip_by_global_norm": lambda: jaxclip.clip_by_global_norm(1.0),
    "clip_by_norm": lambda: jaxclip.clip_by_norm(1.0),
    "clip_by_norm(axis=-1)": lambda: jaxclip.clip_by_norm(1.0, axis=-1),
}


def gradients(d_model: int, layers: int, vocab: int) -> dict[str, dict]:
    """The dense gradient, and copies with one kind of zero unit each."""
    dense = transformer_tree(d_model, layers, vocab, seed=1)

    def with_zero(edit) -> dict:
        tree = jax.tree.map(jnp.copy, dense)
        edit(tree)
        return tree

    def zero_bias(t: dict) -> None:
        t["final_norm"] = jnp.zeros_like(t["final_norm"])

    def zero_rows(t: dict) -> None:
        t["embed"] = t["embed"].at[::2].set(0)

    def zero_large_leaf(t: dict) -> None:
        up = t["layer000"]["mlp"]["up"]
        t["layer000"]["mlp"]["up"] = jnp.zeros_like(up)

    return {
        "no zero unit": dense,
        "one zero bias": with_zero(zero_bias),
        "every other embedding row zero": with_zero(zero_rows),
        "one zero large leaf": with_zero(zero_large_leaf),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--out", default="benchmarks/results/zero_units.json")
    args = parser.parse_args()

    params = transformer_tree(args.d_model, args.layers, args.vocab)
    size = tree_megabytes(params)
    print(f"model: {size:.0f} MB float32, {len(jax.tree.leaves(params))} leaves")

    report = {}
    for case, grads in gradients(args.d_model, args.layers, args.vocab).items():
        runs = {
            clipper: training_run(optax.chain(make(), optax.adamw(1e-4)), params, grads)
            for clipper, make in CLIPPERS.items()
        }
        results = interleaved(runs, rounds=args.rounds)
        base = results["clip_by_global_norm"]["median_ms"]
        for clipper, r in results.items():
            r["ratio_vs_clip_by_global_norm"] = r["median_ms"] / base
            print(
                f"{case:<32}{clipper:<24}{r['median_ms']:>9.2f} ms"
                f"{r['ratio_vs_clip_by_global_norm']:>8.3f}x"
            )
        report[case] = results

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "model_mb": size, "rounds": args.rounds, "results": report}
    write(str(out), payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
