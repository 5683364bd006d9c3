"""`ponder report RESULTS_DIR [--by-level] [--json]`: print a search run's accuracy table again.

Reads every shard under the directory (each problem once), the run's problem list (problems.json, written when the
run starts) and its failures (failures.jsonl), and prints "solved k of K, f failed, m missing" (solved: the
problem has a record, right or wrong), the accuracy per selection rule (naive, weighted, maj) and n over all K
problems (a failed or missing one is wrong), and the mean compute per solved problem (tokens, FLOPs, seconds);
--by-level adds one table per difficulty level; --json prints the summary as one JSON object instead, with the
same counts (problems = K, solved, failed, missing). It streams: each record is summed as it is read and dropped
(`app.search.results.read_run_tally`), so a run of a million records needs memory for its ids, not its records.
For a method that runs once at N (beam search, DVTS, particle filtering and Gibbs, REBASE, MCTS) the n < N columns
are marked `*` (`subsets` in the JSON): the rule over the first n of that one run's trajectories, not a run at
budget n. A run with `final_selection: sample` shows its
`naive` row as "naive (drawn)": at N it is the method's drawn answer, not the argmax (`drawn` in the JSON).
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
    from app.search.results import format_run, read_run_tally

    p = argparse.ArgumentParser(prog="ponder report", description="Print the accuracy table of a search run.")
    p.add_argument("results", nargs="+", help="output directories of search runs")
    p.add_argument("--by-level", action="store_true", help="also one table per difficulty level")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    summaries = {}
    for i, d in enumerate(args.results):
        if not Path(d).is_dir():
            raise FileNotFoundError(f"no results directory {d}")
        tally, expected, failed = read_run_tally(d, by_level=args.by_level and not args.json)
        if not tally.count and expected is None and not failed:
            raise FileNotFoundError(f"{d} holds no result shards (shard-*.jsonl) and no problems.json")
        if args.json:
            s = tally.summary(expected, failed)
            s["accuracy"] = {rule: {str(n): a for n, a in by_n.items()} for rule, by_n in s["accuracy"].items()}
            summaries[d] = s
        else:
            if i:
                print()
            print(format_run(tally, by_level=args.by_level, title=d, expected=expected, failed=failed))
    if args.json:
        print(json.dumps(summaries if len(summaries) > 1 else next(iter(summaries.values())), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
