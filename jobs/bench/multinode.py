"""A Ray cluster of several nodes on one machine, for node-death tests and `python -m jobs.bench chaos`:
`ray.cluster_utils.Cluster`, as Ray's own fault-tolerance tests use it. Each node is its own raylet with its own
CPUs; `remove_node` kills the raylet and every worker process on it, as a lost machine would.

The process that starts it does not connect to it (a test session's own cluster stays as it is): jobs run against
it in a subprocess with RAY_ADDRESS, as `ray job submit` runs them on a real cluster.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PONDER = Path(sys.executable).with_name("ponder")


@contextlib.contextmanager
def multi_node_cluster(workers: list[dict], head: dict | None = None):
    """A head (no CPUs by default: only the GCS and the drivers, so it never holds a replica and can stay up) and
    one worker node per dict of `add_node` arguments (`num_cpus`, `num_gpus`, `resources`)."""
    from ray._private.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    # Cluster writes its head's address into Ray's "current cluster" file, where auto-detection looks. Left behind,
    # it misleads every later lookup on this machine: Ray Train's PlacementGroupCleaner (which finds its cluster
    # that way) asked the dead address whether its controller lived and removed a running training group's
    # placement group (seen in a test run after a node-death test). The file is put back as it was.
    address_file = Path(get_ray_address_file(None))
    before = address_file.read_text() if address_file.exists() else None
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, **(head or {})})
    try:
        nodes = [cluster.add_node(**w) for w in workers]
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:
        cluster.shutdown()
        if before is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(before)


def job_env(cluster) -> dict:
    """The environment of a driver that connects to `cluster`: this process's own, auth variables included. The
    Cluster's nodes took their token-auth mode from this environment when they started (`ray.init` earlier in
    this process sets RAY_AUTH_MODE=token in it), and a driver must match them: a driver with token auth against
    nodes without it had its actors destroyed at creation, one without against nodes with it is refused
    ("InvalidAuthToken"; both measured)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
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


def written_ids(out: Path) -> list[str]:
    """Every record line of a search run's shards, duplicates kept (`read_records` would hide a problem solved
    twice)."""
    import json

    ids = []
    for shard in sorted(Path(out).glob("*.jsonl")):
        for line in shard.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(rec, dict) and "id" in rec:
                ids.append(rec["id"])
    return ids


def registered_checkpoint(run_dir: Path) -> str | None:
    """The latest checkpoint Ray Train's controller has registered for a run (its `checkpoint_manager_snapshot.json`),
    or None. A checkpoint a worker has reported is not yet one a restart resumes from: the controller polls the
    workers' reports, and reports still queued on a worker that dies are lost with it."""
    import json

    try:
        snap = json.loads((Path(run_dir) / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return None
    latest = snap.get("latest_checkpoint_result") or {}
    return latest.get("checkpoint_dir_name")
