"""`ponder frontier SWEEP_DIR [--bins level|oracle] [--cv-repeats R] [--json]`: the compute-optimal frontier of a
sweep again, held out.

Reads the trials' records under SWEEP_DIR (written by `ponder tune`), writes frontier.json, frontier.md and the
PNG plots there (`tune.frontier`: the compute-optimal choice made on one half of the problems and scored on the
other, R repeats of a stratified two-fold split) and prints the tables; --json prints the held-out compute_saving
summary per compute kind and bin (median over folds, [10th, 90th percentile], share of folds reached, test problems
per fold) as one JSON object instead. Options default to the sweep recipe's `frontier:` section.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from jobs.common import user_errors


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    from tune import frontier

    p = argparse.ArgumentParser(prog="ponder frontier", description="The compute-optimal frontier of a sweep.")
    p.add_argument("sweep", help="a sweep's output_dir")
    p.add_argument("--bins", choices=["level", "oracle"], default=None, help="difficulty bins (default: the recipe's)")
    p.add_argument("--oracle-bins", type=int, default=None, help="number of oracle-difficulty bins")
    p.add_argument("--cv-repeats", type=int, default=None, help="repeats of the two-fold split (default: 50)")
    p.add_argument("--json", action="store_true", help="print the held-out compute_saving figures as JSON")
    args = p.parse_args(argv)
    if args.cv_repeats is not None and args.cv_repeats < 1:
        p.error("--cv-repeats must be at least 1")
    if not Path(args.sweep).is_dir():
        raise FileNotFoundError(f"no sweep directory {args.sweep}")
    try:
        data, text, pngs = frontier.write(args.sweep, bins=args.bins, oracle_bins=args.oracle_bins,
                                          cv_repeats=args.cv_repeats)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({kind: {b: {"compute_saving": e["compute_saving"], "spread": e["compute_saving_spread"],
                                     "reached": e["reached"], "test_problems": e["test_problems"]}
                                 for b, e in k["bins"].items()}
                          for kind, k in data["kinds"].items()}, sort_keys=True))
    else:
        print(text)
        print(f"wrote {args.sweep}/frontier.json, frontier.md, {', '.join(p.name for p in pngs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
