"""Search results on disk: sharded append-only JSONL, resume, and the accuracy table.

Layout of an output directory:
    run.yaml                      the run's config (written once; a resumed run must match it)
    problems.json                 every problem the runs into this directory set out to solve (id and level), written
                                  when a run starts: the denominator, so that a killed run's missing problems count
    shard-<host>-<pid>-<t>.jsonl  one file per writer; each line one finished problem's record, flushed and fsynced
    failures.jsonl                one line per problem that failed (id, one-line error); a problem that has a record
                                  is no longer failed, and a later run drops its lines

A killed run leaves at most one partial last line in its shard; readers skip it, so that problem is redone on
resume. `finished_ids` returns the problems to skip; `iter_records` yields each problem once (the first record),
`read_records` is its list. Accuracy counts every problem of the run: a failed or missing one (no record) is wrong
(`summarize`). The report streams (`read_run_tally`): each record is added to a `Tally` of running sums as it is
read and dropped, so a run of a million records is summarised without holding them.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from app.search.select import RULES

SHARD_GLOB = "shard-*.jsonl"
# methods whose completions are independent samples: their choice among the first n of N is, in distribution, a run
# at budget n. Any other method's n < N columns are subsets of ONE run at N (its first n final trajectories).
INDEPENDENT_SAMPLES = ("best_of_n", "majority", "greedy")
COMPUTED_KEYS = ("computed_prompt_tokens", "computed_generated_tokens", "computed_prm_tokens", "computed_flops")
PLAN_FILE = "problems.json"
FAILURES_FILE = "failures.jsonl"


class ResultsWriter:
    """Appends records to this writer's own shard file; every line is flushed and fsynced before `write` returns."""

    def __init__(self, out_dir: str | Path, shard: str | None = None):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        name = shard or f"shard-{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        self.path = self.dir / f"{name}.jsonl"
        self._f = open(self.path, "a", encoding="utf-8")
        self.count = 0

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.count += 1

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _iter_lines(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: that problem is redone
            if isinstance(rec, dict) and "id" in rec:
                yield rec


def shard_files(out_dir: str | Path) -> list[Path]:
    d = Path(out_dir)
    return sorted(d.glob(SHARD_GLOB)) if d.is_dir() else []


def iter_records(out_dir: str | Path) -> Iterator[dict]:
    """Every finished problem's record, once each (the first written wins), shards in name order, as they are read."""
    seen: set = set()
    for path in shard_files(out_dir):
        for rec in _iter_lines(path):
            if rec["id"] in seen:
                continue
            seen.add(rec["id"])
            yield rec


def read_records(out_dir: str | Path) -> list[dict]:
    """Every finished problem's record, once each (the first written wins), shards in name order."""
    return list(iter_records(out_dir))


def finished_ids(out_dir: str | Path) -> set:
    return {rec["id"] for path in shard_files(out_dir) for rec in _iter_lines(path)}


# ---------------------------------------------------------------- the run's config, for resume checks


def write_run_config(out_dir: str | Path, data: dict, keys: Iterable[str]) -> None:
    """Write run.yaml on the first run; on resume check that `keys` (the ones that change results) match."""
    import yaml

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "run.yaml"
    if path.is_file():
        old = yaml.safe_load(path.read_text()) or {}
        for k in keys:
            if old.get(k) != data.get(k):
                from app.config import ConfigError

                raise ConfigError(
                    f"{d} holds results of a run whose '{k}' differs from this recipe's "
                    f"(was {old.get(k)!r}); give a new output_dir, or the same recipe to resume"
                )
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)


# ---------------------------------------------------------------- the run's problems and its failures


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_plan(out_dir: str | Path, problems: dict[str, Any]) -> None:
    """Add `problems` (id -> level) to problems.json, the union of what every run into `out_dir` set out to solve.

    A run that grows (a larger `data.limit`) adds its new problems; a smaller one removes none. Every shard job of
    one run writes all the run's problems, so the count is right from the first shard on.
    """
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    old = read_plan(d) or {}
    new = {str(k): v for k, v in problems.items() if str(k) not in old}
    if new or not (d / PLAN_FILE).is_file():
        plan = [{"id": k, "level": v} for k, v in {**old, **new}.items()]
        _write_atomic(d / PLAN_FILE, json.dumps({"count": len(plan), "problems": plan}, ensure_ascii=False) + "\n")


