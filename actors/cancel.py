"""Pool clients whose calls stop when a request is abandoned (its deadline passed, its client disconnected).

A search runs synchronously in a thread and calls its policy and PRM clients step by step; `cancellable(client,
stop)` makes every call check a `threading.Event`: once it is set, a call not yet sent raises `Cancelled`, and a
call in flight is `ray.cancel`led and raises it, so the thread unwinds and the pool's in-flight count drops at once.
(The engine may still finish the batch it is computing: ray.cancel stops the actor's coroutine, not a batch already
running in the engine's thread.)
"""
from __future__ import annotations

import threading
from typing import Any


class Cancelled(Exception):
    """A search stopped because its client left or its deadline passed."""


def cancellable(client: Any, stop: threading.Event, poll_s: float = 0.05) -> Any:
    """The client, its pool calls cancelled once `stop` is set: a call not yet sent is refused, a call in flight is
    cancelled (`ray.cancel`; the pool's in-flight count drops at once) and the search's thread unwinds. A call whose
    replica died goes through the pool's own retrying `call`."""
    if client is None:
        return None
    import ray

    pool = client.pool
    retryable = _retryable_errors()

    def guarded(method: str, *args: Any) -> Any:
        if stop.is_set():
            raise Cancelled()
        i = pool._acquire()  # the pool's least-loaded replica and its in-flight count, as pool.call does
        try:
            ref = getattr(pool.actors[i], method).remote(*args)
            while not ray.wait([ref], timeout=poll_s)[0]:
                if stop.is_set():
                    ray.cancel(ref)
                    raise Cancelled()
        finally:
            pool._release(i)
        try:
            out = ray.get(ref)
        except retryable:
            out = pool.call(method, *args)
        client.account(client.usage, out, client.num_parameters)
        return out

    client.call = guarded
    return client


def _retryable_errors() -> tuple:
    from actors.replicas import _retryable

    return tuple(_retryable())
