"""Does each clipper help when the learning rate is too high? The RNN experiment, every method.

    python benchmarks/spike_experiment.py [--lr 0.05] [--seeds 3] [--steps 800]

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

import numpy as np
from common import machine, write

from jaxclip import demo


def best_window(loss: np.ndarray, width: int = 100) -> float:
    finite = np.where(np.isfinite(loss), loss, np.inf)
    if len(finite) < width:
        return float(np.mean(finite))
    return float(np.min(np.convolve(finite, np.ones(width) / width, mode="valid")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--out", default="benchmarks/results/spike_experiment")
    args = parser.parse_args()

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