def read_plan(out_dir: str | Path) -> dict[str, Any] | None:
    """problems.json as {id: level}; None where there is none (a directory written before it existed)."""
    path = Path(out_dir) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {str(p["id"]): p.get("level") for p in data["problems"]}
    except (ValueError, KeyError, TypeError):
        from app.config import ConfigError

        raise ConfigError(f"{path}: not a problem list written by ponder search (delete it to recount)") from None


def write_failure(out_dir: str | Path, problem_id: str, error: str) -> None:
    """Append one failed problem (its id and a one-line error) to failures.jsonl, flushed and fsynced."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"id": problem_id, "error": " ".join(error.split()), "time": time.time()}, ensure_ascii=False)
    with open(d / FAILURES_FILE, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_failures(out_dir: str | Path, done: set | None = None) -> dict[str, str]:
    """The failed problems that have no record: id -> the last one-line error. `done`: the ids with a record, where
    the caller has read them already (else they are read here)."""
    path = Path(out_dir) / FAILURES_FILE
    if not path.is_file():
        return {}
    errors = {rec["id"]: str(rec.get("error", "")) for rec in _iter_lines(path)}
    if errors and done is None:
        done = finished_ids(out_dir)
    return {k: v for k, v in errors.items() if k not in (done or ())}


def clear_failures(out_dir: str | Path, done: set | None = None) -> None:
    """Drop the lines of failures.jsonl whose problem now has a record (or that repeat an id).

    Best effort where shard jobs share the directory: a failure appended by another job while this rewrite runs
    can be lost, and that problem then counts as missing instead of failed (wrong either way).
    """
    path = Path(out_dir) / FAILURES_FILE
    if not path.is_file():
        return
    lines = list(_iter_lines(path))
    if done is None:
        done = finished_ids(out_dir)
    keep = {rec["id"] for rec in lines if rec["id"] not in done}
    if len(lines) != len(keep):
        kept = {rec["id"]: rec for rec in lines if rec["id"] in keep}  # the last line per id
        _write_atomic(path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in kept.values()))


def read_run(out_dir: str | Path) -> tuple[list[dict], dict[str, Any] | None, dict[str, str]]:
    """An output directory's records, its problems (id -> level; None if unknown) and its failures (id -> error)."""
    return read_records(out_dir), read_plan(out_dir), read_failures(out_dir)


# ---------------------------------------------------------------- the summary table


SUM_KEYS = ("prompt_tokens", "generated_tokens", "prm_tokens", "flops", "seconds")


