"""The benchmark suite: jaxclip against Optax, PyTorch and the memory-bandwidth floor.

    python benchmarks/suite.py [--quick] [--out benchmarks/results]

Writes ``suite.json`` (every figure, every sample and the machine), ``suite.md``
(the tables, each target marked met or missed) and ``time_vs_size.png`` to the
output folder. ``--quick`` runs small trees and few rounds, to check that the
suite works; the full run takes about 8 to 11 minutes on 2 cores. ``--render`` only
rewrites ``suite.md`` and the plot from an existing ``suite.json``. PyTorch is
optional: without it the PyTorch columns read "not installed".
benchmarks/README.md describes each case and the targets; cases.py runs them and
report.py writes the tables and the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from typing import Any

import cases
import report


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
        help="the accelerator's peak memory bandwidth in GB/s, when common.PEAK_GBPS lacks it",
    )
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    if args.render:
        report.write_reports(json.loads((out / "suite.json").read_text()), out)
        return

    plan = cases.QUICK if args.quick else cases.FULL
    command = "python benchmarks/suite.py" + (" --quick" if args.quick else "")
    torch = cases.load_torch()
    results: dict[str, Any] = {
        "machine": cases.machine_info(torch, command, args.peak_gbps),
        "quick": args.quick,
    }
    print(json.dumps(results["machine"], indent=1), flush=True)
    results.update(cases.run_all(plan, torch))
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_at_end"] = os.getloadavg()[0]
    results["targets"] = report.targets(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(results, indent=1))
    report.write_reports(results, out)
    print(", ".join(f"{k} {v:.0f} s" for k, v in results["seconds"].items()))


if __name__ == "__main__":
    main()
