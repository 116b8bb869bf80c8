"""Does each clipper help when the learning rate is too high? Two experiments.

    python benchmarks/spike_experiment.py [--lr 0.05] [--seeds 3] [--steps 800]
    python benchmarks/spike_experiment.py --model transformer [--lr 0.02] [--seeds 5]
                                          [--steps 600]

The transformer experiment: a character-level transformer (char_transformer.py)
trained with AdamW at a learning rate high enough to be unstable, with bad
batches injected (random characters whose loss is weighted ``--bad-scale``
times, at ``--bad-batches`` random steps after the first 100): no clipping,
clip_by_global_norm(1.0), zclip and adagc at their authors' recommended
settings (the defaults), spike_aware and stable_update around the AdamW, and
skip_on_spike around it. Reported per method, over seeds: loss spikes (on the
clean batches, a loss above 1.5x the median of the 50 before), diverged runs
(final loss not finite or above the unigram entropy of the text, what predicting
each character by its frequency gives) and the final loss (mean of the last 10%
of clean steps). Results go to
benchmarks/results/spike_experiment_transformer.{json,md,png}.

The RNN experiment:
A tanh RNN on the adding problem (jaxclip.demo, task "adding", 30 steps,
recurrent gain 1.5), SGD with momentum at a
learning rate high enough that training without clipping, and with a fixed
clip, spikes. Each method runs on the same seeds; the table reports the mean
over seeds of the final loss (mean of the last 10% of steps; predicting the
mean gives 0.167), the best 100-step average, loss spikes (loss above 3x the
median of the previous 50 steps, non-finite losses included) and non-finite
steps. Results go to benchmarks/results/spike_experiment.{json,md}.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import machine, write

import jaxclip
from jaxclip import demo

# each wraps the AdamW it is given
TRANSFORMER_METHODS = {
    "none": lambda opt: opt,
    "clip_by_global_norm": lambda opt: optax.chain(jaxclip.clip_by_global_norm(1.0), opt),
    "zclip": lambda opt: optax.chain(jaxclip.zclip(), opt),
    "adagc": lambda opt: optax.chain(jaxclip.adagc(), opt),
    "spike_aware": lambda opt: jaxclip.spike_aware(opt),
    "stable_update": lambda opt: jaxclip.stable_update(opt),
    "skip_on_spike": lambda opt: jaxclip.skip_on_spike(opt),
}


def best_window(loss: np.ndarray, width: int = 100) -> float:
    finite = np.where(np.isfinite(loss), loss, np.inf)
    if len(finite) < width:
        return float(np.mean(finite))
    return float(np.min(np.convolve(finite, np.ones(width) / width, mode="valid")))


def train_transformer(method: str, args: argparse.Namespace, seed: int) -> dict:
    """One run: the losses of the clean steps, and which steps were bad."""
    import char_transformer as ct

    model = ct.Model()
    data = jnp.asarray(ct.corpus())
    params = ct.init(jax.random.PRNGKey(seed), model)
    tx = TRANSFORMER_METHODS[method](optax.adamw(args.lr))
    rng = np.random.default_rng(seed)
    bad = np.zeros(args.steps, bool)
    bad[rng.choice(np.arange(100, args.steps), args.bad_batches, replace=False)] = True

    def body(carry: tuple, xs: tuple) -> tuple:
        params, state = carry
        key, is_bad = xs
        k_batch, k_noise = jax.random.split(key)
        tokens = ct.batch(k_batch, data, args.batch, model)
        noise = jax.random.randint(k_noise, tokens.shape, 0, ct.VOCAB)
        tokens = jnp.where(is_bad, noise, tokens)
        weight = jnp.where(is_bad, args.bad_scale, 1.0)
        loss, grads = jax.value_and_grad(lambda p: weight * ct.loss(p, tokens, model))(params)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss / weight

    keys = jax.random.split(jax.random.PRNGKey(1000 + seed), args.steps)
    run = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), (keys, jnp.asarray(bad)))[1])
    loss = np.asarray(run(params), np.float64)
    clean = loss[~bad]
    tail = clean[-max(1, len(clean) // 10) :]
    final = float(np.mean(tail)) if np.all(np.isfinite(tail)) else float("nan")
    return {
        "loss": clean,
        "final": final,
        # a cross-entropy near 2.5 rarely triples: 1.5x the recent median is a spike here
        "spikes": demo.count_spikes(clean, factor=1.5),
        "diverged": bool(not np.isfinite(final) or final > ct.unigram_entropy()),
    }


def transformer_experiment(args: argparse.Namespace) -> None:
    rows, curves = [], {}
    for method in TRANSFORMER_METHODS:
        runs = [train_transformer(method, args, seed) for seed in range(args.seeds)]
        curves[method] = runs[0]["loss"]
        finals = [r["final"] for r in runs]
        row = {
            "method": method,
            "loss per seed": [np.round(r["loss"], 4).tolist() for r in runs],
            "loss spikes (mean)": float(np.mean([r["spikes"] for r in runs])),
            "diverged runs": int(sum(r["diverged"] for r in runs)),
            "final loss (mean)": float(np.mean(finals)),
            "final loss per seed": [round(f, 3) for f in finals],
        }
        rows.append(row)
        print(
            f"{method:<20} spikes {row['loss spikes (mean)']:.1f} diverged "
            f"{row['diverged runs']}/{args.seeds} final {row['final loss (mean)']:.4f} "
            f"{row['final loss per seed']}",
            flush=True,
        )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write(str(out.with_suffix(".json")), {"machine": machine(), "args": vars(args), "rows": rows})
    table = [
        "| method | loss spikes (mean of seeds) | diverged runs | final loss (mean) | per seed |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['method']} | {r['loss spikes (mean)']:.1f} | {r['diverged runs']}/{args.seeds} "
            f"| {r['final loss (mean)']:.4f} | {r['final loss per seed']} |"
        )
    out.with_suffix(".md").write_text(
        f"Character-level transformer, AdamW lr {args.lr}, {args.steps} steps, "
        f"{args.bad_batches} bad batches (loss x{args.bad_scale:g}), {args.seeds} seeds\n\n"
        + "\n".join(table)
        + "\n"
    )
    try:
        from jaxclip import plot
    except ImportError:
        print("no plot: matplotlib is missing")
    else:
        fig = plot.losses(curves, title=f"clean-batch loss, seed 0, lr {args.lr}")
        fig.savefig(out.with_suffix(".png"), dpi=90, bbox_inches="tight")
    print(f"wrote {out}.json and {out}.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=("rnn", "transformer"), default="rnn")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--bad-batches", type=int, default=6)
    parser.add_argument("--bad-scale", type=float, default=100.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    transformer = args.model == "transformer"
    defaults = (0.02, 5, 600) if transformer else (0.05, 3, 800)
    args.lr = defaults[0] if args.lr is None else args.lr
    args.seeds = defaults[1] if args.seeds is None else args.seeds
    args.steps = defaults[2] if args.steps is None else args.steps
    if args.out is None:
        suffix = "_transformer" if transformer else ""
        args.out = f"benchmarks/results/spike_experiment{suffix}"
    if transformer:
        transformer_experiment(args)
        return

    rows = []
    for method in demo.METHODS:
        runs = []
        for seed in range(args.seeds):
            config = demo.Config(
                steps=args.steps,
                seed=seed,
                task="adding",
                seq_len=30,
                recurrent_gain=1.5,
                learning_rate=args.lr,
            )
            h = demo.train(method, config)
            runs.append(
                {
                    "final": h.summary["final loss"],
                    "best100": best_window(h.loss),
                    "spikes": h.summary["loss spikes"],
                    "nonfinite": h.summary["non-finite loss steps"],
                    "clipped": h.summary["clipped steps"],
                }
            )
        finals = np.array([r["final"] for r in runs])
        row = {
            "method": method,
            "final loss (mean)": float(np.mean(finals)),
            "final loss per seed": [round(float(f), 4) for f in finals],
            "best 100-step loss": float(np.mean([r["best100"] for r in runs])),
            "loss spikes": float(np.mean([r["spikes"] for r in runs])),
            "non-finite steps": float(np.mean([r["nonfinite"] for r in runs])),
            "clipped steps": float(np.mean([r["clipped"] for r in runs])),
        }
        rows.append(row)
        print(
            f"{method:<20} final {row['final loss (mean)']:.4g} {row['final loss per seed']} "
            f"best100 {row['best 100-step loss']:.4f} spikes {row['loss spikes']:.1f} "
            f"non-finite {row['non-finite steps']:.1f}",
            flush=True,
        )

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write(str(out.with_suffix(".json")), {"machine": machine(), "args": vars(args), "rows": rows})
    table = [
        "| method | final loss (mean of seeds) | per seed | best 100-step | spikes | "
        "non-finite steps |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['method']} | {r['final loss (mean)']:.4g} | {r['final loss per seed']} | "
            f"{r['best 100-step loss']:.4f} | {r['loss spikes']:.1f} | "
            f"{r['non-finite steps']:.1f} |"
        )
    out.with_suffix(".md").write_text(
        f"RNN adding problem, lr {args.lr}, {args.steps} steps, {args.seeds} seeds\n\n"
        + "\n".join(table)
        + "\n"
    )
    print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
