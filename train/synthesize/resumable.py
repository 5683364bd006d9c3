"""What every synthesis job shares (mc_labels, pairs, states, omega): problems, shards, resume, the windowed run.

Each job makes training data one problem at a time: one Ray task per problem (`num_cpus=0`: it only waits on the
pools), at most `max_in_flight` in flight (`app.fanout.windowed`), with a progress bar. Its records go to one
append-only JSONL file, `OUTPUT`, and a problem is finished when its id is in `OUTPUT.done` (one line per
problem, with its record count: a problem may give none, e.g. OmegaPRM's filter drops it). The two writes are
fsynced in that order, so a killed job leaves at worst records of a problem without its done line (dropped on
restart, and the problem redone) and a torn last line in either file (cut off).

`num_shards` / `shard` split the problems between jobs (problems shard, shard + num_shards, ...), each with its
own OUTPUT; concatenating the outputs gives the whole data set.

Files written before the done file existed (MC labels): when OUTPUT has no done file, a problem is finished if
`complete(its records)` says so (MC labels: all `n_samples` of its trajectories are there); the done file is
then written from them, so the next restart reads it like any other.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

from pydantic import Field, model_validator

from app.config import Config
from app.pool_config import PoolConfig


class ShardConfig(Config):
    """The `num_shards` / `shard` keys of a synthesis recipe."""

    num_shards: int = Field(1, ge=1, description="split the problems between this many jobs")
    shard: int = Field(0, ge=0, description="this job's shard (problems shard, shard + num_shards, ...)")

    @model_validator(mode="after")
    def _shard_below_num_shards(self):
        if self.shard >= self.num_shards:
            raise ValueError(f"shard: {self.shard} is not below num_shards {self.num_shards}")
        return self


class SynthesisConfig(ShardConfig):
    """What every synthesis recipe has: the policy pool, which problems, and how they are prompted."""

    policy: PoolConfig = Field(default_factory=lambda: PoolConfig(engine="hf", model="toy:policy"))
    problems: str = Field("toy:train", description="toy:train, toy:test, or a load_problems source")
    n_per_level: int = Field(50, ge=1, description="toy sources: problems per level")
    levels: list[int] = [1, 2, 3, 4, 5]
    offset: int = Field(0, ge=0, description="toy sources: skip this many problems per level first")
    limit: int | None = Field(None, ge=1, description="other sources: at most this many problems")
    prompt: Literal["toy", "plain"] = "toy"


def load_problems(source: str, n_per_level: int, levels: Sequence[int], offset: int = 0, limit: int | None = None,
                  seed: int = 0) -> list[dict]:
    """Problems as plain dicts (id, question, answer, level). Toy sources (`toy:train`, `toy:test`): `n_per_level`
    per level after skipping `offset` per level; other sources (`app.datasets.load_problems`): the first `limit`."""
    if source in ("toy:train", "toy:test"):
        from app.toy.world import toy_problems

        probs = toy_problems(source, n_per_level=offset + n_per_level, levels=list(levels), seed=seed)
        keep = []
        for level in levels:
            keep += [p for p in probs if p.level == level][offset:]
        probs = keep
    else:
        from app.datasets import load_problems as load

        probs = load(source)
        if limit:
            probs = probs[:limit]
    return [dict(id=p.id, question=p.question, answer=str(p.answer), level=p.level) for p in probs]


def seed_of(*parts: Any) -> int:
    """A request's seed from the recipe's seed, the problem's id and its place in the job (order-free)."""
    return int.from_bytes(hashlib.sha1(":".join(map(str, parts)).encode()).digest()[:4], "big") & 0x7FFFFFFF


def make_prompt(problem: dict, style: str) -> str:
    """The policy's prompt: the toy world's training format, or the plain question and a blank line."""
    if style == "toy":
        from app.toy.world import toy_prompt

        return toy_prompt(problem["question"])
    return problem["question"] + "\n\n"


def exact_checker(problem: dict):
    """Toy problems: `steps -> the toy checker's true step labels` (stored beside synthesized labels, to measure
    them); None for other problems."""
    if not str(problem.get("id", "")).startswith("toy-"):
        return None
    from app.toy.checker import exact_step_labels

    return lambda steps: exact_step_labels(problem["question"], steps)


def shard_of(items: Sequence, num_shards: int = 1, shard: int = 0) -> list:
    return list(items[shard::num_shards])


