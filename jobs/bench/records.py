"""`python -m jobs.bench records`: what `ponder report` holds and how fast `ponder export` writes, on a large run.

A search run of `--records` synthetic records (`--trajectories` trajectories of 6 steps each, selections at every
n up to N, the compute figures) is written as one shard. Each path then runs in a fresh Python process, so its
peak resident memory (ru_maxrss) is its own: `list` (every record in a list, then `summarize`, as the report did
before it streamed), `stream` (`read_run_tally`: running sums, what `ponder report` does now), and `export`
(`app.export.export` to Parquet). Peak RSS is given over a bare child's (the same imports, no records);
`report_memory_ratio` = list / stream, both over that baseline (the stream's floored at 1 MiB).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
kind, run, out = sys.argv[1:4]
from app.search.results import read_run, read_run_tally, summarize
if "export" in kind:  # imports and pyarrow's lazy ones before the clock starts
    import pyarrow as pa
    from app.export import export
    pa.Table.from_pylist([{"a": 1}])
t0 = time.perf_counter()
if kind == "list":
    records, expected, failed = read_run(run)
    s = summarize(records, expected, failed)
elif kind == "stream":
    tally, expected, failed = read_run_tally(run, by_level=True)
    s = tally.summary(expected, failed)
elif kind == "export":
    s = export(run, out)
else:  # bare_report, bare_export: the same imports, no records
    s = {}
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "problems": s.get("problems"), "rows": s.get("rows")}))
"""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", type=int, default=20000, help="records in the synthetic run (default 20000)")
    parser.add_argument("--trajectories", type=int, default=16, help="trajectories per record (default 16)")


def write_run(d: Path, records: int, trajectories: int) -> int:
    step = "(12 + 7) - 3 = 19 - 3, so we carry on with the next operation.\n\n"
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n <= trajectories]
    with open(d / "shard-bench.jsonl", "w", encoding="utf-8") as f:
        for i in range(records):
            rec = {"id": f"p{i}", "question": f"What is {i} + 1?", "gold": str(i + 1), "level": 1 + i % 5,
                   "method": "best_of_n", "config": {"n": trajectories, "temperature": 0.8}, "N": trajectories,
                   "agg_strategy": "last", "grouping": "equivalence",
                   "trajectories": [{"steps": [step] * 6, "scores": [0.5] * 6, "finished": True,
                                     "finish_reason": "eos", "tokens": 120, "group": None, "answer": str(i + 1),
                                     "correct": k % 2 == 0} for k in range(trajectories)],
                   "selection": {rule: {str(n): {"index": 0, "answer": str(i + 1), "correct": (i + n) % 3 > 0}
                                        for n in ns} for rule in ("naive", "weighted", "maj")},
                   "compute": {"prompt_tokens": 30.0 * trajectories, "generated_tokens": 120.0 * trajectories,
                               "prm_tokens": 150.0 * trajectories, "flops": 1e9, "seconds": 0.5,
                               "computed_flops": 5e8, "computed_prompt_tokens": 30.0, "computed_generated_tokens":
                               120.0 * trajectories, "computed_prm_tokens": 150.0}}
            f.write(json.dumps(rec) + "\n")
    return (d / "shard-bench.jsonl").stat().st_size


def _child(kind: str, run: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, kind, str(run), str(out)], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args) -> tuple[list[dict], dict]:
    with tempfile.TemporaryDirectory(prefix="ponder-bench-records-") as tmp:
        d = Path(tmp) / "run"
        d.mkdir()
        size = write_run(d, args.records, args.trajectories)
        kinds = ("bare_report", "list", "stream", "bare_export", "export")
        res = {kind: _child(kind, d, Path(tmp) / "parquet") for kind in kinds}
        parquet = sum(p.stat().st_size for p in (Path(tmp) / "parquet").glob("*.parquet"))
    bare, bare_export = res["bare_report"]["rss_mib"], res["bare_export"]["rss_mib"]
    rows = [{"path": k, "seconds": res[k]["seconds"], "peak_rss_mib": res[k]["rss_mib"],
             "over_bare_mib": res[k]["rss_mib"] - (bare_export if "export" in k else bare)} for k in kinds]
    assert res["list"]["problems"] == res["stream"]["problems"] == args.records
    assert res["export"]["rows"] == args.records
    figures = {
        "records": args.records, "shard_mib": size / 2**20, "parquet_mib": parquet / 2**20,
        "report_rss_over_bare_mib_list": res["list"]["rss_mib"] - bare,
        "report_rss_over_bare_mib_stream": res["stream"]["rss_mib"] - bare,
        "report_memory_ratio": (res["list"]["rss_mib"] - bare) / max(res["stream"]["rss_mib"] - bare, 1.0),
        "report_seconds_list": res["list"]["seconds"], "report_seconds_stream": res["stream"]["seconds"],
        "export_records_per_s": args.records / res["export"]["seconds"],
        "export_rss_over_bare_mib": res["export"]["rss_mib"] - bare_export,
    }
    return rows, figures

