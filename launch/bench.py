"""`make bench`: every stage's benchmark in one run, printing ratios measured side by side.

A stage's bench modules are named in the stage table (``Stage.bench``, pipeline/core/stages.py); each
owns a ``run_bench(quick: bool) -> list[dict]`` (rows of measured numbers). This runs them in
order and prints one table per module. `--only embed,cluster` picks stages; `--quick` shrinks
sizes (used by the test that keeps the benchmarks runnable).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from pipeline.core.stages import BENCHES


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n## {title}")
    if not rows:
        print("(no rows)")
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")


def cli(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mlcd bench")
    ap.add_argument("--only", default=",".join(BENCHES))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None, help="also write all rows here")
    args = ap.parse_args(argv)
    names = args.only.split(",")
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"--only {','.join(unknown)}: no bench; stages with one: {', '.join(BENCHES)}")
    results = {}
    for name in names:
        for module in BENCHES[name]:
            t0 = time.perf_counter()
            rows = importlib.import_module(module).run_bench(quick=args.quick)
            results[module] = rows
            print_table(f"{name}: {module} ({time.perf_counter() - t0:.0f} s)", rows)
            sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
