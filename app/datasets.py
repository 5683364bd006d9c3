"""Loading problems: files (.jsonl, .json, .parquet), folders of shards, URIs, saved data set folders, Hub names,
toy splits.

Files are read through pyarrow's filesystems, so a local path and a URI (`file://`, `s3://`, `gs://`, anything
`pyarrow.fs.FileSystem.from_uri` knows) are read by the same code: Parquet with pyarrow's Parquet reader, batch by
batch; JSON and JSONL by the line reader that names the file and line of a bad record. A folder of shards (a local
folder of Parquet files, or any folder URI) is its data files in path order; where the files are named for splits
(`test-00000-of-00002.parquet`, `data/train/...`) one split is read, as the Hub names them.

Ids are stable across runs and shuffles, so sharded, append-only outputs resume correctly; the order of
operations is shuffle, then limit, then shard, so the shards of one limited run cover it exactly. Ids are unique:
a source that repeats one is refused (naming both records), and so is a source that holds no problems.
"""
from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from app.config import ConfigError
from app.problems import Problem, ProblemFormatError, record_to_problem

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def not_utf8(path: Any, e: UnicodeDecodeError) -> ProblemFormatError:
    return ProblemFormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 "
                              "(e.g. iconv -t UTF-8)")


# A file to read: its name in messages, and how to open it as bytes (a local file, or a pyarrow filesystem's stream).
Opener = Callable[[], Any]


def _local(path: Path) -> Opener:
    return lambda: open(path, "rb")


def _read_jsonl(path: Any, opener: Opener | None = None) -> Iterator[tuple[dict, str]]:
    with (opener or _local(path))() as raw:
        f = io.TextIOWrapper(raw, encoding="utf-8")
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


def _read_json(path: Any, opener: Opener | None = None) -> Iterator[tuple[dict, str]]:
    with (opener or _local(path))() as raw:
        data = raw.read()
    try:
        data = json.loads(data.decode("utf-8"))
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


