"""Command line of jaxclip: jaxclip demo (or python -m jaxclip demo)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import TextIO


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _methods(text: str) -> list[str]:
    from jaxclip import demo

    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in demo.METHODS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(demo.METHODS)}"
        )
    return names


def _parser() -> argparse.ArgumentParser:
    from jaxclip import demo

    # the console script is called jaxclip; python -m runs __main__.py
    prog = "jaxclip" if os.path.basename(sys.argv[0]) == "jaxclip" else "python -m jaxclip"
    parser = argparse.ArgumentParser(prog=prog, description="Gradient clipping for JAX and Optax.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "demo",
        help="train an RNN with exploding gradients, once per clipping method",
        description="Trains a tanh RNN on a memory task (recall the first of a sequence of "
        "random values), whose gradients explode, once per clipping method; prints a table "
        "with a verdict per method and writes the history, a summary and a picture.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = demo.Config()
    run.add_argument("--steps", type=_positive_int, default=defaults.steps, help="training steps")
    run.add_argument("--seed", type=int, default=defaults.seed, help="random seed")
    run.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("jaxclip-demo"), help="output folder"
    )
    run.add_argument(
        "--methods",
        type=_methods,
        default=",".join(demo.DEFAULT_METHODS),
        metavar="NAME,NAME,...",
        help=f"the methods to run, from: {', '.join(demo.METHODS)}",
    )
    return parser


def _progress_bar(label: str, total: int, stream: TextIO = sys.stderr) -> Callable[[int], None]:
    every = max(1, total // 50)

    def show(done: int) -> None:
        if done != total and (done % every or not stream.isatty()):
            return
        filled = int(30 * done / total)
        stream.write(f"\r{label:<22} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}")
        if done == total:
            stream.write("\n")
        stream.flush()

    return show


def run_demo(args: argparse.Namespace) -> int:
    from jaxclip import demo

    config = demo.Config(steps=args.steps, seed=args.seed)
    print(
        f"A tanh RNN must recall the first of {config.seq_len} random values. Its recurrent "
        f"matrix starts with gain {config.recurrent_gain}, so gradients explode; SGD with "
        f"momentum, lr {config.learning_rate}, {config.steps} steps per method.\n"
        f"Always answering 0 gives loss {demo.BASELINE_LOSS[config.task]:.3f}; lower means "
        "the network learned the task."
    )
    methods = args.methods  # argparse applies _methods to the default too
    histories = [demo.train(m, config, _progress_bar(m, config.steps)) for m in methods]
    rows = [h.summary for h in histories]
    print("\n" + demo.format_table(rows))
    notes = [f"  {m}: {demo.NOTES[m]}" for m in methods if m in demo.NOTES]
    if notes:
        print("\n".join(["", "Notes:", *notes]))

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2))
    with open(args.out / "history.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "step", "loss", "norm", "threshold", "clipped"])
        writer.writerows(
            [h.method, i, h.loss[i], h.norm[i], h.threshold[i], int(h.clipped[i])]
            for h in histories
            for i in range(len(h.loss))
        )
    written = [args.out / "summary.json", args.out / "history.csv"]
    try:
        from jaxclip import plot
    except ImportError:
        print("\n(no picture: matplotlib is missing; pip install 'jaxclip[plot]')")
    else:
        figure = plot.demo_runs(histories, demo.BASELINE_LOSS[config.task], demo.NOTES)
        figure.savefig(args.out / "demo.png", dpi=90)
        written.append(args.out / "demo.png")
    print("\nWrote " + ", ".join(str(p) for p in written))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_demo(_parser().parse_args(argv))  # "demo", the only command


if __name__ == "__main__":
    sys.exit(main())
