"""What the policy and PRM actors share: one engine, a micro-batcher in front of it, and the stats jobs read.

A subclass loads its engine and says how a call is batched; the base keeps the counters and answers `ready`,
`info`, `stats`, `reset_stats` and `shutdown` the same way for both, so pools, benches and tests read one shape.
An engine that dies (`actors.engines.base.engine_dead`) takes its actor with it, so that Ray restarts both.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Awaitable, Callable

from actors.batching import BatchStats, MicroBatcher
from actors.engines.base import engine_dead

log = logging.getLogger(__name__)


class ModelActor:
    """Base of `PolicyActor` and `PRMActor` (wrapped with `ray.remote` by `actors.replicas.start_replicas`)."""

    engine: Any
    batcher: MicroBatcher | None = None

    def _start(self, engine_name: str, model: str, load: Callable[[], Any], batched: str | None,
               max_batch: int, gather_ms: float) -> None:
        """Load the engine (timed) and, when `batched` names one of its methods, merge concurrent calls into
        batches of that method (None: the engine batches by itself, as vLLM's async engine does)."""
        t0 = time.perf_counter()
        self.engine = load()
        self.load_seconds = time.perf_counter() - t0
        self.engine_name, self.model = engine_name, model
        self.num_parameters = int(self.engine.num_parameters)
        if batched is not None:
            self.batcher = MicroBatcher(getattr(self.engine, batched), max_batch=max_batch, gather_ms=gather_ms)
        self.inflight = self.max_inflight = 0
        self.reset_counters()

    async def _serve(self, run: Callable[[], Awaitable[Any]]) -> Any:
        """Run one call, counting it in flight and its wall seconds."""
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        t0 = time.perf_counter()
        try:
            return await run()
        except Exception as e:
            if engine_dead(e):
                # The actor would live on around a dead engine (vLLM raises EngineDeadError for every later call)
                # and least-loaded routing would feed it MORE work. Exiting hands it to Ray, which restarts the
                # actor (max_restarts=-1); the pool retries its callers' requests on the replicas that are alive.
                log.error("engine dead (%s: %s); exiting so that Ray restarts this replica", type(e).__name__, e)
                os._exit(1)
            raise
        finally:
            self.inflight -= 1
            self.busy_s += time.perf_counter() - t0
            self.calls += 1

    def reset_counters(self) -> None:
        """Subclasses add their own counters here."""
        self.calls, self.busy_s = 0, 0.0

    def ready(self) -> bool:
        return True

    def info(self) -> dict:
        """Includes where Ray placed this replica (its resources, placement group, node), as the dry run planned."""
        import ray

        d = dict(engine=self.engine_name, model=self.model, num_parameters=self.num_parameters, pid=os.getpid(),
                 host=socket.gethostname(), load_seconds=self.load_seconds,
                 dtype=getattr(self.engine, "dtype", None))
        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            ctx = ray.get_runtime_context()  # in an actor, not when a test builds the class in its own process
            d.update(node_id=ctx.get_node_id(), resources=dict(ctx.get_assigned_resources()),
                     placement_group=ctx.get_placement_group_id(), gpu_ids=[str(g) for g in ray.get_gpu_ids()])
        return d

    def stats(self) -> dict:
        """Calls served; for a micro-batched engine its batches (sizes in items; a failed merged batch run again
        caller by caller counts each run), the merged batches that failed (`isolated_batches`) and seconds inside
        the engine."""
        d: dict[str, Any] = dict(engine=self.engine_name, pid=os.getpid(), calls=self.calls, inflight=self.inflight,
                                 max_inflight=self.max_inflight, engine_s=0.0, batches=0)
        if self.batcher is not None:
            s = self.batcher.stats
            d.update(engine_s=s.busy_s, batches=s.batches, items=s.items, largest_batch=s.largest,
                     batch_sizes=list(s.sizes), mean_batch=(s.items / s.batches) if s.batches else 0.0,
                     isolated_batches=s.isolated)
        cache = getattr(self.engine, "prefix_cache", None)
        if cache is not None:
            d["prefix_cache"] = cache.stats()
        return d

    def reset_stats(self) -> None:
        self.reset_counters()
        self.max_inflight = 0
        if self.batcher is not None:
            self.batcher.stats = BatchStats()
        cache = getattr(self.engine, "prefix_cache", None)
        if cache is not None:
            cache.reset_counters()

    def shutdown(self) -> None:
        close = getattr(self.engine, "close", None) or getattr(self.engine, "shutdown", None)
        if close is not None:
            close()
