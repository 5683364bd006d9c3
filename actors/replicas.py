"""Replicas of one model's actor: placed with placement groups, called by least load, retried on death.

`ReplicaPool` is generic (any actor class + its init kwargs). `ModelPool` is the replicas of one model started
from a PoolConfig, and `PoolClient` the one generic handle search code calls on it: it routes a call to the
least-loaded replica, retries it when a replica dies, and adds what the call cost to `usage`. `actors.policy` and
`actors.prm` only name the actor, the method they call and how it is counted.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

from app.config import ConfigError
from app.contracts import Usage
from app.pool_config import PoolConfig

log = logging.getLogger(__name__)


def _retryable():
    import ray.exceptions as rex

    return (rex.RayActorError, rex.ActorUnavailableError)


class ReplicaPool:
    """N replicas of one Ray actor class, each with its own placement group; calls routed by least load.

    API (generic: the policy and PRM pools both use it)::

        pool = ReplicaPool(actor_cls, init_kwargs={...}, replicas=2, tp=1, num_cpus=1, name="policy")
        pool.wait_ready("ready")              # optional: block until every replica answers `ready()`
        result = pool.call("method", *args, **kw)          # sync: ray.get, with retries on replica death
        result = await pool.acall("method", *args, **kw)   # async variant for async callers
        results = pool.broadcast("stats")    # one result per replica (no retries), e.g. stats, info
        pool.actors, pool.inflight, len(pool)
        pool.shutdown()

    - `actor_cls`: a plain class or a `ray.remote` class. Replicas get `max_restarts=-1`, `max_concurrency`.
    - Placement: when the cluster has GPUs, each replica gets one placement group of `tp` bundles
      `{"GPU": 1, "CPU": num_cpus}` (PACK); the actor sits on bundle 0 and, for tp == 1, holds that GPU
      (`num_gpus=1`); for tp > 1 it holds none itself (the vLLM "ray" executor starts one worker per bundle and
      finds the group through `placement_group_capture_child_tasks`). Without GPUs, one bundle
      `{"CPU": num_cpus}` per replica (tp > 1 then needs GPUs: a ConfigError says so).
    - Routing: each call goes to the replica with the fewest calls in flight *from this process* (ties broken
      round-robin).
    - Failure: on RayActorError / ActorDiedError / ActorUnavailableError the call is retried (at most
      `max_retries` times, backoff 0.5 s doubling to 8 s) on the least-loaded replica, while Ray restarts the
      dead one; callers lose nothing unless every retry fails.
    - Picklable: pass it into Ray tasks; a copy routes by its own in-flight counts and shares the actors.
      Only `shutdown()` (from any copy) kills the replicas; they also die with the process that created them.
    """

    def __init__(self, actor_cls: Any, init_kwargs: dict | None = None, replicas: int = 1, tp: int = 1,
                 num_cpus: float = 1.0, max_concurrency: int = 1000, max_retries: int = 8, name: str = "pool",
                 ready_timeout_s: float = 600.0, runtime_env: dict | None = None):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if replicas < 1:
            raise ConfigError(f"{name}: replicas must be >= 1, got {replicas}")
        if tp < 1:
            raise ConfigError(f"{name}: tp must be >= 1, got {tp}")
        if not ray.is_initialized():
            raise RuntimeError(f"{name}: start Ray first (ray.init or jobs.common.init_ray)")
        total = ray.cluster_resources()
        gpus = int(total.get("GPU", 0))
        if tp > 1 and gpus < tp:
            raise ConfigError(f"{name}: tp={tp} needs {tp} GPUs per replica, the cluster has {gpus}")
        if gpus and replicas * tp > gpus:
            raise ConfigError(f"{name}: {replicas} replicas x tp={tp} need {replicas * tp} GPUs, the cluster has {gpus}")
        if num_cpus * replicas * (tp if gpus else 1) > total.get("CPU", 0):
            raise ConfigError(f"{name}: {replicas} replicas x num_cpus={num_cpus} exceed the cluster's "
                              f"{total.get('CPU', 0):g} CPUs")

        self.name = name
        self.tp = tp
        self.max_retries = max_retries
        self.uses_gpus = gpus > 0
        remote_cls = actor_cls if hasattr(actor_cls, "remote") else ray.remote(actor_cls)
        self.placement_groups = []
        self.actors = []
        for i in range(replicas):
            if self.uses_gpus:
                bundles = [{"GPU": 1, "CPU": num_cpus} for _ in range(tp)]
            else:
                bundles = [{"CPU": num_cpus}]
            pg = placement_group(bundles, strategy="PACK", name=f"{name}-{i}-{os.getpid()}-{id(self)}")
            try:
                ray.get(pg.ready(), timeout=ready_timeout_s)
            except Exception:
                self._remove_groups([pg, *self.placement_groups])
                raise ConfigError(f"{name}: could not place replica {i} ({bundles}) within {ready_timeout_s:g} s; "
                                  f"cluster resources: {dict(total)}") from None
            self.placement_groups.append(pg)
            opts: dict[str, Any] = dict(
                num_cpus=num_cpus,
                num_gpus=1 if (self.uses_gpus and tp == 1) else 0,
                max_restarts=-1,
                max_task_retries=0,
                max_concurrency=max_concurrency,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=0,
                    placement_group_capture_child_tasks=True),
            )
            if runtime_env:
                opts["runtime_env"] = runtime_env
            self.actors.append(remote_cls.options(**opts).remote(**(init_kwargs or {})))
        self._setup_local()

    # --- local (per-process) state ----------------------------------------------------------------------------

    def _setup_local(self) -> None:
        self.inflight = [0] * len(self.actors)
        self._calls = [0] * len(self.actors)
        # A copy unpickled in each Ray task starts its round-robin at a random replica: otherwise the first call
        # of every task lands on replica 0 while the others idle.
        self._rr = random.randrange(max(1, len(self.actors)))
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("inflight", "_calls", "_rr", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._setup_local()

    def __len__(self) -> int:
        return len(self.actors)

    @property
    def calls_per_replica(self) -> list[int]:
        """Calls this process has sent to each replica (retries included)."""
        return list(self._calls)

    def _acquire(self) -> int:
        with self._lock:
            n = len(self.actors)
            if not n:
                raise RuntimeError(f"{self.name}: the pool has been shut down")
            low = min(self.inflight)
            i = next(j for k in range(n) if self.inflight[(j := (self._rr + k) % n)] == low)
            self._rr = (i + 1) % n
            self.inflight[i] += 1
            self._calls[i] += 1
            return i

    def _release(self, i: int) -> None:
        with self._lock:
            self.inflight[i] -= 1

    def _backoff(self, attempt: int) -> float:
        return min(8.0, 0.5 * 2 ** attempt)

    # --- calls ------------------------------------------------------------------------------------------------

    def call(self, method: str, *args, **kwargs) -> Any:
        """Call `method` on the least-loaded replica and wait for it; retried when the replica dies."""
        import ray

        retryable = _retryable()
        for attempt in range(self.max_retries + 1):
            i = self._acquire()
            try:
                return ray.get(getattr(self.actors[i], method).remote(*args, **kwargs))
            except retryable as e:
                if attempt >= self.max_retries:
                    raise
                log.warning("%s: replica %d failed (%s); retry %d/%d", self.name, i, type(e).__name__,
                            attempt + 1, self.max_retries)
                time.sleep(self._backoff(attempt))
            finally:
                self._release(i)

    async def acall(self, method: str, *args, **kwargs) -> Any:
        """Async `call`, for callers inside an event loop (async actors, Serve deployments)."""
        retryable = _retryable()
        for attempt in range(self.max_retries + 1):
            i = self._acquire()
            try:
                return await getattr(self.actors[i], method).remote(*args, **kwargs)
            except retryable as e:
                if attempt >= self.max_retries:
                    raise
                log.warning("%s: replica %d failed (%s); retry %d/%d", self.name, i, type(e).__name__,
                            attempt + 1, self.max_retries)
                await asyncio.sleep(self._backoff(attempt))
            finally:
                self._release(i)

    def broadcast(self, method: str, *args, timeout: float | None = None, **kwargs) -> list[Any]:
        """Call `method` once on every replica; one result each, in replica order."""
        import ray

        return ray.get([getattr(a, method).remote(*args, **kwargs) for a in self.actors], timeout=timeout)

    def wait_ready(self, method: str = "ready", timeout: float | None = None) -> list[Any]:
        """Block until every replica has started (answers `method`); a failing constructor raises here."""
        return self.broadcast(method, timeout=timeout)

    def shutdown(self) -> None:
        """Kill every replica (no restart) and remove the placement groups. Idempotent."""
        import ray

        if not ray.is_initialized():
            return
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        self._remove_groups(self.placement_groups)
        self.actors, self.placement_groups = [], []
        self._setup_local()

    @staticmethod
    def _remove_groups(groups) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in groups:
            try:
                remove_placement_group(pg)
            except Exception:
                pass


# A name is a local path (and must exist) when it starts with ".", "/" or "~", has more than one "/", ends like a
# checkpoint (checkpoint-500, global_step100, final, a weights file), or its first folder exists here ("models/x"
# with a ./models folder). Anything else ("org/name", "name") is taken for a Hub id and not checked here.
_CHECKPOINT_END = re.compile(
    r"(^|/)((checkpoint|global_step|step|epoch)[-_]?\d+|final)$|\.(safetensors|bin|pt|pth|ckpt|gguf)$", re.IGNORECASE)


def _looks_local(model: str) -> bool:
    return (model.startswith((".", "/", "~")) or model.count("/") > 1 or bool(_CHECKPOINT_END.search(model))
            or ("/" in model and Path(model.split("/", 1)[0]).is_dir()))


def check_model(model: str, key: str = "model") -> str:
    """Resolve `toy:` names; a name that is, or looks like, a local path must be a checkpoint folder (config.json).

    Raises ConfigError (one line, naming `key`, e.g. "policy.model"). Hub ids (`org/name`) are returned unchecked:
    there may be no hub access where the job starts."""
    from app.toy import resolve_model

    try:
        path = resolve_model(model)
    except FileNotFoundError as e:
        raise ConfigError(f"{key}: {e}") from None
    folder = Path(path).expanduser()
    if not (model.startswith("toy:") or folder.exists() or _looks_local(model)):
        return path
    if not folder.exists():
        raise ConfigError(f"{key}: {model!r} is a local path that does not exist (no config.json at {folder}); "
                          "give a checkpoint folder, a Hub id ORG/NAME or toy:NAME")
    if not (folder / "config.json").exists():
        raise ConfigError(f"{key}: {model!r}: no config.json at {path} (give a Hub id ORG/NAME, a checkpoint "
                          "folder or toy:NAME)")
    return path


class PoolClient:
    """A picklable handle on a pool: `call`/`acall` a replica's method and count what it cost in `usage`.

    `account(usage, result, num_parameters)` adds one call's tokens and FLOPs; a copy (in a Ray task) starts with
    its own copy of `usage`, so each task measures its own problem.
    """

    account: Callable[[Usage, Any, int], None] = staticmethod(lambda usage, result, params: None)

    def __init__(self, pool: ReplicaPool, num_parameters: int, model: str = ""):
        self.pool = pool
        self.num_parameters = int(num_parameters)
        self.model = model
        self.usage = Usage()

    def call(self, method: str, *args: Any) -> Any:
        """Blocking: for Ray tasks and threads."""
        out = self.pool.call(method, *args)
        self.account(self.usage, out, self.num_parameters)
        return out

    async def acall(self, method: str, *args: Any) -> Any:
        """Awaiting: for async actors and Serve deployments."""
        out = await self.pool.acall(method, *args)
        self.account(self.usage, out, self.num_parameters)
        return out


class ModelPool:
    """Replicas of one model's actor, started from a PoolConfig by `start_replicas`. Picklable (the actors are
    shared, not copied); `client()` gives a fresh handle of the pool's client class."""

    def __init__(self, cfg: PoolConfig, pool: ReplicaPool, info: list[dict], client_class: type[PoolClient],
                 shutdown_timeout_s: float = 30.0):
        self.cfg = cfg
        self.pool = pool
        self.info = info
        self.client_class = client_class
        self.shutdown_timeout_s = shutdown_timeout_s
        # the parameters the clients count FLOPs with (the matmul ones per token); every parameter: info[i]
        self.num_parameters = int(info[0].get("flop_parameters", info[0]["num_parameters"])) if info else 0

    def client(self):
        return self.client_class(self.pool, self.num_parameters, self.cfg.model)

    @property
    def actors(self) -> list:
        return self.pool.actors

    def stats(self) -> list[dict]:
        return self.pool.broadcast("stats")

    def reset_stats(self) -> None:
        self.pool.broadcast("reset_stats")

    def shutdown(self) -> None:
        try:
            self.pool.broadcast("shutdown", timeout=self.shutdown_timeout_s)
        except Exception:
            pass
        self.pool.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def start_replicas(actor_cls: Any, init_kwargs: dict, cfg: PoolConfig, name: str,
                   ready_timeout_s: float) -> tuple[ReplicaPool, list[dict]]:
    """Start `cfg.replicas` actors (a local Ray cluster if none is running; vLLM gets `tensor_parallel_size=tp`)
    and wait until each has loaded its model; their `info()` in replica order."""
    import ray

    if not ray.is_initialized():
        ray.init()
    engine_kwargs = dict(cfg.engine_kwargs)
    if cfg.engine == "vllm":
        engine_kwargs.setdefault("tensor_parallel_size", cfg.tp)
    pool = ReplicaPool(
        actor_cls, init_kwargs=dict(init_kwargs, engine_kwargs=engine_kwargs),
        replicas=cfg.replicas, tp=cfg.tp, num_cpus=cfg.num_cpus, max_concurrency=cfg.max_concurrency,
        max_retries=cfg.max_retries, name=name,
    )
    try:
        info = pool.wait_ready("info", timeout=ready_timeout_s)
    except BaseException:
        pool.shutdown()
        raise
    return pool, info
