"""`windowed`: the one fan-out of Ray tasks that every job uses (search, grading, MC labels, toy eval, benches).

A bounded window of tasks in flight keeps the actors busy without flooding the cluster with thousands of queued
tasks (and their workers); results come back as they finish, so a job can write each one at once and a killed
job loses at most what was in flight.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def windowed(items: Iterable[T], submit: Callable[[T], Any], max_in_flight: int
             ) -> Iterator[tuple[T, Any, BaseException | None]]:
    """Submit `submit(item)` (an ObjectRef) for each item, at most `max_in_flight` at once.

    Yields (item, result, None) as each task finishes, or (item, None, error) for a task that raised, in finishing
    order. Leaving the loop early (break, an exception) cancels what is still in flight.
    """
    import ray

    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    queue = iter(items)
    pending: dict[Any, T] = {}
    try:
        while True:
            while len(pending) < max_in_flight:
                item = next(queue, _END)
                if item is _END:
                    break
                pending[submit(item)] = item
            if not pending:
                return
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                item = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # a failed task: the caller decides (report, retry, raise)
                    yield item, None, e
                else:
                    yield item, result, None
    finally:
        for ref in pending:
            ray.cancel(ref, force=False)


def windowed_map(items: list[T], submit: Callable[[T], Any], max_in_flight: int, *, desc: str | None = None,
                 progress: bool = True) -> list:
    """`windowed` with results in item order and a progress bar; the first failed task raises."""
    from tqdm import tqdm

    out: list = [None] * len(items)
    with tqdm(total=len(items), desc=desc, disable=not progress, dynamic_ncols=True, mininterval=2.0) as bar:
        for (i, _), result, error in windowed(list(enumerate(items)), lambda pair: submit(pair[1]), max_in_flight):
            if error is not None:
                raise error
            out[i] = result
            bar.update(1)
    return out


_END: Any = object()
