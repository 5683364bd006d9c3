"""Records out for analysis: a search run, a sweep or synthesis output as Parquet (`ponder export RUN --parquet OUT`).

OUT is a folder of `part-NNNNN.parquet` files (`rows_per_file` rows each, row groups of ~32 MiB), so pandas
(`pd.read_parquet(OUT)`), DuckDB (`SELECT * FROM 'OUT/*.parquet'`) and Ray Data (`ray.data.read_parquet(OUT)`)
read it whole. Records are read and written a batch at a time: a run of any size is exported in bounded memory.

Search records (a run, or every trial of a sweep) have one fixed schema, `SEARCH_SCHEMA`, the same for every method,
so runs concatenate: the fields every record has are typed columns; `trajectories` is a list of structs;
`selection` (rule -> n -> choice in the record) is a long list of (rule, n, index, answer, correct) structs, since
its keys vary with N; `compute` is a struct of float64 figures; `config` (its keys vary by method) and `extra`
(any other field, a compute figure not in `COMPUTE_FIELDS`, a level that is not a number) are JSON text.
`record_of(row)` turns a row back into the record. A sweep adds `trial` (the trial's folder name) first.

Synthesis output (JSONL files whose shape depends on the job) keeps its own fields: each becomes a column of the
type pyarrow infers over all records (lists and structs stay nested); a field whose values have no common type is
JSON text. Records of a problem that the `.done` file does not list (a killed job's last problem) are left out,
as the job itself drops them on restart.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from app.config import ConfigError

BATCH = 256  # records converted to Arrow at a time
ROW_GROUP_BYTES = 32 * 2**20  # Arrow bytes buffered per Parquet row group
ROWS_PER_FILE = 100_000
PART = "part-{:05d}.parquet"
COMPUTE_FIELDS = ("prompt_tokens", "generated_tokens", "prm_tokens", "policy_flops", "prm_flops", "flops",
                  "policy_calls", "prm_calls", "computed_prompt_tokens", "computed_generated_tokens",
                  "computed_prm_tokens", "computed_policy_flops", "computed_prm_flops", "computed_flops", "seconds",
                  "task_seconds")
TOP_FIELDS = ("id", "question", "gold", "level", "method", "N", "agg_strategy", "grouping", "config", "trajectories",
              "selection", "compute")
TRAJECTORY_FIELDS = ("steps", "scores", "finished", "finish_reason", "tokens", "group", "answer", "correct")


def search_schema(trial: bool = False):
    import pyarrow as pa

    trajectory = pa.struct([("steps", pa.list_(pa.string())), ("scores", pa.list_(pa.float64())),
                            ("finished", pa.bool_()), ("finish_reason", pa.string()), ("tokens", pa.int64()),
                            ("group", pa.int64()), ("answer", pa.string()), ("correct", pa.bool_())])
    choice = pa.struct([("rule", pa.string()), ("n", pa.int64()), ("index", pa.int64()), ("answer", pa.string()),
                        ("correct", pa.bool_())])
    fields = [("id", pa.string()), ("question", pa.string()), ("gold", pa.string()), ("level", pa.int64()),
              ("method", pa.string()), ("N", pa.int64()), ("agg_strategy", pa.string()), ("grouping", pa.string()),
              ("config", pa.string()), ("trajectories", pa.list_(trajectory)), ("selection", pa.list_(choice)),
              ("compute", pa.struct([(k, pa.float64()) for k in COMPUTE_FIELDS])), ("extra", pa.string())]
    return pa.schema(([("trial", pa.string())] if trial else []) + fields)


def _str(x: Any) -> str | None:
    return None if x is None else str(x)


def _int(x: Any) -> int | None:
    return None if x is None else int(x)


def search_row(rec: dict) -> dict:
    """One search record as a row of `search_schema()`."""
    extra = {k: v for k, v in rec.items() if k not in TOP_FIELDS}
    level = rec.get("level")
    if level is not None and not isinstance(level, int):
        extra["level"], level = level, None
    compute = dict(rec.get("compute") or {})
    others = {k: v for k, v in compute.items() if k not in COMPUTE_FIELDS}
    if others:
        extra["compute"] = others
    trajectories = [{"steps": [str(s) for s in t.get("steps") or []],
                     "scores": None if t.get("scores") is None else [float(s) for s in t["scores"]],
                     "finished": t.get("finished"), "finish_reason": _str(t.get("finish_reason")),
                     "tokens": _int(t.get("tokens")), "group": _int(t.get("group")), "answer": _str(t.get("answer")),
                     "correct": t.get("correct")}
                    for t in rec.get("trajectories") or []]
    if any(set(t) - set(TRAJECTORY_FIELDS) for t in rec.get("trajectories") or []):
        extra["trajectories"] = rec["trajectories"]  # a field this schema does not know: the original, whole
    selection = [{"rule": rule, "n": int(n), "index": _int(c.get("index")), "answer": _str(c.get("answer")),
                  "correct": c.get("correct")}
                 for rule, by_n in (rec.get("selection") or {}).items() for n, c in by_n.items()]
    return {"id": _str(rec.get("id")), "question": _str(rec.get("question")), "gold": _str(rec.get("gold")),
            "level": level, "method": _str(rec.get("method")), "N": _int(rec.get("N")),
            "agg_strategy": _str(rec.get("agg_strategy")), "grouping": _str(rec.get("grouping")),
            "config": None if rec.get("config") is None else json.dumps(rec["config"], sort_keys=True),
            "trajectories": trajectories, "selection": selection,
            "compute": {k: (None if compute.get(k) is None else float(compute[k])) for k in COMPUTE_FIELDS},
            "extra": json.dumps(extra, sort_keys=True, ensure_ascii=False) if extra else None}


def record_of(row: dict) -> dict:
    """A row of `search_schema()` (as pyarrow's `to_pylist` gives it) back as the search record."""
    extra = json.loads(row["extra"]) if row.get("extra") else {}
    rec = {k: row[k] for k in ("id", "question", "gold", "level", "method", "N")}
    for k in ("agg_strategy", "grouping"):
        if row.get(k) is not None:
            rec[k] = row[k]
    if row.get("config") is not None:
        rec["config"] = json.loads(row["config"])
    rec["trajectories"] = extra.pop("trajectories", None) or [dict(t) for t in row["trajectories"] or []]
    selection: dict[str, dict[str, dict]] = {}
    for c in row["selection"] or []:
        selection.setdefault(c["rule"], {})[str(c["n"])] = {"index": c["index"], "answer": c["answer"],
                                                             "correct": c["correct"]}
    rec["selection"] = selection
    rec["compute"] = {k: v for k, v in (row["compute"] or {}).items() if v is not None}
    rec["compute"].update(extra.pop("compute", {}))
    rec.update(extra)
    return rec


# ---------------------------------------------------------------- what RUN is


def run_kind(run: str | Path) -> str:
    """"search", "sweep" or "synthesis"; FileNotFoundError (one line) for anything else."""
    from app.search.results import PLAN_FILE, shard_files

    d = Path(run)
    if d.is_file() and d.suffix == ".jsonl":
        return "synthesis"
    if d.is_dir():
        if (d / "sweep.json").is_file() or (d / "trials").is_dir():
            return "sweep"
        if shard_files(d) or (d / PLAN_FILE).is_file():
            return "search"
        if _jsonl_files(d):
            return "synthesis"
    what = "no such file or folder" if not d.exists() else "not a run ponder wrote"
    raise FileNotFoundError(f"{run}: {what}; give a search run's output_dir (shard-*.jsonl), a sweep's output_dir "
                            "(sweep.json, trials/) or synthesis output (a .jsonl file or a folder of them)")


def _jsonl_files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*.jsonl") if not any(part.startswith(".") for part in p.relative_to(d).parts))


def _trial_dirs(sweep: Path) -> list[Path]:
    from app.search.results import PLAN_FILE, shard_files

    trials = sweep / "trials"
    return sorted(t for t in trials.iterdir() if t.is_dir() and (shard_files(t) or (t / PLAN_FILE).is_file())) \
        if trials.is_dir() else []


def _search_rows(run: Path, kind: str) -> Iterator[dict]:
    from app.search.results import iter_records

    if kind == "search":
        for rec in iter_records(run):
            yield search_row(rec)
        return
    for t in _trial_dirs(run):
        for rec in iter_records(t):
            yield {"trial": t.name, **search_row(rec)}


def _synthesis_records(run: Path) -> Iterator[dict]:
    """Every whole JSON line of the output file(s); of a problem missing from the `.done` file, none."""
    for path in [run] if run.is_file() else _jsonl_files(run):
        done_file = Path(str(path) + ".done")
        done = None
        if done_file.is_file():
            done = {str(r.get("problem_id")) for r in _json_lines(done_file)}
        for rec in _json_lines(path):
            if done is None or "problem_id" not in rec or str(rec["problem_id"]) in done:
                yield rec


def _json_lines(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(rec, dict):
                yield rec


def _batches(items: Iterable[dict], size: int = BATCH) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def infer_schema(records: Callable[[], Iterable[dict]]):
    """Each field's type, inferred by pyarrow over every record (a pass of its own); a field whose values have no
    common type is JSON text. Returns (schema, the fields written as JSON)."""
    import pyarrow as pa

    types: dict[str, Any] = {}
    as_json: set[str] = set()
    for batch in _batches(records()):
        for k in dict.fromkeys(k for r in batch for k in r):
            if k in as_json:
                types.setdefault(k, pa.string())
                continue
            try:
                t = pa.array([r.get(k) for r in batch]).type
                if k in types and types[k] != t:
                    t = pa.unify_schemas([pa.schema([(k, types[k])]), pa.schema([(k, t)])],
                                         promote_options="permissive").field(k).type
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, OverflowError):
                as_json.add(k)
                t = pa.string()
            types[k] = t
    fields = [(k, pa.string() if k in as_json or pa.types.is_null(t) else t) for k, t in types.items()]
    return pa.schema(fields), as_json


# ---------------------------------------------------------------- writing


class PartWriter:
    """part-00000.parquet, part-00001.parquet, ... in OUT (a local folder or a URI), `rows_per_file` rows each;
    each part is written under a hidden name and renamed when whole; parts of an earlier export beyond the new
    ones are removed."""

    def __init__(self, out: str, schema, rows_per_file: int = ROWS_PER_FILE):
        from pyarrow.fs import FileSystem, LocalFileSystem

        from app.datasets import is_uri

        if is_uri(out):
            self.fs, self.root = FileSystem.from_uri(out)
        else:
            self.fs, self.root = LocalFileSystem(), str(Path(out).expanduser().resolve())
        self.fs.create_dir(self.root, recursive=True)
        self.schema, self.rows_per_file = schema, rows_per_file
        self.files: list[str] = []
        self.rows = 0
        self._writer = self._stream = None
        self._in_file = 0
        self._buffer: list = []  # Arrow record batches of this row group
        self._buffered = 0

    def _path(self, i: int, hidden: bool = False) -> str:
        return f"{self.root}/{'.' if hidden else ''}{PART.format(i)}"

    def _open(self) -> None:
        import pyarrow.parquet as pq

        if self._writer is None:
            self._stream = self.fs.open_output_stream(self._path(len(self.files), hidden=True))
            self._writer = pq.ParquetWriter(self._stream, self.schema)

    def _flush(self) -> None:
        """The buffered batches as one row group."""
        import pyarrow as pa

        if self._buffer:
            self._open()
            self._writer.write_table(pa.Table.from_batches(self._buffer, schema=self.schema))
            self._buffer, self._buffered = [], 0

    def _close_part(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._stream.close()
            i = len(self.files)
            self.fs.move(self._path(i, hidden=True), self._path(i))
            self.files.append(self._path(i))
            self._writer = self._stream = None
            self._in_file = 0

    def write(self, rows: list[dict]) -> None:
        import pyarrow as pa

        while rows:
            take = rows[: self.rows_per_file - self._in_file]
            batch = pa.RecordBatch.from_pylist(take, schema=self.schema)
            self._buffer.append(batch)
            self._buffered += batch.nbytes
            self._in_file += len(take)
            self.rows += len(take)
            rows = rows[len(take):]
            if self._in_file >= self.rows_per_file:
                self._close_part()
            elif self._buffered >= ROW_GROUP_BYTES:
                self._flush()

    def close(self) -> list[str]:
        from pyarrow.fs import FileSelector, FileType

        if not self.files and not self._buffer:  # no rows at all: one empty part keeps the schema
            self._open()
        self._close_part()

        for info in self.fs.get_file_info(FileSelector(self.root)):
            name = info.base_name
            if info.type == FileType.File and name.startswith("part-") and name.endswith(".parquet") \
                    and info.path not in self.files:
                self.fs.delete_file(info.path)
        return self.files


def export(run: str | Path, out: str, rows_per_file: int = ROWS_PER_FILE) -> dict:
    """Write RUN's records as Parquet into OUT; returns {"kind", "rows", "files"}."""
    from app.storage import check_output_path

    if rows_per_file < 1:
        raise ConfigError(f"--rows-per-file must be >= 1, got {rows_per_file}")
    kind = run_kind(run)
    check_output_path(out, "--parquet", allow_uri=True, writable=True, kind="dir")
    run = Path(run)
    if kind == "synthesis":
        schema, as_json = infer_schema(lambda: _synthesis_records(run))
        rows: Iterable[dict] = ({k: (json.dumps(r[k], ensure_ascii=False) if k in as_json and r.get(k) is not None
                                     else r.get(k)) for k in schema.names} for r in _synthesis_records(run))
    else:
        schema, rows = search_schema(trial=kind == "sweep"), _search_rows(run, kind)
    writer = PartWriter(out, schema, rows_per_file)
    for batch in _batches(rows):
        writer.write(batch)
    return {"kind": kind, "rows": writer.rows, "files": writer.close()}
