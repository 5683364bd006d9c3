"""`ponder report RESULTS_DIR [--by-level] [--json]`: print a search run's accuracy table again.

Reads every shard under the directory (each problem once) and prints accuracy per selection rule (naive, weighted,
maj) and n, and the mean compute per problem (tokens, FLOPs, seconds); --by-level adds one table per difficulty
level; --json prints the summary as one JSON object instead.
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
    from app.search.results import format_report, read_records, shard_files, summarize

    p = argparse.ArgumentParser(prog="ponder report", description="Print the accuracy table of a search run.")
    p.add_argument("results", nargs="+", help="output directories of search runs")
    p.add_argument("--by-level", action="store_true", help="also one table per difficulty level")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    summaries = {}
    for i, d in enumerate(args.results):
        if not Path(d).is_dir():
            raise FileNotFoundError(f"no results directory {d}")
        if not shard_files(d):
            raise FileNotFoundError(f"{d} holds no result shards (shard-*.jsonl)")
        records = read_records(d)
        if args.json:
            s = summarize(records)
            s["accuracy"] = {rule: {str(n): a for n, a in by_n.items()} for rule, by_n in s["accuracy"].items()}
            summaries[d] = s
        else:
            if i:
                print()
            print(format_report(records, by_level=args.by_level, title=d))
    if args.json:
        print(json.dumps(summaries if len(summaries) > 1 else next(iter(summaries.values())), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