class Tally:
    """What `summarize` needs of a run's records, as running sums: `add` one record at a time, then `summary`.

    Holds no record, only each problem's id (and, `by_level`, one Tally per difficulty level), so `ponder report`
    streams a run of any size. `expected` (id -> level): the run's problems, whose level groups a record by_level
    (else the record's own level), as `format_report` groups them.
    """

    def __init__(self, expected: dict[str, Any] | None = None, by_level: bool = False):
        self.expected = expected
        self.levels: dict[Any, Tally] | None = {} if by_level else None
        self.ids: set = set()
        self.count = 0
        self.acc: dict[str, dict[int, list[int]]] = {}  # rule -> n -> [correct, records]
        self.sums = {k: 0.0 for k in SUM_KEYS}
        self.counted = 0  # records that report the computed figures
        self.computed = {k: 0.0 for k in COMPUTED_KEYS}
        self.methods: set[str] = set()
        self.N = 0
        self.drawn = False

    @classmethod
    def of(cls, records: Iterable[dict], expected: dict[str, Any] | None = None, by_level: bool = False) -> "Tally":
        t = cls(expected, by_level)
        for rec in records:
            t.add(rec)
        return t

    def add(self, rec: dict) -> None:
        self.ids.add(rec["id"])
        self.count += 1
        for rule, by_n in (rec.get("selection") or {}).items():
            for n, sel in by_n.items():
                c = self.acc.setdefault(rule, {}).setdefault(int(n), [0, 0])
                c[0] += 1 if sel.get("correct") else 0
                c[1] += 1
        compute = rec.get("compute") or {}
        for k in SUM_KEYS:
            self.sums[k] += float(compute.get(k, 0.0))
        if "computed_flops" in compute:
            self.counted += 1
            for k in COMPUTED_KEYS:
                self.computed[k] += float(compute.get(k, 0.0))
        self.methods.add(str(rec.get("method")))
        self.N = max(self.N, int(rec.get("N") or 0))
        self.drawn = self.drawn or (rec.get("config") or {}).get("final_selection") == "sample"
        if self.levels is not None:
            expected = self.expected or {}
            level = expected[rec["id"]] if rec["id"] in expected else rec.get("level")
            self.levels.setdefault(level, Tally()).add(rec)

    def problems(self, expected: dict[str, Any] | None, failed_ids: set) -> int:
        """K: the expected problems, and any record or failure beyond them."""
        expected = expected or {}
        return (len(expected) + sum(1 for i in self.ids if i not in expected)
                + sum(1 for i in failed_ids if i not in expected))

    def summary(self, expected: dict[str, Any] | None = None, failed: Iterable[str] = ()) -> dict:
        """`summarize`'s dict (see there) of the records added so far."""
        failed_ids = set(failed) - self.ids
        total = self.problems(expected, failed_ids)
        n_rec = self.count
        compute: dict[str, float | None] = {k: (self.sums[k] / n_rec if n_rec else 0.0) for k in SUM_KEYS}
        for k in COMPUTED_KEYS:
            compute[k] = self.computed[k] / self.counted if self.counted else None
        methods = sorted(self.methods)
        unsolved = total - n_rec
        one_run = [m for m in methods if m not in INDEPENDENT_SAMPLES]
        return {
            "problems": total,
            "solved": n_rec,
            "failed": len(failed_ids),
            "missing": unsolved - len(failed_ids),
            "method": ",".join(methods),
            "N": self.N,
            "accuracy": {rule: {n: by_n[n][0] / (by_n[n][1] + unsolved) for n in sorted(by_n)}
                         for rule, by_n in self.acc.items()},
            # n < N of a one-run method: subsets of one run at N, not runs at budget n
            "subsets": sorted({n for by_n in self.acc.values() for n in by_n if n < self.N}) if one_run else [],
            # final_selection: sample: `naive` at N is the method's drawn answer, not the argmax
            "drawn": self.drawn,
            "compute": compute,
        }

    def level_groups(self, failed: Iterable[str] = ()) -> dict[Any, dict[str, Any]]:
        """Every problem counted (expected ones, records, failures), grouped by level: {level: {id: level}}."""
        expected = self.expected or {}
        groups: dict[Any, dict[str, Any]] = {}
        for pid, lvl in expected.items():
            groups.setdefault(lvl, {})[pid] = lvl
        seen = set()
        for lvl, t in (self.levels or {}).items():
            for pid in t.ids:
                if pid not in expected:
                    groups.setdefault(lvl, {})[pid] = lvl
            seen |= t.ids
        for pid in failed:
            if pid not in expected and pid not in seen:
                groups.setdefault(None, {})[pid] = None
        return groups


def summarize(records: Iterable[dict], expected: dict[str, Any] | None = None, failed: Iterable[str] = ()) -> dict:
    """Accuracy per rule and n over every problem, and mean compute per solved problem.

    `expected` (id -> level) is every problem of the run, `failed` the ids that failed: a problem with no record,
    failed or missing (e.g. a killed run), counts as wrong. Without them the records are all the problems.

    Returns {"problems": K, "solved": k (problems with a record, right or wrong), "failed": f, "missing": m,
    "method": ..., "N": ..., "accuracy": {rule: {n: acc}}, "compute": {key: mean per record}, "subsets": [n],
    "drawn": bool}, K = k + f + m. Accuracy at n is over K less the records that do not report that n (none, for
    one run). `subsets`: the n < N that are subsets of one run at N (every method but INDEPENDENT_SAMPLES: beam
    search, DVTS, particle filtering and Gibbs, REBASE, MCTS), not runs at budget n. `drawn`: a run with
    `final_selection: sample`, whose `naive` at N is the drawn answer (the method's own), not the argmax.
    Compute: the nominal tokens and FLOPs (prompt_tokens, generated_tokens, prm_tokens, flops), the computed ones
    (computed_...: after the engines' prefix caches; None when no record reports them) and wall seconds.
    `records` may be any iterable (a generator is read once: see `Tally`).
    """
    return Tally.of(records).summary(expected, failed)


def read_run_tally(out_dir: str | Path, by_level: bool = False
                   ) -> tuple[Tally, dict[str, Any] | None, dict[str, str]]:
    """`read_run`, streamed: the records summed into a Tally as they are read (none kept), the run's problems and
    its failures."""
    expected = read_plan(out_dir)
    tally = Tally(expected, by_level)
    for rec in iter_records(out_dir):
        tally.add(rec)
    return tally, expected, read_failures(out_dir, done=tally.ids)


