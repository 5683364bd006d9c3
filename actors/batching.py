"""Merge concurrent calls that reach one async actor into one engine batch.

Callers `await batcher.submit(items)`; the first caller of an idle batcher waits `gather_ms` for others (and keeps
waiting, up to 4 x gather_ms, while more calls are still arriving and the batch is not full), then one
`process(all_items)` call runs and each caller gets back its own slice. Engines are far more efficient on one
batch of 64 than on 64 batches of 1, and callers (search tasks) arrive a few at a time.

One caller's bad input never fails the others: when a batch that merged several callers raises, each caller's
items run again alone, so only the caller whose items fail gets the error (and the others their results). The
engines check their inputs before they compute (an over-long prompt fails at once), so the retry costs little.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    largest: int = 0
    sizes: list[int] = field(default_factory=list)
    busy_s: float = 0.0  # seconds inside `process`: over wall time, how busy the engine was
    isolated: int = 0  # merged batches that failed and were run again caller by caller

    def record(self, n: int) -> None:
        self.batches += 1
        self.items += n
        self.largest = max(self.largest, n)
        self.sizes.append(n)
        del self.sizes[:-1000]


class MicroBatcher:
    """`process(items) -> results` (sync or async) is called with at most `max_batch` items at a time.

    A sync `process` runs in a worker thread so the actor's event loop keeps accepting calls meanwhile.
    """

    def __init__(self, process: Callable[[list[Any]], Any], max_batch: int = 64, gather_ms: float = 5.0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._process = process
        self.max_batch = max_batch
        self.gather_s = gather_ms / 1000.0
        self._queue: list[tuple[list[Any], asyncio.Future]] = []
        self._runner: asyncio.Task | None = None
        self.stats = BatchStats()

    async def submit(self, items: Sequence[Any]) -> list[Any]:
        if not items:
            return []
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.append((list(items), fut))
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run())
        return await fut

    def _queued(self) -> int:
        return sum(len(items) for items, _ in self._queue)

    async def _run(self) -> None:
        while self._queue:
            await asyncio.sleep(self.gather_s)
            waited = self.gather_s
            while waited < 4 * self.gather_s and self._queued() < self.max_batch:
                before = self._queued()
                await asyncio.sleep(self.gather_s / 2)
                waited += self.gather_s / 2
                if self._queued() == before:  # callers stopped arriving: go
                    break
            batch, owners, n = [], [], 0
            while self._queue and (n == 0 or n + len(self._queue[0][0]) <= self.max_batch):
                items, fut = self._queue.pop(0)
                owners.append((fut, n, n + len(items)))
                batch.extend(items)
                n += len(items)
            try:
                results = await self._call(batch)
            except Exception as e:
                if len(owners) == 1:
                    self._fail(owners, e)
                    continue
                # Several callers merged: one caller's bad items must not fail the others. Run each alone.
                self.stats.isolated += 1
                for fut, lo, hi in owners:
                    if fut.done():
                        continue
                    try:
                        mine = await self._call(batch[lo:hi])
                    except Exception as e1:
                        fut.set_exception(e1)
                    except BaseException as e1:  # cancelled or interrupted: the callers left get it too
                        self._fail(owners, e1)
                        break
                    else:
                        fut.set_result(mine)
                continue
            except BaseException as e:  # cancelled or interrupted: every caller of this batch gets it
                self._fail(owners, e)
                continue
            for fut, lo, hi in owners:
                if not fut.done():
                    fut.set_result(results[lo:hi])

    async def _call(self, batch: list[Any]) -> list[Any]:
        """One engine call (counted in the stats); its results must match the batch one for one."""
        self.stats.record(len(batch))
        t0 = time.perf_counter()
        try:
            if asyncio.iscoroutinefunction(self._process):
                results = await self._process(batch)
            else:
                results = await asyncio.to_thread(self._process, batch)
        finally:
            self.stats.busy_s += time.perf_counter() - t0
        results = list(results)
        if len(results) != len(batch):
            raise RuntimeError(f"the engine returned {len(results)} results for a batch of {len(batch)} items")
        return results

    @staticmethod
    def _fail(owners: list[tuple[asyncio.Future, int, int]], error: BaseException) -> None:
        for fut, _, _ in owners:
            if not fut.done():
                fut.set_exception(error)
