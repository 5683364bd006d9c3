"""Loading problems: local files (.jsonl, .json, .parquet), saved or local data set folders, Hub names, toy splits.

Ids are stable across runs and shuffles, so sharded, append-only outputs resume correctly; the order of
operations is shuffle, then limit, then shard, so the shards of one limited run cover it exactly. Ids are unique:
a source that repeats one is refused (naming both records), and so is a source that holds no problems.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Iterator

from app.config import ConfigError
from app.problems import Problem, ProblemFormatError, record_to_problem

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def not_utf8(path: Path, e: UnicodeDecodeError) -> ProblemFormatError:
    return ProblemFormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 "
                              "(e.g. iconv -t UTF-8)")


def _read_jsonl(path: Path) -> Iterator[tuple[dict, str]]:
    with path.open(encoding="utf-8") as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ProblemFormatError(f"{path} line {lineno}: not valid JSON ({e.msg}); each line must be one "
                                             "JSON object") from None
                yield rec, f"{path} line {lineno}"
        except UnicodeDecodeError as e:
            raise not_utf8(path, e) from None


def _read_json(path: Path) -> Iterator[tuple[dict, str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None
    except json.JSONDecodeError as e:
        raise ProblemFormatError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict):
        key = next((k for k in ("problems", "data", "examples", "rows") if isinstance(data.get(k), list)), None)
        if key is None:
            raise ProblemFormatError(f"{path}: expected a list of records (or an object with a 'problems' or 'data' list)")
        data = data[key]
    if not isinstance(data, list):
        raise ProblemFormatError(f"{path}: expected a list of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        yield rec, f"{path} record {i}"


def _read_parquet(path: Path) -> Iterator[tuple[dict, str]]:
    import pyarrow.parquet as pq

    for i, rec in enumerate(pq.read_table(path).to_pylist()):
        yield rec, f"{path} row {i}"


def _pick_split(dsdict, split: str | None, where: str):
    splits = list(dsdict.keys())
    if split is not None:
        if split not in dsdict:
            raise ProblemFormatError(f"{where}: no split {split!r} (splits: {', '.join(splits)}); give one as NAME:SPLIT")
        return dsdict[split], split
    for default in ("test", "validation", "train"):
        if default in dsdict:
            return dsdict[default], default
    if len(splits) == 1:
        return dsdict[splits[0]], splits[0]
    raise ProblemFormatError(f"{where}: several splits ({', '.join(splits)}); choose one as NAME:SPLIT")


def _read_hf(source: str, split: str | None, subset: str | None) -> tuple[Iterator[tuple[dict, str]], str]:
    """A data set directory saved with `save_to_disk`, a local data files directory, or a Hub name."""
    import datasets

    path = Path(source)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        ds = datasets.load_from_disk(str(path))
    else:
        try:
            ds = datasets.load_dataset(source, subset, split=split)
        except Exception as e:  # the hub, a missing config, a bad split: one line with the cause
            raise ProblemFormatError(f"cannot load data set {source!r} (subset={subset}, split={split}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if isinstance(ds, datasets.DatasetDict):
        ds, split = _pick_split(ds, split, source)
    name = path.name if path.exists() else source.rstrip("/").split("/")[-1]
    if split:
        name = f"{name}-{split}"
    return ((rec, f"{source} row {i}") for i, rec in enumerate(ds)), name


def _records(source: str | Path, split: str | None, subset: str | None) -> tuple[Iterator[tuple[dict, str]], str]:
    path = Path(source)
    text = str(source)
    if path.is_file():
        suffix = path.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
        if suffix not in readers:
            raise ProblemFormatError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
        return readers[suffix](path), path.stem
    if path.is_dir():
        return _read_hf(text, split, subset)
    if text.lower().endswith(LOCAL_SUFFIXES) or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"problem file not found: {source}")
    name, sep, name_split = text.partition(":")  # "HuggingFaceH4/MATH-500:test" or "openai/gsm8k:main:test"
    if sep:
        parts = name_split.split(":")
        if len(parts) == 2:
            subset, name_split = parts
        split = split or name_split
    return _read_hf(name, split, subset)


def _parse_shard(shard: tuple[int, int] | str | None) -> tuple[int, int] | None:
    if shard is None:
        return None
    if isinstance(shard, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
        if not m:
            raise ConfigError(f"shard {shard!r} must be INDEX/COUNT, e.g. 0/4")
        shard = (int(m.group(1)), int(m.group(2)))
    index, count = shard
    if not (isinstance(index, int) and isinstance(count, int) and count >= 1 and 0 <= index < count):
        raise ConfigError(f"shard {shard!r} must be (index, count) with 0 <= index < count")
    return index, count


def _where_pair(first: str, second: str) -> str:
    """"f.jsonl line 2" and "f.jsonl line 7" -> "f.jsonl: line 2 and line 7"."""
    head1, _, loc1 = first.rpartition(" ")
    head1, _, kind1 = head1.rpartition(" ")
    head2, _, loc2 = second.rpartition(" ")
    head2, _, kind2 = head2.rpartition(" ")
    if head1 and head1 == head2:
        return f"{head1}: {kind1} {loc1} and {kind2} {loc2}"
    return f"{first} and {second}"


def _unique(problems: list[Problem], wheres: list[str]) -> None:
    seen: dict[str, int] = {}
    for i, p in enumerate(problems):
        j = seen.setdefault(p.id, i)
        if j != i:
            raise ProblemFormatError(f"{_where_pair(wheres[j], wheres[i])}: the same problem id {p.id!r} twice; "
                                     "every problem needs its own id (results are keyed by it)")


def shard_problems(problems: list[Problem], shard: tuple[int, int] | str | None) -> list[Problem]:
    """Every COUNT-th problem from INDEX (shard "INDEX/COUNT" or (index, count)); all of them for None."""
    shard = _parse_shard(shard)
    if shard is None:
        return list(problems)
    index, count = shard
    return problems[index::count]


def load_problems(
    source: str | Path,
    limit: int | None = None,
    shuffle_seed: int | None = None,
    shard: tuple[int, int] | str | None = None,
    split: str | None = None,
    subset: str | None = None,
) -> list[Problem]:
    """Problems from a .jsonl/.json/.parquet file, a saved or local data set directory, or a Hub name.

    Hub names take an optional split and subset: `NAME:SPLIT` or `NAME:SUBSET:SPLIT` (or the keywords);
    without a split, `test` is used when there is one. The order of operations is shuffle (by
    `shuffle_seed`), then `limit` (the first N), then `shard=(index, count)` (every count-th problem from
    index), so the shards of one limited run cover it exactly, without overlap.
    """
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    _parse_shard(shard)
    if str(source).startswith("toy:"):  # the toy world's generated splits: toy:train, toy:test
        from app.toy.world import load_toy

        problems = load_toy(str(source))
        wheres = [f"{source} problem {i}" for i in range(len(problems))]
    else:
        records, name = _records(source, split, subset)
        problems, wheres = [], []
        for i, (rec, where) in enumerate(records):
            problems.append(record_to_problem(rec, name, i, where))
            wheres.append(where)
    if not problems:
        raise ProblemFormatError(f"{source}: holds no problems{f' (split {split})' if split else ''}")
    _unique(problems, wheres)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(problems)
    if limit is not None:
        problems = problems[:limit]
    return shard_problems(problems, shard)
