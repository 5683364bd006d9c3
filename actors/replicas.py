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
    - Placement: `actors.placement` plans it (one placement group per replica; a tp-1 actor holds its GPU share,
      a tp > 1 actor none, its vLLM workers one GPU per bundle). Jobs plan all their pools at once and pass each
      pool its `slots` and the reserved `groups`; a pool started alone plans, checks and reserves itself.
    - Routing: each call goes to the replica with the fewest calls in flight *from this process* (ties broken
      round-robin).
    - Failure: on RayActorError / ActorDiedError / ActorUnavailableError the call is retried (at most
      `max_retries` times) on another replica while Ray restarts the dead one (an actor whose engine died exits,
      so that Ray does: `actors.model_actor`); when every replica is down it waits (up to `ready_timeout_s`) for
      one to answer `ready` again, since a restart reloads the model. A call that has not
      answered within `call_timeout_s` is cancelled, its replica is killed for Ray to restart (a hung engine
      never recovers by itself), and the call is retried on another replica. Callers lose nothing unless every
      retry fails.
    - Picklable: pass it into Ray tasks; a copy routes by its own in-flight counts and shares the actors.
      Only `shutdown()` (from any copy) kills the replicas; they also die with the process that created them.
    """

    def __init__(self, actor_cls: Any, init_kwargs: dict | None = None, replicas: int = 1, tp: int = 1,
                 num_cpus: float = 1.0, max_concurrency: int = 1000, max_retries: int = 8, name: str = "pool",
                 ready_timeout_s: float = 600.0, runtime_env: dict | None = None, call_timeout_s: float | None = None,
                 slots: list | None = None, groups: list | None = None, owned_groups: list | None = None,
                 num_gpus: float | None = None):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from actors.placement import check_fit, cluster_has_gpus, plan_pools, reserve

        if not ray.is_initialized():
            raise RuntimeError(f"{name}: start Ray first (ray.init or jobs.common.init_ray)")
        if slots is None:
            # A pool started on its own: its plan, checked and reserved here (jobs plan all their pools at once).
            if tp > 1 and not cluster_has_gpus():
                raise ConfigError(f"{name}: tp={tp} needs {tp} GPUs per replica, the cluster has none")
            cfg = PoolConfig(replicas=replicas, tp=tp, num_cpus=num_cpus, num_gpus=num_gpus)
            plan = plan_pools({name: cfg}, gpus=cluster_has_gpus())
            check_fit(plan)
            groups = owned_groups = reserve(plan, name=name, timeout_s=ready_timeout_s)
            slots = plan.slots
        self.name = name
        self.tp = tp
        self.max_retries = max_retries
        self.call_timeout_s = call_timeout_s
        self.restart_timeout_s = ready_timeout_s  # how long a caller waits for a restarting replica (model reload)
        self.placement_groups = list(owned_groups or [])  # removed at shutdown (a co-located PRM owns none)
        remote_cls = actor_cls if hasattr(actor_cls, "remote") else ray.remote(actor_cls)
        self.actors = []
        for slot in slots:
            opts: dict[str, Any] = dict(
                num_cpus=slot.num_cpus,
                num_gpus=slot.num_gpus,
                max_restarts=-1,
                max_task_retries=0,
                max_concurrency=max_concurrency,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=groups[slot.group], placement_group_bundle_index=slot.bundle,
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

    def _acquire_other(self, avoid: set[int]) -> int:
        """`_acquire`, but not a replica this call already timed out on (unless no other is left)."""
        for _ in range(len(self.actors)):
            i = self._acquire()
            if i not in avoid or len(avoid) >= len(self.actors):
                return i
            self._release(i)
        return self._acquire()

    def _wait_restarted(self, i: int) -> bool:
        """Block until replica i answers `ready` again (Ray is restarting it: its engine reloads), at most
        `restart_timeout_s`; False if it did not come back."""
        import ray

        deadline = time.monotonic() + self.restart_timeout_s
        attempt = 0
        while time.monotonic() < deadline:
            try:
                ray.get(self.actors[i].ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return True
            except _retryable():
                time.sleep(self._backoff(attempt))
                attempt += 1
            except Exception:
                return False
        return False

    async def _await_restarted(self, i: int) -> bool:
        """`_wait_restarted` for async callers."""
        deadline = time.monotonic() + self.restart_timeout_s
        attempt = 0
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(asyncio.wrap_future(self.actors[i].ready.remote().future()),
                                       max(1.0, deadline - time.monotonic()))
                return True
            except _retryable():
                await asyncio.sleep(self._backoff(attempt))
                attempt += 1
            except Exception:
                return False
        return False

    def _hung(self, i: int, ref: Any, attempt: int) -> None:
        """A call timed out on replica i: cancel it, and kill the replica so that Ray restarts it."""
        import ray

        log.warning("%s: replica %d did not answer within %g s; restarting it, retry %d/%d", self.name, i,
                    self.call_timeout_s, attempt + 1, self.max_retries)
        try:
            ray.cancel(ref, force=False)
        except Exception:
            pass
        try:
            ray.kill(self.actors[i], no_restart=False)
        except Exception:
            pass

    def call(self, method: str, *args, **kwargs) -> Any:
        """Call `method` on the least-loaded replica and wait for it; retried when the replica dies or hangs."""
        import ray
        from ray.exceptions import GetTimeoutError

        retryable = _retryable()
        avoid: set[int] = set()
        for attempt in range(self.max_retries + 1):
            i = self._acquire_other(avoid)
            ref = None
            try:
                ref = getattr(self.actors[i], method).remote(*args, **kwargs)
                return ray.get(ref, timeout=self.call_timeout_s)
            except (GetTimeoutError, *retryable) as e:
                if attempt >= self.max_retries:
                    raise
                if isinstance(e, GetTimeoutError):
                    avoid.add(i)
                    self._hung(i, ref, attempt)
                    continue
                log.warning("%s: replica %d failed (%s); retry %d/%d", self.name, i, type(e).__name__,
                            attempt + 1, self.max_retries)
                avoid.add(i)
                if len(avoid) >= len(self.actors):  # every replica is down: wait for the first to come back
                    avoid = {j for j in avoid if not self._wait_restarted(j)}
            finally:
                self._release(i)

    async def acall(self, method: str, *args, **kwargs) -> Any:
        """Async `call`, for callers inside an event loop (async actors, Serve deployments)."""
        retryable = _retryable()
        avoid: set[int] = set()
        for attempt in range(self.max_retries + 1):
            i = self._acquire_other(avoid)
            ref = None
            try:
                ref = getattr(self.actors[i], method).remote(*args, **kwargs)
                return await asyncio.wait_for(asyncio.wrap_future(ref.future()), self.call_timeout_s)
            except (asyncio.TimeoutError, *retryable) as e:
                if attempt >= self.max_retries:
                    raise
                if isinstance(e, asyncio.TimeoutError):
                    avoid.add(i)
                    self._hung(i, ref, attempt)
                    continue
                log.warning("%s: replica %d failed (%s); retry %d/%d", self.name, i, type(e).__name__,
                            attempt + 1, self.max_retries)
                avoid.add(i)
                if len(avoid) >= len(self.actors):
                    avoid = {j for j in avoid if not await self._await_restarted(j)}
            finally:
                self._release(i)

    def broadcast(self, method: str, *args, timeout: float | None = None, **kwargs) -> list[Any]:
        """Call `method` once on every replica; one result each, in replica order."""
        import ray

        return ray.get([getattr(a, method).remote(*args, **kwargs) for a in self.actors], timeout=timeout)

    def wait_ready(self, method: str = "ready", timeout: float | None = None) -> list[Any]:
        """Block until every replica has started (answers `method`), waiting out restarts; a failing constructor
        raises here."""
        import ray

        deadline = None if timeout is None else time.monotonic() + timeout
        out = []
        for actor in self.actors:
            attempt = 0
            while True:
                left = None if deadline is None else max(0.1, deadline - time.monotonic())
                try:
                    out.append(ray.get(getattr(actor, method).remote(), timeout=left))
                    break
                except _retryable()[1]:  # ActorUnavailableError: restarting
                    if deadline is not None and time.monotonic() >= deadline:
                        raise
                    time.sleep(self._backoff(attempt))
                    attempt += 1
        return out

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


def start_replicas(actor_cls: Any, init_kwargs: dict, cfg: PoolConfig, name: str, ready_timeout_s: float,
                   slots: list | None = None, groups: list | None = None,
                   owned_groups: list | None = None) -> tuple[ReplicaPool, list[dict]]:
    """Start `cfg.replicas` actors (a local Ray cluster if none is running; vLLM gets `tensor_parallel_size=tp`)
    and wait until each has loaded its model; their `info()` in replica order. `slots`/`groups`: where they go,
    from the job's plan (`actors.placement`); without them the pool plans and reserves itself."""
    import ray

    if not ray.is_initialized():
        ray.init()
    engine_kwargs = dict(cfg.engine_kwargs)
    if cfg.engine == "vllm":
        engine_kwargs.setdefault("tensor_parallel_size", cfg.tp)
    pool = ReplicaPool(
        actor_cls, init_kwargs=dict(init_kwargs, engine_kwargs=engine_kwargs),
        replicas=cfg.replicas, tp=cfg.tp, num_cpus=cfg.num_cpus, max_concurrency=cfg.max_concurrency,
        max_retries=cfg.max_retries, name=name, call_timeout_s=cfg.call_timeout_s, slots=slots, groups=groups,
        owned_groups=owned_groups, num_gpus=cfg.num_gpus, ready_timeout_s=ready_timeout_s,
    )
    try:
        info = pool.wait_ready("info", timeout=ready_timeout_s)
    except BaseException:
        pool.shutdown()
        raise
    return pool, info
