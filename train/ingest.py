"""Training data through Ray Data: read where it lies, tokenise off the training workers, give each worker its shard.

A trainer's `data` may be a JSONL or Parquet file, a folder of such shards, or a URI of either (`file://`, `s3://`,
`gs://`, anything pyarrow's filesystems read). Before Ray Train starts, the driver builds one Ray Data pipeline:

    read (read_text for JSONL, read_parquet)  ->  map_batches(check + task.examples_of)  ->  a row number per example

Records are checked in the stream (`train.records.check_record`: one line naming the file and the key), so a remote
file is checked as it is read; a local JSONL file is also checked whole by the trainer's `check` first, with line
numbers. Tokenisation runs in Ray Data's tasks, not in the training workers.

The batch plan is the loop's own (`train.loop.epoch_batches`: a pure function of the examples' lengths, the seed and
the epoch), so only the lengths come back to the driver. From them it materialises one dataset per rank holding
the rows of that rank's micro batches in every epoch, and hands it to Ray Train (`datasets=`, not split by Ray:
the plan already did). A worker reads only its own dataset (`ray.train.get_dataset_shard`), never the others'.
Epochs, shuffling, resume (skip the micro batches already done) and therefore the losses are those of the
in-memory path, step for step. The cost: a worker holds the rows of its epochs (1/world of the data for one
epoch, more when later epochs deal it other rows); a run of many epochs over a huge set would stream per epoch.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from app.config import ConfigError

ROW = "_row"  # the example's place in the data set's order (what the batch plan indexes)
JSONL = ("jsonl", "json")


def data_format(source: str) -> str:
    """'parquet' or 'jsonl', from the file's extension or, for a folder, from the files inside it."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(source) if "://" in source else (pafs.LocalFileSystem(), source)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data: not found: {source}")
    names = [path] if info.type == pafs.FileType.File else [
        f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if f.type == pafs.FileType.File]
    kinds = {n.rsplit(".", 1)[-1].lower() for n in names if "." in n.rsplit("/", 1)[-1]}
    if "parquet" in kinds and not kinds & set(JSONL):
        return "parquet"
    if kinds & set(JSONL) and "parquet" not in kinds:
        return "jsonl"
    found = ", ".join(sorted(kinds)) or "no files with an extension"
    raise ConfigError(f"data: {source} holds {found}; give .jsonl or .parquet files (one kind per folder)")


def read_dataset(source: str):
    """The records of `source` as a Ray Data dataset: JSONL as text lines (parsed by `_Examples`, so each record
    keeps its Python types), Parquet as tables. Both carry the file each row came from."""
    import ray.data

    if data_format(source) == "parquet":
        return ray.data.read_parquet(source, include_paths=True, file_extensions=["parquet"])
    return ray.data.read_text(source, include_paths=True, file_extensions=list(JSONL))


class _Examples:
    """map_batches: records -> the task's examples, each record checked first. The tokenizer is built once per
    Ray Data worker process."""

    def __init__(self, task):
        self.task = task
        self.tokenizer = task.build_tokenizer()
        self.spec = task.record_spec()

    def __call__(self, batch):
        import pyarrow as pa

        from train.records import check_record

        paths = batch.column("path").to_pylist()
        if "text" in batch.column_names:  # JSONL lines
            records = []
            for path, line in zip(paths, batch.column("text").to_pylist()):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}: a line is not valid JSON ({e.msg}): {line[:60]!r}; write one JSON "
                                      "object per line") from None
        else:  # Parquet: a null is a key the record does not have
            rows = batch.drop(["path"]).to_pylist()
            records = [{k: v for k, v in r.items() if v is not None} for r in rows]
        for path, rec in zip(paths, records):
            check_record(rec, f"{path} record {_preview(rec)}", **self.spec)
        examples = self.task.examples_of(records, self.tokenizer)
        for e in examples:
            e.setdefault("length", len(e["input_ids"]))
        return pa.Table.from_pylist(examples)


def _preview(rec) -> str:
    text = json.dumps(rec)[:50] if isinstance(rec, dict) else repr(rec)[:50]
    return repr(text)


@dataclass
class Ingest:
    """What the driver hands to Ray Train: a dataset per rank (by name) and every example's length in order."""

    datasets: dict[str, Any]
    lengths: list[int]

    @staticmethod
    def name(rank: int) -> str:
        return f"train_rank{rank}"


