"""A node dies mid-search (issue 33): the policy and PRM replicas on it restart on the node left, the tasks it ran
are retried, and every problem is written exactly once. A real multi-node Ray cluster on this machine
(jobs/bench/multinode.py), the real `ponder search` job as a driver against it, the real toy models."""
from __future__ import annotations

import json
import re
import subprocess
import time
from collections import Counter

import pytest

from jobs.bench.multinode import (PONDER, REPO, actor_pids, job_env, multi_node_cluster, registered_checkpoint,
                                  written_ids)

PROBLEMS = 24


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
                while len(written_ids(out)) < 3:
                    assert proc.poll() is None, log.read_text()[-4000:]
                    assert time.monotonic() < deadline, log.read_text()[-4000:]
                    time.sleep(0.5)
                prm = actor_pids("PRMActor", nodes)
                assert len(prm) == 1, prm
                doomed = next(iter(prm.values()))
                policies_there = [pid for pid, n in actor_pids("PolicyActor", nodes).items() if n is doomed]
                written_at_death = len(written_ids(out))
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
        ids = written_ids(out)
        assert code == 0, text[-4000:]
        assert sorted(Counter(ids).values()) == [1] * PROBLEMS, Counter(ids).most_common(3)  # each once, none lost
        assert f"solved {PROBLEMS} of {PROBLEMS}" in text, text[-2000:]
        assert restarted, "no PRM replica ran on the surviving node after the death"
        print(f"node died with {written_at_death} of {PROBLEMS} written; {len(policies_there)} policy replica(s) "
              "were on it too")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_survives_the_death_of_a_node_holding_a_train_worker(tmp_path):
    """2 workers on 2 nodes; after the first checkpoint the node of one worker dies: Ray Train restarts the group
    (train.max_failures) from that checkpoint on the node left and finishes with every step once."""
    runs, model = tmp_path / "runs", tmp_path / "model"
    with multi_node_cluster([{"num_cpus": 2}, {"num_cpus": 2}]) as (cluster, nodes):
        cmd = [str(PONDER), "train", "--config", "toy/sft", "toy.n_per_level=100", "toy.levels=[1,2]",
               "eval_toy_per_level=0", "train.num_workers=2", "train.micro_batch_size=4", "train.max_steps=16",
               "train.warmup_steps=1", "train.checkpoint_every_steps=2", "train.max_failures=2", "train.name=nd",
               f"train.storage_path={runs}", f"output={model}", "train.progress=false"]
        log = tmp_path / "train.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(cluster), stdout=f, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + 480
                # a checkpoint the controller has registered (one only reported by the workers may be lost with
                # them, and a restart then rightly begins at step 0)
                while registered_checkpoint(runs / "nd") is None:
                    assert proc.poll() is None, log.read_text()[-4000:]
                    assert time.monotonic() < deadline, log.read_text()[-4000:]
                    time.sleep(0.5)
                workers = actor_pids("RayTrainWorker", nodes)
                assert workers, "no training worker found on the cluster's nodes"
                doomed = next(iter(workers.values()))
                cluster.remove_node(doomed, allow_graceful=False)
                finished_before = (runs / "nd" / "step_0000016").exists()
                code = proc.wait(timeout=600)
            finally:
                if proc.poll() is None:
                    proc.kill()
        text = log.read_text()
        assert code == 0, text[-4000:]
        assert not finished_before, "the run had finished before the node died: nothing was tested"
        assert "sft: done" in text and "global_step=16" in text, text[-3000:]
        start = int(re.search(r"start_step=(\d+)", text.split("sft: done")[1]).group(1))
        assert start in (2, 4, 6, 8, 10, 12, 14), f"the restarted group began at step {start}, not at a checkpoint"
        rows = [json.loads(x) for x in (runs / "nd" / "step_0000016" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, 17))  # every step once: none lost, none twice
        assert (model / "model.safetensors").exists()