def done_path(output: str | Path) -> Path:
    return Path(str(output) + ".done")


def _good_lines(data: bytes, key: str) -> list[tuple[str, bytes, dict]]:
    """(problem id, line, record) of each whole JSON line, up to the first torn or unreadable one."""
    out = []
    for line in data.splitlines(keepends=True):
        try:
            if not line.endswith(b"\n"):
                raise ValueError
            rec = json.loads(line)
            out.append((str(rec[key]), line, rec))
        except (ValueError, KeyError, TypeError):
            break
    return out


def _replace(path: Path, data: bytes) -> None:
    """Rewrite `path` atomically (a kill leaves the old file or the new one)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_done(output: str | Path, complete: Callable[[list[dict]], bool] | None = None,
              key: str = "problem_id") -> set[str]:
    """Ids of the problems whose records are all in `output`; everything else is dropped from both files.

    Kept: problems in the done file (and, with `complete`, whose records it accepts). Dropped: a torn last line of
    either file, records of problems not kept; each file is rewritten once, atomically, only when it changes.
    Without a done file, `complete` alone decides (a file from before done files); without either, nothing is
    finished.
    """
    path, marks = Path(output), done_path(output)
    marked: list[str] | None = None
    if marks.exists():
        marked = [pid for pid, _, _ in _good_lines(marks.read_bytes(), key)]
    by: dict[str, list[dict]] = {}
    lines: list[tuple[str, bytes]] = []
    data = path.read_bytes() if path.exists() else b""
    for pid, line, rec in _good_lines(data, key):
        by.setdefault(pid, []).append(rec)
        lines.append((pid, line))
    if marked is None:
        done = {pid for pid, recs in by.items() if complete is not None and complete(recs)}
    else:
        done = {pid for pid in marked if complete is None or pid not in by or complete(by[pid])}
    kept = b"".join(line for pid, line in lines if pid in done)
    if kept != data:
        _replace(path, kept)
    if marks.exists() or done:
        counts = {pid: len(by.get(pid, [])) for pid in done}
        order = list(dict.fromkeys([*(marked or []), *(pid for pid, _ in lines)]))
        text = "".join(json.dumps({key: pid, "records": counts[pid]}) + "\n" for pid in order if pid in done).encode()
        if not marks.exists() or marks.read_bytes() != text:
            _replace(marks, text)
    return done


def pending(problems: Sequence[dict], output: str | Path, cfg: ShardConfig,
            complete: Callable[[list[dict]], bool] | None = None) -> tuple[list[dict], set[str]]:
    """This shard's problems that `output` does not hold yet, and the ids of those it does (`read_done`)."""
    done = read_done(output, complete)
    mine = shard_of(problems, cfg.num_shards, cfg.shard)
    return [p for p in mine if str(p["id"]) not in done], done


def _append(f, records: Iterable[dict]) -> None:
    f.write("".join(json.dumps(r) + "\n" for r in records))
    f.flush()
    os.fsync(f.fileno())


def write_records(output: str | Path, problems: Sequence[dict], submit: Callable[[dict], Any], max_in_flight: int,
                  desc: str, progress: bool = True) -> Iterator[tuple[dict, list[dict]]]:
    """Run `submit(problem)` (an ObjectRef of the problem's records) for every problem, at most `max_in_flight` at
    once; append each problem's records to `output`, then its done line; yield (problem, records) as they land.
    A failed task raises (what was written stays; a rerun resumes)."""
    from tqdm import tqdm

    from app.fanout import windowed

    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(problems), desc=desc, disable=not progress, dynamic_ncols=True, mininterval=2.0)
    try:
        with out.open("a") as f, done_path(out).open("a") as marks:
            for problem, records, error in windowed(problems, submit, max_in_flight):
                if error is not None:
                    raise error
                _append(f, records)
                _append(marks, [{"problem_id": problem["id"], "records": len(records)}])
                bar.update(1)
                yield problem, records
    finally:
        bar.close()


@contextmanager
def policy_pool(cfg, pool=None):
    """The given pool, or one started from `cfg` (a PoolConfig) and shut down on the way out."""
    if pool is not None:
        yield pool
        return
    from actors.policy import start_policy_pool

    pool = start_policy_pool(cfg)
    try:
        yield pool
    finally:
        pool.shutdown()