def prepare(task, cfg) -> Ingest:
    """Read, check and encode `task.source()` on Ray Data; deal the rows to `cfg.num_workers` ranks by the loop's
    batch plan for every epoch; one materialised dataset per rank."""
    import pyarrow as pa
    import ray.data

    from train.batches import epoch_batches

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one progress report per stage is noise here
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True  # the row numbers follow the files' order, on every run
    source = task.source()
    records = read_dataset(source)
    data_log = logging.getLogger("ray.data")
    data_log.setLevel(logging.CRITICAL)  # a failure is raised below: a bad record as its own one line
    try:
        examples = records.map_batches(_Examples, fn_constructor_args=(task,), batch_format="pyarrow",
                                       concurrency=(1, 4), batch_size=1024).materialize()
    except Exception as e:
        raise _config_error_in(e) or e
    finally:
        data_log.setLevel(logging.WARNING)
    n = examples.count()
    if not n:
        raise ConfigError(f"data: {source} gives no training examples ({records.count()} records, all dropped)")
    indexed, lengths = _numbered(examples)
    world, t = cfg.num_workers, cfg
    rows = [set() for _ in range(world)]
    for epoch in range(t.epochs):
        for b, batch in enumerate(epoch_batches(lengths, t.micro_batch_size, world, t.grad_accum, t.seed, epoch)):
            rows[b % world].update(batch)
    datasets = {}
    for rank in range(world):
        keep = pa.array(sorted(rows[rank]), type=pa.int64())
        datasets[Ingest.name(rank)] = indexed.map_batches(_keep, fn_args=(keep,), batch_format="pyarrow").materialize()
    return Ingest(datasets, lengths)


def _numbered(examples):
    """The examples with their row number (blocks in order: `preserve_order`), and every example's length."""
    import ray
    import ray.data

    refs = examples.to_arrow_refs()
    sizes = ray.get([_num_rows.remote(r) for r in refs])
    refs, sizes = [r for r, k in zip(refs, sizes) if k], [k for k in sizes if k]  # batches whose records all dropped
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    numbered = [_with_rows.remote(r, s) for r, s in zip(refs, starts)]
    lengths = [int(x) for part in ray.get([_lengths.remote(r) for r in numbered]) for x in part]
    return ray.data.from_arrow_refs(numbered), lengths


def _remote(fn):
    import ray

    return ray.remote(num_cpus=0.1)(fn)


@_remote
def _num_rows(table) -> int:
    return table.num_rows


@_remote
def _with_rows(table, start: int):
    import pyarrow as pa

    return table.append_column(ROW, pa.array(range(start, start + table.num_rows), type=pa.int64()))


@_remote
def _lengths(table) -> list[int]:
    return table.column("length").to_pylist()


def _keep(batch, keep):
    import pyarrow.compute as pc

    return batch.filter(pc.is_in(batch.column(ROW), value_set=keep))


def shard_examples(rank: int) -> dict[int, dict]:
    """In a Ray Train worker: this rank's examples, by row number (the loop indexes them as it would a list)."""
    import ray.train

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    out: dict[int, dict] = {}
    for batch in ray.train.get_dataset_shard(Ingest.name(rank)).iter_batches(batch_format="pyarrow",
                                                                                 batch_size=None):
        for ex in batch.to_pylist():
            row = ex.pop(ROW)
            if "idx" in ex:  # a task's own example number (RL rollout seeds): the row in the whole data set
                ex["idx"] = row
            out[row] = {k: v for k, v in ex.items() if v is not None}
    return out


def _config_error_in(e: BaseException) -> ConfigError | None:
    """The ConfigError a Ray Data task raised, rebuilt as one line, wherever Ray wrapped it."""
    from train.startup import error_chain

    for x in error_chain(e):
        if isinstance(x, ConfigError):
            msg = str(x.args[0]) if x.args else str(x)
            return ConfigError(msg.strip().splitlines()[-1] if "Traceback" in msg else msg)
    # raised in a Ray Data worker: the chain was not pickled across, only its traceback text
    found = re.findall(r"ConfigError: (.+)", str(e))
    return ConfigError(found[-1].strip()) if found else None


def local_jsonl(source: str) -> str | None:
    """The path of a local JSONL file (a plain path or file://), else None."""
    from pathlib import Path

    path = source[len("file://"):] if source.startswith("file://") else source
    if "://" in path or not path.endswith(JSONL):
        return None
    return path if Path(path).is_file() else None


def check_data(source: str, spec: dict, ingest: str = "ray_data", key: str = "data") -> bool:
    """A trainer's `check` of its data before Ray starts. A local JSONL file is read whole here (one line naming
    file, line and key) and True is returned; a Parquet file, a folder of shards or a URI only has to exist and
    hold one kind of file (False: its records are checked as Ray Data reads them, `_Examples`)."""
    from train.records import iter_jsonl

    path = local_jsonl(source)
    if path:
        for _ in iter_jsonl(path, key=key, **spec):
            pass
        return True
    if ingest == "memory":
        raise ConfigError(f"train.ingest: memory reads a local JSONL file, and {key} is {source}; set "
                          "train.ingest: ray_data (Parquet, folders of shards and URIs go through Ray Data)")
    local = source[len("file://"):] if source.startswith("file://") else source
    if "://" not in local:
        from pathlib import Path

        if not Path(local).exists():
            raise FileNotFoundError(f"{key}: file not found: {local}")
    data_format(source)
    return False
