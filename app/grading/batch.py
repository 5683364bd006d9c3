"""Grade many (solution, gold) pairs: here, or in chunks as Ray tasks through the one windowed fan-out."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

from app.fanout import windowed
from app.grading.verify import DEFAULT_TIMEOUT, count_grades, grade, grade_stats


def _grade_chunk(pairs: Sequence[tuple[str, str]], timeout: float) -> tuple[list[bool], int, int]:
    before = grade_stats()
    results = [grade(p, g, timeout) for p, g in pairs]
    after = grade_stats()
    return results, after.checks - before.checks, after.timeouts - before.timeouts


_remote_grade_chunk = None


def grade_batch(
    pairs: Iterable[tuple[str, str]],
    num_workers: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    chunk_size: int | None = None,
) -> list[bool]:
    """Grade (prediction_text, gold_answer) pairs, in order.

    - Ray initialised: chunks run as Ray tasks (1 CPU each), at most `num_workers` at a time (default: the
      cluster's CPUs). Each task's timeout count is added to this process's `grade_stats()`.
    - Ray not initialised and num_workers None or 1: graded here, one after another; nothing is started.
    - Ray not initialised and num_workers > 1: an error, since starting a cluster is the job's business
      (`jobs.common.init_ray`).
    """
    pairs = [(p, g) for p, g in pairs]
    if not pairs:
        return []
    import ray

    if not ray.is_initialized():
        if num_workers not in (None, 1):
            raise RuntimeError(
                f"grade_batch(num_workers={num_workers}) runs on Ray, which is not initialised: "
                "call ray.init() (jobs do it with jobs.common.init_ray) or pass num_workers=1"
            )
        return _grade_chunk(pairs, timeout)[0]

    global _remote_grade_chunk
    if _remote_grade_chunk is None:
        _remote_grade_chunk = ray.remote(num_cpus=1)(_grade_chunk)
    workers = num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    size = chunk_size or max(1, min(128, math.ceil(len(pairs) / (workers * 8))))  # small enough to balance
    starts = range(0, len(pairs), size)
    results: list[bool] = [False] * len(pairs)
    for start, out, error in windowed(starts, lambda i: _remote_grade_chunk.remote(pairs[i:i + size], timeout),
                                      workers):
        if error is not None:
            raise error
        chunk_results, checks, timeouts = out
        results[start:start + len(chunk_results)] = chunk_results
        count_grades(checks, timeouts)
    return [bool(r) for r in results]