def _read_parquet(path: Any, opener: Opener | None = None) -> Iterator[tuple[dict, str]]:
    """Row by row, one record batch in memory at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with (opener or _local(path))() as raw:
        try:
            pf = pq.ParquetFile(raw)
        except (pa.ArrowInvalid, OSError) as e:
            raise ProblemFormatError(f"{path}: not a Parquet file ({str(e).splitlines()[0]})") from None
        i = 0
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                yield rec, f"{path} row {i}"
                i += 1


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


def _reader(path: Any) -> Callable[..., Iterator[tuple[dict, str]]]:
    suffix = Path(str(path)).suffix.lower()
    if suffix not in READERS:
        raise ProblemFormatError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    return READERS[suffix]


# ---------------------------------------------------------------- URIs and folders of shards (pyarrow filesystems)

URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# a shard named for a split, as the Hub names data files: test-00000-of-00001.parquet, data/train/0.parquet
SPLIT_WORDS = ("train", "test", "validation", "valid", "dev", "eval")


def is_uri(source: str | Path) -> bool:
    return bool(URI.match(str(source)))


def _split_of(rel: str) -> str | None:
    for word in SPLIT_WORDS:
        if re.search(rf"(^|[/_.\-]){word}([/_.\-]|$)", rel.lower()):
            return word
    return None


def _data_files(fs, root: str) -> list[str]:
    """The .jsonl/.json/.parquet files under a folder, in path order (hidden and _-prefixed files skipped)."""
    from pyarrow.fs import FileSelector, FileType

    infos = fs.get_file_info(FileSelector(root, recursive=True))
    files = []
    for info in infos:
        rel = info.path[len(root):].lstrip("/")
        if info.type != FileType.File or any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        if Path(info.path).suffix.lower() in LOCAL_SUFFIXES:
            files.append(info.path)
    return sorted(files)


def _pick_files(files: list[str], root: str, split: str | None, where: str) -> tuple[list[str], str | None]:
    """The files of one split where they are named for splits (`split`, else test, validation, train); else all."""
    by_split: dict[str | None, list[str]] = {}
    for f in files:
        by_split.setdefault(_split_of(f[len(root):].lstrip("/")), []).append(f)
    named = [k for k in by_split if k is not None]
    if split is not None:
        if split not in by_split:
            raise ProblemFormatError(f"{where}: no files for split {split!r} (splits: {', '.join(named) or 'none'}); "
                                     "leave the split out to read every file")
        return by_split[split], split
    if not named:
        return files, None
    for default in ("test", "validation", "valid", "train"):
        if default in by_split:
            return by_split[default], default
    return files, None


def _read_files(fs, files: list[str], display: Callable[[str], str]) -> Iterator[tuple[dict, str]]:
    for f in files:
        yield from _reader(f)(display(f), lambda f=f: fs.open_input_file(f))


def _read_folder(fs, root: str, source: str, split: str | None, display: Callable[[str], str]
                 ) -> tuple[Iterator[tuple[dict, str]], str]:
    files = _data_files(fs, root)
    if not files:
        raise ProblemFormatError(f"{source}: a folder with no .jsonl, .json or .parquet files")
    files, split = _pick_files(files, root, split, source)
    name = root.rstrip("/").rsplit("/", 1)[-1] or "data"
    return _read_files(fs, files, display), f"{name}-{split or 'train'}"


def _read_uri(source: str, split: str | None, subset: str | None) -> tuple[Iterator[tuple[dict, str]], str]:
    """A file or a folder of shards at a URI, through pyarrow's filesystem for its scheme."""
    from pyarrow.fs import FileSystem, FileType

    if subset is not None:
        raise ProblemFormatError(f"{source}: a subset names a configuration of a Hub data set; a URI has none")
    try:
        fs, path = FileSystem.from_uri(source)
        info = fs.get_file_info(path)
    except Exception as e:  # unknown scheme, no credentials, no network: one line with the cause
        first = str(e).splitlines()[0] if str(e) else ""
        raise ProblemFormatError(f"cannot open {source}: {type(e).__name__}: {first}") from None
    scheme = source.split("://", 1)[0]

    def display(p: str) -> str:  # the shard's own URI, for messages: s3://bucket/data/0.parquet
        return f"{scheme}://{p}" if scheme == "file" else f"{scheme}://{p.lstrip('/')}"

    if info.type == FileType.NotFound:
        raise FileNotFoundError(f"problem file not found: {source}")
    if info.type == FileType.Directory:
        return _read_folder(fs, path, source, split, display)
    reader = _reader(path)
    return reader(source, lambda: fs.open_input_file(path)), Path(path).stem


def _parquet_folder(path: Path) -> bool:
    """A local folder of Parquet shards (every data file under it .parquet), read with pyarrow, not `datasets`."""
    files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES
             and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)]
    return bool(files) and all(p.suffix.lower() == ".parquet" for p in files)


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


def _saved_dataset(path: Path) -> bool:
    """A folder written by `datasets`' `save_to_disk`."""
    return any((path / marker).exists() for marker in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _read_hf(source: str, split: str | None, subset: str | None) -> tuple[Iterator[tuple[dict, str]], str]:
    """A data set directory saved with `save_to_disk`, a local data files directory, or a Hub name."""
    import datasets

    path = Path(source)
    if path.is_dir() and _saved_dataset(path):
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
    text = str(source)
    if is_uri(text):
        return _read_uri(text, split, subset)
    path = Path(source)
    if path.is_file():
        return _reader(path)(path), path.stem
    if path.is_dir():
        if subset is None and not _saved_dataset(path) and _parquet_folder(path):
            from pyarrow.fs import LocalFileSystem

            root = str(path.resolve())
            return _read_folder(LocalFileSystem(), root, text, split,
                                lambda p: str(path / Path(p).relative_to(root)))
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
    """Problems from a .jsonl/.json/.parquet file, a folder of shards, a URI of either (`file://`, `s3://`,
    `gs://`, ...: what `pyarrow.fs.FileSystem.from_uri` knows), a saved or local data set directory, or a Hub name.

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