def _fmt_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _flops(x: float) -> str:
    """FLOPs with a unit prefix: "20.1 GFLOPs"."""
    for unit, div in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g} {unit}FLOPs"
    return f"{x:.3g} FLOPs"


def format_summary(records: Iterable[dict], title: str = "", expected: dict[str, Any] | None = None,
                   failed: Iterable[str] = ()) -> str:
    """The count of solved, failed and missing problems, the accuracy table (rows: selection rule; columns: n) and
    mean compute per solved problem."""
    return format_tally(Tally.of(records), title, expected, failed)


def format_tally(tally: Tally, title: str = "", expected: dict[str, Any] | None = None,
                 failed: Iterable[str] = ()) -> str:
    """`format_summary` of a Tally."""
    s = tally.summary(expected, failed)
    counts = (f"solved {s['solved']} of {s['problems']}, {s['failed']} failed, {s['missing']} missing "
              f"(solved = has a record, right or wrong; failed and missing problems count as wrong)")
    if not tally.count:
        return "\n".join([f"{title}: no finished problems" if title else "no finished problems"]
                         + ([counts] if s["problems"] else []))
    ns = sorted({n for by_n in s["accuracy"].values() for n in by_n})
    header = ["rule"] + [f"n={n}" + ("*" if n in s["subsets"] else "") for n in ns]
    rows = []
    for rule in RULES:
        if rule not in s["accuracy"]:
            continue
        name = "naive (drawn)" if rule == "naive" and s["drawn"] else rule
        rows.append([name] + [f"{s['accuracy'][rule][n]:.3f}" if n in s["accuracy"][rule] else "-" for n in ns])
    notes = []
    if s["subsets"]:
        notes.append(f"*: n < N={s['N']} of a one-run method: the rule over the first n of the N final trajectories "
                     f"of ONE run at N, not a run at budget n")
    if s["drawn"]:
        notes.append(f"naive (drawn) at n={s['N']}: the method's own answer, drawn by final_selection: sample (not "
                     f"the argmax)")
    c = s["compute"]
    head = f"{title + ': ' if title else ''}{s['method']}, {s['problems']} problems, N={s['N']}"
    if c["computed_flops"] is None:  # records written before compute was counted both ways
        per = (
            f"per solved problem: {c['prompt_tokens']:.0f} prompt tokens, {c['generated_tokens']:.0f} generated "
            f"tokens, {c['prm_tokens']:.0f} PRM tokens, nominal {_flops(c['flops'])}, {c['seconds']:.2f} s"
        )
    else:
        per = (
            f"per solved problem: {c['prompt_tokens']:.0f} prompt tokens ({c['computed_prompt_tokens']:.0f} computed), "
            f"{c['generated_tokens']:.0f} generated tokens ({c['computed_generated_tokens']:.0f} computed), "
            f"{c['prm_tokens']:.0f} PRM tokens ({c['computed_prm_tokens']:.0f} computed), "
            f"nominal {_flops(c['flops'])}, computed {_flops(c['computed_flops'])}, {c['seconds']:.2f} s"
        )
    return "\n".join([head, counts, _fmt_table(header, rows), *notes, per])


def format_report(records: Iterable[dict], by_level: bool = False, title: str = "",
                  expected: dict[str, Any] | None = None, failed: Iterable[str] = ()) -> str:
    """The summary over every problem (`summarize`), then (by_level) one summary per difficulty level, then what
    nominal and computed compute mean."""
    return format_run(Tally.of(records, expected, by_level), by_level, title, expected, failed)


def format_run(tally: Tally, by_level: bool = False, title: str = "", expected: dict[str, Any] | None = None,
               failed: Iterable[str] = ()) -> str:
    """`format_report` of a Tally (made with the same `expected`, and `by_level` for the per-level tables)."""
    failed = set(failed)
    out = [format_tally(tally, title, expected, failed)]
    if by_level:
        levels = tally.level_groups(failed)
        for lvl in sorted(levels, key=lambda x: (x is None, str(x))):
            ids = levels[lvl]
            out.append("")
            out.append(format_tally((tally.levels or {}).get(lvl) or Tally(), f"level {lvl}", ids, failed & set(ids)))
    if tally.counted:
        out += ["", "nominal: every prompt token of every call and every PRM token of every re-scored path, as the "
                    "papers count; computed: what the engines ran after their prefix caches"]
    return "\n".join(out)
