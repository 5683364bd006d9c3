"""`python -m jobs.bench TARGET [--json]`: each target is a module here with

    def add_args(parser: argparse.ArgumentParser) -> None     # optional, target-specific flags
    def run(args) -> tuple[list[dict], dict]                  # (rows of the table, figures)

The dispatcher prints the rows as a table and, with --json, one JSON object of the figures as the last line.
Figures are ratios measured in one run (same machine, same moment), never asserted in tests.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Sequence

TARGETS = {
    "grading": "jobs.bench.grading",
    "engine": "jobs.bench.engine",
    "search": "jobs.bench.search",
    "serve": "jobs.bench.serve",
    "tune": "jobs.bench.tune",
    "train": "jobs.bench.train",
    "chaos": "jobs.bench.chaos",
    "records": "jobs.bench.records",
}


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in TARGETS:
        msg = f"usage: python -m jobs.bench TARGET [--json] [target flags]\ntargets: {', '.join(TARGETS)}"
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown target {argv[0]!r}\n{msg}", file=sys.stderr)
            return 2
        print(msg)
        return 0
    target = argv[0]
    module = importlib.import_module(TARGETS[target])
    parser = argparse.ArgumentParser(prog=f"python -m jobs.bench {target}")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    if hasattr(module, "add_args"):
        module.add_args(parser)
    args = parser.parse_args(argv[1:])
    had_ray = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    rows, figures = module.run(args)
    if not had_ray and "ray" in sys.modules and sys.modules["ray"].is_initialized():
        # the Ray this run started, else workers' logs, streamed late, land after the JSON line; never a caller's
        # (a test session's cluster shut down here left the next modules on Ray's 2-CPU auto-started one)
        sys.modules["ray"].shutdown()
    print(format_table(rows))
    if args.json:
        print(json.dumps(figures, sort_keys=True))
    else:
        print()
        for k, v in figures.items():
            print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    return 0
