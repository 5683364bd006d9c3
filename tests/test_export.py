"""Problems from Parquet and URIs through the search job, `ponder export` to Parquet, and the streaming report.

The search job runs for real through Ray with the scripted pools of tests/test_search_job.py (no models), so a
run's records exist in seconds; export and report read them back.
"""
from __future__ import annotations

import functools
import json
import shutil

import pytest

import jobs.search as job
from app.export import record_of
from app.search.results import format_report, format_run, read_records, read_run, read_run_tally, summarize
from actors.pools import Pools
from jobs import cli
from tests.job_helpers import lines, summary_of
from tests.scripted import ScriptedPolicy, ScriptedPool, ScriptedPRM
from tests.test_search_job import world, world_prm

PROBLEMS = [{"id": f"q{i}", "question": f"What is {i} + 0?", "answer": str(i % 3), "level": 1 + i % 2}
            for i in range(6)]


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def recipe(tmp_path, source, name):
    out = tmp_path / f"out-{name}"
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"job: search\ndata: {{source: '{source}'}}\nprompt: {{template: toy}}\nmethod: best_of_n\n"
                    f"search: {{n: 4}}\nprm: {{model: scripted}}\noutput_dir: {out}\nmax_in_flight: 3\n"
                    "progress: false\n")
    return path, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_cluster):
    """Two search runs: problems from a Parquet file, and from a file:// URI of a folder of Parquet shards."""
    mp = pytest.MonkeyPatch()  # the scripted pools of tests/test_search_job.py, once for the module
    mp.setattr(job, "start_pools", lambda policy_cfg, prm_cfg: Pools(
        ScriptedPool(functools.partial(ScriptedPolicy, world, marker="Answer:\n\n")),
        ScriptedPool(functools.partial(ScriptedPRM, world_prm))))
    mp.setattr(job, "pool_configs", lambda cfg: (None, None))
    tmp = tmp_path_factory.mktemp("export")
    parquet = write_parquet(tmp / "problems.parquet", PROBLEMS)
    write_parquet(tmp / "shards" / "part-0.parquet", PROBLEMS[:4])
    write_parquet(tmp / "shards" / "part-1.parquet", PROBLEMS[4:])
    outs = {}
    for name, source in [("file", parquet), ("uri", (tmp / "shards").as_uri())]:
        path, out = recipe(tmp, source, name)
        assert job.main(["--config", str(path)]) == 0
        outs[name] = out
    yield tmp, outs
    mp.undo()


def test_search_reads_problems_from_a_parquet_file_and_a_uri_of_shards(runs, capsys):
    _, outs = runs
    for out in outs.values():
        assert sorted(r["id"] for r in lines(out)) == [p["id"] for p in PROBLEMS]
        s = summary_of(out, capsys)
        assert (s["problems"], s["solved"]) == (6, 6) and set(s["accuracy"]["maj"]) == {"1", "2", "4"}
    levels = {r["id"]: r["level"] for r in lines(outs["uri"])}
    assert levels == {p["id"]: p["level"] for p in PROBLEMS}


def test_export_round_trips_a_run_and_a_sweep(runs, tmp_path, capsys):
    import pandas as pd
    import pyarrow.parquet as pq

    _, outs = runs
    run = outs["file"]
    records = read_records(run)
    assert cli.main(["export", str(run), "--parquet", str(tmp_path / "pq"), "--rows-per-file", "4"]) == 0
    assert "export: 6 search records" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "pq").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    rows = pq.read_table(tmp_path / "pq").to_pylist()
    assert len(rows) == len(records) == 6
    assert [record_of(r) for r in rows] == records  # every field of every record
    df = pd.read_parquet(tmp_path / "pq")
    assert list(df.columns[:6]) == ["id", "question", "gold", "level", "method", "N"]
    assert df["level"].dtype == "int64" and set(df["method"]) == {"best_of_n"} and set(df["N"]) == {4}
    assert df["trajectories"].map(len).tolist() == [len(r["trajectories"]) for r in records]
    first = df.iloc[0]
    assert {(c["rule"], c["n"]) for c in first["selection"]} == {(rule, int(n)) for rule, by_n in
                                                                  records[0]["selection"].items() for n in by_n}
    assert json.loads(first["config"]) == records[0]["config"]
    assert first["compute"]["flops"] == records[0]["compute"]["flops"]

    # exported again with fewer files: the old extra part is gone
    assert cli.main(["export", str(run), "--parquet", str(tmp_path / "pq")]) == 0
    assert [p.name for p in (tmp_path / "pq").iterdir()] == ["part-00000.parquet"]

    # a sweep: every trial's records, with the trial's name
    sweep = tmp_path / "sweep"
    for name, out in outs.items():
        shutil.copytree(out, sweep / "trials" / f"best_of_n-{name}")
    (sweep / "sweep.json").write_text("{}")
    assert cli.main(["export", str(sweep), "--parquet", (tmp_path / "sw").as_uri()]) == 0
    df = pd.read_parquet(tmp_path / "sw")
    assert len(df) == 12 and df.columns[0] == "trial"
    assert df.groupby("trial").size().to_dict() == {"best_of_n-file": 6, "best_of_n-uri": 6}


