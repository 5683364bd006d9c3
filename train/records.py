"""Training data files: the one JSONL reader every trainer's data goes through (SFT, PRM, DPO, LaTRO, PPO, and the
synthesis jobs' inputs).

`read_jsonl(path, required=...)` reads a JSONL file (blank lines skipped) and checks every record as it goes; a bad
line is one `ConfigError` line naming the file, the line number and the key, and the fix, e.g.

    pairs.jsonl line 3: no key 'chosen' (every pair needs one); add it to every record
    pairs.jsonl line 2: key 'chosen' is a list, not a string; write it as a string
    pairs.jsonl line 1: key 'kind' is 'weird', not one of outcome, prm, step; use one of them or leave the key out
    q.jsonl line 4: not valid JSON (Expecting value); write one JSON object per line

so a job's `check` fails before Ray starts, in well under a second, instead of with a KeyError inside a Ray Train
worker. A missing file is a `FileNotFoundError` naming the recipe key when given.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Mapping

from app.config import ConfigError

# a key, or a tuple of alternatives (the first one a record has is checked; it must have one)
Key = str | tuple[str, ...]
Kind = type | tuple[type, ...]

_NAMES = {"str": "string", "list": "list", "dict": "object", "bool": "boolean", "int": "int", "float": "float"}


def kind_name(kind: Kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_NAMES.get(k.__name__, k.__name__) for k in kinds)


def _type_ok(value, kind: Kind) -> bool:
    return isinstance(value, kind)


def iter_jsonl(path: str | Path, required: Mapping[Key, Kind] | None = None, optional: Mapping[str, Kind] | None = None,
               choices: Mapping[str, tuple] | None = None, why: str = "", key: str | None = None) -> Iterator[dict]:
    """The records of a JSONL file, each checked as it is read (see `read_jsonl`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key + ': ' if key else ''}file not found: {path}")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(_utf8_lines(f, path), 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not valid JSON ({e.msg}); write one JSON object per line") from None
            check_record(rec, where, required, optional, choices, why)
            yield rec


def check_record(rec, where: str, required: Mapping[Key, Kind] | None = None,
                 optional: Mapping[str, Kind] | None = None, choices: Mapping[str, tuple] | None = None,
                 why: str = "") -> None:
    """One record's checks (see `read_jsonl`); `where` names it ("pairs.jsonl line 3", "s3://b/p.parquet row 7")."""
    if not isinstance(rec, dict):
        raise ConfigError(f"{where}: {_a(type(rec).__name__)}, not a JSON object; write one JSON object per line")
    for k, kind in (required or {}).items():
        names = k if isinstance(k, tuple) else (k,)
        have = next((x for x in names if x in rec), None)
        if have is None:
            keys = " or ".join(repr(x) for x in names)
            raise ConfigError(f"{where}: no key {keys}{why}; add it to every record")
        _check_type(where, have, rec[have], kind)
    for k, kind in (optional or {}).items():
        if k in rec:
            _check_type(where, k, rec[k], kind)
    for k, allowed in (choices or {}).items():
        if k in rec and rec[k] not in allowed:
            raise ConfigError(f"{where}: key {k!r} is {rec[k]!r}, not one of {', '.join(map(str, allowed))}; "
                              "use one of them or leave the key out")


def _utf8_lines(f, path: Path) -> Iterator[str]:
    """The lines of a text file opened as UTF-8; a file in another encoding is one line naming it."""
    try:
        yield from f
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 "
                          "(e.g. iconv -t UTF-8)") from None


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _check_type(where: str, key: str, value, kind: Kind) -> None:
    if not _type_ok(value, kind):
        name = _a(kind_name(kind))
        raise ConfigError(f"{where}: key {key!r} is {_a(type(value).__name__)}, not {name}; write it as {name}")


def read_jsonl(path: str | Path, required: Mapping[Key, Kind] | None = None, optional: Mapping[str, Kind] | None = None,
               choices: Mapping[str, tuple] | None = None, why: str = "", key: str | None = None) -> list[dict]:
    """Every record of a JSONL file (blank lines skipped), each checked: a JSON object, with every `required` key
    (a tuple of keys: one of them) of its type (`object`: any), the `optional` keys of theirs where present, and
    `choices` keys holding allowed values; `why` tells why a missing key is needed, `key` names the recipe key of
    the file in a missing-file error. Else one line naming the file, the line, the key and the fix."""
    return list(iter_jsonl(path, required, optional, choices, why, key))


def check_records(path: str | Path, fields: Mapping[Key, Kind], why: str = "", key: str | None = None) -> int:
    """`read_jsonl`'s checks without keeping the records (a large file is streamed): the number of records."""
    return sum(1 for _ in iter_jsonl(path, fields, why=why, key=key))
