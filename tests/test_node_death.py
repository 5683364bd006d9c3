"""A node dies mid-search (issue 33): the policy and PRM replicas on it restart on the node left, the tasks it ran
are retried, and every problem is written exactly once. A real multi-node Ray cluster on this machine
(tests/multinode.py), the real `ponder search` job as a driver against it, the real toy models."""
from __future__ import annotations

import json
import subprocess
import time
from collections import Counter

import pytest

from tests.multinode import PONDER, REPO, actor_pids, job_env, multi_node_cluster

PROBLEMS = 24


def _written_ids(out) -> list[str]:
    """Every record line of the run's shards, duplicates kept (read_records would hide a problem solved twice)."""
    ids = []
    for shard in sorted(out.glob("*.jsonl")):
        for line in shard.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "id" in rec:
                ids.append(rec["id"])
    return ids


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_search_survives_the_death_of_the_node_holding_the_prm_replica(tmp_path):
    out = tmp_path / "out"
    with multi_node_cluster([{"num_cpus": 3}, {"num_cpus": 3}]) as (cluster, nodes):
        cmd = [str(PONDER), "search", "--config", "toy/best_of_n", f"data.limit={PROBLEMS}", "search.n=4",
               "search.max_tokens=256", "policy.replicas=2", "prm.replicas=1", "max_in_flight=4",
               f"output_dir={out}"]
        log = tmp_path / "search.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(cluster), stdout=f, stderr=subprocess.STDOUT)
            try:
                # wait until the run is under way: some problems written, most still to go
                deadline = time.monotonic() + 480
                while len(_written_ids(out)) < 3:
                    assert proc.poll() is None, log.read_text()[-4000:]
                    assert time.monotonic() < deadline, log.read_text()[-4000:]
                    time.sleep(0.5)
                prm = actor_pids("PRMActor", nodes)
                assert len(prm) == 1, prm
                doomed = next(iter(prm.values()))
                policies_there = [pid for pid, n in actor_pids("PolicyActor", nodes).items() if n is doomed]
                written_at_death = len(_written_ids(out))
                cluster.remove_node(doomed, allow_graceful=False)  # the machine is gone: raylet and workers
                survivor = next(n for n in nodes if n is not doomed)
                restarted = False  # the PRM replica comes back on the node left (the run needs it for every problem)
                while proc.poll() is None and not restarted:
                    restarted = bool(actor_pids("PRMActor", [survivor]))
                    time.sleep(0.5)
                code = proc.wait(timeout=600)
            finally:
                if proc.poll() is None:
                    proc.kill()
        text = log.read_text()
        assert written_at_death < PROBLEMS, "the node died after the run had finished: nothing was tested"
        ids = _written_ids(out)
        assert code == 0, text[-4000:]
        assert sorted(Counter(ids).values()) == [1] * PROBLEMS, Counter(ids).most_common(3)  # each once, none lost
        assert f"solved {PROBLEMS} of {PROBLEMS}" in text, text[-2000:]
        assert restarted, "no PRM replica ran on the surviving node after the death"
        print(f"node died with {written_at_death} of {PROBLEMS} written; {len(policies_there)} policy replica(s) "
              "were on it too")