def test_fields_outside_the_schema_round_trip_through_extra():
    import pyarrow as pa

    from app.export import search_row, search_schema

    rec = {"id": "a", "question": "Q", "gold": "1", "level": "Level ?", "method": "mcts", "N": 2,
           "config": {"n": 2, "c_puct": 1.5}, "trajectories": [{"steps": ["s"], "scores": None, "value": 0.3}],
           "selection": {"naive": {"2": {"index": 0, "answer": "1", "correct": True}}},
           "compute": {"flops": 3.0, "tree_nodes": 7}, "note": {"any": ["thing"]}}
    [row] = pa.Table.from_pylist([search_row(rec)], schema=search_schema()).to_pylist()
    assert row["level"] is None and json.loads(row["extra"])["level"] == "Level ?"
    assert record_of(row) == rec


def test_export_of_synthesis_output_keeps_its_fields(tmp_path, capsys):
    import pandas as pd

    out = tmp_path / "pairs.jsonl"
    recs = [{"problem_id": f"p{i // 2}", "steps": [f"s{i}", "t"], "soft": [1.0, 0.5], "eos": i % 2 == 0,
             "meta": {"k": 1} if i % 2 else "plain"} for i in range(6)]
    out.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"problem_id": "p3", "ste')  # a torn last line
    (tmp_path / "pairs.jsonl.done").write_text("".join(json.dumps({"problem_id": f"p{i}", "records": 2}) + "\n"
                                                      for i in range(2)))  # p2 unfinished
    assert cli.main(["export", str(out), "--parquet", str(tmp_path / "pq")]) == 0
    assert "export: 4 synthesis records" in capsys.readouterr().out
    df = pd.read_parquet(tmp_path / "pq")
    assert df["problem_id"].tolist() == ["p0", "p0", "p1", "p1"]
    assert [list(s) for s in df["steps"]] == [r["steps"] for r in recs[:4]]  # a list column, not text
    assert df["eos"].dtype == bool
    assert [json.loads(m) for m in df["meta"]] == [r["meta"] for r in recs[:4]]  # no common type: JSON text


def test_export_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys):
    _, outs = runs
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [([str(tmp_path / "nope"), "--parquet", str(tmp_path / "o")], "no such file or folder"),
             ([str(tmp_path / "empty"), "--parquet", str(tmp_path / "o")], "not a run ponder wrote"),
             ([str(outs["file"]), "--parquet", str(tmp_path / "a_file")], "is a file, not a directory"),
             ([str(outs["file"]), "--parquet", str(tmp_path / "a_file" / "sub")], "--parquet"),
             ([str(outs["file"]), "--parquet", "/proc/ponder-export"], "cannot write")]
    for argv, msg in cases:
        capsys.readouterr()
        assert cli.main(["export", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert msg in err and err.count("\n") == 0, err


# ------------------------------------------------------------------ the report streams


def test_streamed_report_is_the_summary_of_the_records(runs, tmp_path, capsys):
    _, outs = runs
    run = tmp_path / "run"
    shutil.copytree(outs["file"], run)
    # a record beyond the plan with a level of its own, a failure, and problems never run
    extra = dict(read_records(run)[0], id="x1", level="Level ?")
    with open(next(run.glob("shard-*.jsonl")), "a") as f:
        f.write(json.dumps(extra) + "\n")
    (run / "failures.jsonl").write_text(json.dumps({"id": "q9", "error": "boom"}) + "\n")
    plan = json.loads((run / "problems.json").read_text())
    plan["problems"] += [{"id": "q7", "level": 2}, {"id": "q8", "level": 3}]
    (run / "problems.json").write_text(json.dumps(plan))

    records, expected, failed = read_run(run)
    tally, expected2, failed2 = read_run_tally(run, by_level=True)
    assert (expected2, failed2) == (expected, failed)
    s = tally.summary(expected, failed)
    assert s == summarize(records, expected, failed)
    assert (s["problems"], s["solved"], s["failed"], s["missing"]) == (10, 7, 1, 2)
    assert format_run(tally, True, "t", expected, failed) == format_report(records, True, "t", expected, failed)
    assert summary_of(run, capsys) == json.loads(json.dumps({**s, "accuracy": {
        r: {str(n): a for n, a in by_n.items()} for r, by_n in s["accuracy"].items()}}))


def test_report_holds_no_records_while_it_reads(tmp_path):
    """The streaming path's peak memory is a small part of the list path's on a run of large records."""
    import tracemalloc

    from app.search.results import ResultsWriter

    step = "x" * 200
    with ResultsWriter(tmp_path) as w:
        for i in range(200):
            w.write({"id": f"p{i}", "level": 1, "method": "best_of_n", "N": 32,
                     "trajectories": [{"steps": [step] * 6, "scores": [0.5] * 6} for _ in range(32)],
                     "selection": {"maj": {"32": {"correct": i % 2 == 0}}}, "compute": {"flops": 1.0}})

    def peak(fn):
        tracemalloc.start()
        try:
            result = fn()
            return tracemalloc.get_traced_memory()[1], result
        finally:
            tracemalloc.stop()

    listed, (records, expected, failed) = peak(lambda: read_run(tmp_path))
    streamed, (tally, _, _) = peak(lambda: read_run_tally(tmp_path, by_level=True))
    assert tally.summary(expected, failed) == summarize(records, expected, failed)
    print(f"peak traced memory: list {listed / 2**20:.1f} MiB, streamed {streamed / 2**20:.2f} MiB")
    assert streamed * 10 < listed, (streamed, listed)
