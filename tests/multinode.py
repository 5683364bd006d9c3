"""A Ray cluster of several nodes on one machine, for node-death tests (issue 33): `ray.cluster_utils.Cluster`, as
Ray's own fault-tolerance tests use it. Each node is its own raylet with its own CPUs; `remove_node` kills the
raylet and every worker process on it, as a lost machine would.

The test process does not connect to it (the session's `ray_cluster` stays as it is): jobs run against it in a
subprocess with RAY_ADDRESS, as `ray job submit` runs them on a real cluster.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PONDER = Path(sys.executable).with_name("ponder")


@contextlib.contextmanager
def multi_node_cluster(workers: list[dict], head: dict | None = None):
    """A head (no CPUs by default: only the GCS and the drivers, so it never holds a replica and can stay up) and
    one worker node per dict of `add_node` arguments (`num_cpus`, `num_gpus`, `resources`)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, **(head or {})})
    try:
        nodes = [cluster.add_node(**w) for w in workers]
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:
        cluster.shutdown()


def job_env(cluster) -> dict:
    """The environment of a driver that connects to `cluster`. A Cluster started in-process runs without token
    auth; a driver started with RAY_AUTH_MODE=token against it had its actors destroyed at creation ("all
    references to the actor were removed"; measured), so the auth variables are left out."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                                            "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_ADDRESS=cluster.address, PYTHONUNBUFFERED="1")
    return env


def node_of(pid: int, nodes) -> object | None:
    """The node (of `nodes`) whose raylet is an ancestor of process `pid`: where a worker or actor runs."""
    import psutil

    raylets = {n.all_processes["raylet"][0].process.pid: n for n in nodes}
    try:
        proc = psutil.Process(pid)
        while proc is not None:
            if proc.pid in raylets:
                return raylets[proc.pid]
            proc = proc.parent()
    except psutil.NoSuchProcess:
        return None
    return None


def actor_pids(name_part: str, nodes) -> dict[int, object]:
    """{pid: node} of the processes titled `ray::<name_part>...` on `nodes` (other clusters' are left out)."""
    import psutil

    found = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith(f"ray::{name_part}"):
            node = node_of(p.info["pid"], nodes)
            if node is not None:
                found[p.info["pid"]] = node
    return found
