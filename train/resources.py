"""A training run that waits for its workers' CPUs/GPUs says so, and stops waiting when told.

Why: Ray Train (V2) waits 60 s for the workers' placement group, then counts a `WorkerGroupStartupTimeoutError`
as a controller failure and tries again, with no limit by default (`FailureConfig.controller_failure_limit=-1`).
On an autoscaling cluster that is right: nodes come. On a fixed cluster whose CPUs are held by something else
(a Serve app, a policy pool, a placement group left by a killed run) the run waits forever and prints nothing to
the driver; not even pytest-timeout's alarm breaks into it. So ponder bounds the wait (`train.resource_wait_s`),
says before `fit` when the workers do not fit in what is free now, and on giving up names what holds the cluster.
"""
from __future__ import annotations

import math
import sys

START_ATTEMPT_S = 60.0  # Ray Train's wait for the placement group per attempt (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S)


class ClusterBusy(RuntimeError):
    """The cluster did not free the training workers' resources within `train.resource_wait_s`."""


def controller_failure_limit(resource_wait_s: float | None) -> int:
    """Ray Train's retries of a worker-group start that found no resources: enough attempts to cover the wait;
    -1 (unlimited) when there is no limit."""
    if resource_wait_s is None:
        return -1
    return max(0, math.ceil(resource_wait_s / START_ATTEMPT_S) - 1)


def need(per_worker: dict[str, float], workers: int) -> dict[str, float]:
    return {k: v * workers for k, v in per_worker.items() if v}


def short_of(per_worker: dict[str, float], workers: int) -> dict[str, float]:
    """What the workers need beyond what the cluster has free now (empty: they fit)."""
    import ray

    free = ray.available_resources()
    return {k: v - free.get(k, 0.0) for k, v in need(per_worker, workers).items() if free.get(k, 0.0) < v}


def holders(limit: int = 8) -> list[str]:
    """What holds CPUs/GPUs now: live actors outside placement groups, and placement groups' reserved bundles."""
    try:
        import ray
        from ray.util.state import list_actors, list_placement_groups

        kw = dict(address=ray.get_runtime_context().gcs_address, detail=True, limit=1000, raise_on_missing_output=False)
        actors = list_actors(filters=[("state", "=", "ALIVE")], **kw)   # this cluster's, if others run beside it
        groups = list_placement_groups(filters=[("state", "=", "CREATED")], **kw)
    except Exception:  # no State API (no dashboard): the message goes without the list
        return []
    out = []
    for a in actors:
        res = {k: v for k, v in (a.required_resources or {}).items() if k in ("CPU", "GPU") and v}
        if res and not a.placement_group_id:
            out.append(f"actor {a.class_name}{f' {a.name!r}' if a.name else ''} ({_fmt(res)})")
    for g in groups:
        total: dict[str, float] = {}
        for b in g.bundles or []:
            for k, v in (b.get("unit_resources") or {}).items():
                if k in ("CPU", "GPU"):
                    total[k] = total.get(k, 0.0) + v
        if total:
            out.append(f"placement group {g.name or g.placement_group_id[:8]} ({_fmt(total)})")
    return out[:limit] + ([f"{len(out) - limit} more"] if len(out) > limit else [])


def _fmt(res: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(res.items()))


def describe(per_worker: dict[str, float], workers: int) -> str:
    import ray

    free, total = ray.available_resources(), ray.cluster_resources()
    have = ", ".join(f"{free.get(k, 0.0):g} of {total.get(k, 0.0):g} {k}" for k in need(per_worker, workers))
    msg = (f"training needs {workers} workers x {_fmt(per_worker)} ({_fmt(need(per_worker, workers))} in all); "
           f"free now: {have}")
    held = holders()
    return msg + (f"; held by: {'; '.join(held)}" if held else "")


def warn_if_short(per_worker: dict[str, float], workers: int, resource_wait_s: float | None) -> None:
    """One line on stderr before `fit` when the workers do not fit in what is free now."""
    try:
        if not short_of(per_worker, workers):
            return
        wait = "with no limit (train.resource_wait_s: null)" if resource_wait_s is None else \
            f"up to {resource_wait_s:g} s (train.resource_wait_s)"
        print(f"ponder: waiting {wait} for the cluster to free them: {describe(per_worker, workers)}",
              file=sys.stderr, flush=True)
    except Exception:  # a note, never a reason to fail
        return


def busy_error(per_worker: dict[str, float], workers: int, resource_wait_s: float | None) -> ClusterBusy:
    return ClusterBusy(
        f"the training workers never got their resources in {resource_wait_s or 0:g} s: "
        f"{describe(per_worker, workers)}. Free them (shut down what holds them: `serve shutdown`, a pool or job "
        "left running), lower train.num_workers or train.cpus_per_worker, or raise train.resource_wait_s (null: "
        "wait with no limit, for an autoscaling cluster)")


def gave_up_waiting(error: BaseException | None) -> bool:
    """Whether a Ray Train error is its controller giving up on starting the worker group for want of resources."""
    from train.startup import error_chain

    return any(type(e).__name__ == "WorkerGroupStartupTimeoutError" for e in error_chain(error))
