"""Search results on disk: sharded append-only JSONL, resume, and the accuracy table.

Layout of an output directory:
    run.yaml                      the run's config (written once; a resumed run must match it)
    shard-<host>-<pid>-<t>.jsonl  one file per writer; each line one finished problem's record, flushed and fsynced

A killed run leaves at most one partial last line in its shard; readers skip it, so that problem is redone on
resume. `finished_ids` returns the problems to skip; `read_records` returns each problem once (the first record).
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


def read_records(out_dir: str | Path) -> list[dict]:
    """Every finished problem's record, once each (the first written wins), shards in name order."""
    seen: set = set()
    out = []
    for path in shard_files(out_dir):
        for rec in _iter_lines(path):
            if rec["id"] in seen:
                continue
            seen.add(rec["id"])
            out.append(rec)
    return out


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


# ---------------------------------------------------------------- the summary table


def summarize(records: list[dict]) -> dict:
    """Accuracy per rule and n, and mean compute per problem.

    Returns {"problems": k, "method": ..., "N": ..., "accuracy": {rule: {n: acc}}, "compute": {key: mean}}.
    Accuracy at n counts only the records that report that n (all of them, for one run).
    """
    acc: dict[str, dict[int, list[int]]] = {}
    for rec in records:
        for rule, by_n in (rec.get("selection") or {}).items():
            for n, sel in by_n.items():
                acc.setdefault(rule, {}).setdefault(int(n), []).append(1 if sel.get("correct") else 0)
    keys = ("prompt_tokens", "generated_tokens", "prm_tokens", "flops", "seconds")
    compute = {
        k: (sum(float((r.get("compute") or {}).get(k, 0.0)) for r in records) / len(records) if records else 0.0)
        for k in keys
    }
    methods = sorted({str(r.get("method")) for r in records})
    return {
        "problems": len(records),
        "method": ",".join(methods),
        "N": max((int(r.get("N") or 0) for r in records), default=0),
        "accuracy": {rule: {n: sum(v) / len(v) for n, v in sorted(by_n.items())} for rule, by_n in acc.items()},
        "compute": compute,
    }


def _fmt_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _human(x: float) -> str:
    for unit, div in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def format_summary(records: list[dict], title: str = "") -> str:
    """The accuracy table (rows: selection rule; columns: n) and mean compute per problem."""
    s = summarize(records)
    if not records:
        return f"{title}: no finished problems" if title else "no finished problems"
    ns = sorted({n for by_n in s["accuracy"].values() for n in by_n})
    header = ["rule"] + [f"n={n}" for n in ns]
    rows = []
    for rule in RULES:
        if rule not in s["accuracy"]:
            continue
        rows.append([rule] + [f"{s['accuracy'][rule][n]:.3f}" if n in s["accuracy"][rule] else "-" for n in ns])
    c = s["compute"]
    head = f"{title + ': ' if title else ''}{s['method']}, {s['problems']} problems, N={s['N']}"
    per = (
        f"per problem: {c['prompt_tokens']:.0f} prompt tokens, {c['generated_tokens']:.0f} generated tokens, "
        f"{c['prm_tokens']:.0f} PRM tokens, {_human(c['flops'])}FLOPs, {c['seconds']:.2f} s"
    )
    return "\n".join([head, _fmt_table(header, rows), per])


def format_report(records: list[dict], by_level: bool = False, title: str = "") -> str:
    """The summary over all records, then (by_level) one summary per difficulty level."""
    out = [format_summary(records, title)]
    if by_level:
        levels: dict[Any, list[dict]] = {}
        for r in records:
            levels.setdefault(r.get("level"), []).append(r)
        for lvl in sorted(levels, key=lambda x: (x is None, str(x))):
            out.append("")
            out.append(format_summary(levels[lvl], f"level {lvl}"))
    return "\n".join(out)
