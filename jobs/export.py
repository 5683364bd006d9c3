"""`ponder export RUN --parquet OUT`: a search run's, a sweep's or synthesis output's records as Parquet.

RUN: a search run's output_dir (its shard-*.jsonl), a sweep's output_dir (every trial's records, with a `trial`
column) or synthesis output (a .jsonl file, or a folder of them). OUT: a folder (local or a URI: s3://, gs://, ...),
written as part-NNNNN.parquet files; read it with `pandas.read_parquet(OUT)`, DuckDB's `'OUT/*.parquet'` or
`ray.data.read_parquet(OUT)`. The schema is in docs/design.md ("Records out as Parquet") and `app.export`.
Records stream through a batch at a time. A missing RUN, an OUT that is a file or cannot be written: one line, exit 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from jobs.common import user_errors


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    from app.export import ROWS_PER_FILE, export

    p = argparse.ArgumentParser(prog="ponder export", description="Write a run's records as Parquet.")
    p.add_argument("run", help="a search run's or a sweep's output_dir, or synthesis output (.jsonl or a folder)")
    p.add_argument("--parquet", required=True, metavar="OUT", help="the folder (or URI) to write part-*.parquet to")
    p.add_argument("--rows-per-file", type=int, default=ROWS_PER_FILE, help="rows per Parquet file")
    args = p.parse_args(argv)
    done = export(args.run, args.parquet, args.rows_per_file)
    print(f"export: {done['rows']} {done['kind']} records from {args.run} -> {args.parquet} "
          f"({len(done['files'])} file{'s' if len(done['files']) != 1 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
