"""A dead engine takes its actor down so that Ray restarts it; a hung call is retried on another replica.

Real Ray actors around the real toy policy (HF engine). The faults are injected by subclassing the policy actor:
the first `generate` of the run raises vLLM's own EngineDeadError (what AsyncLLM raises once its engine core
process is gone), or hangs. A marker file makes the fault happen once per test, across actor restarts.
"""
from __future__ import annotations

import asyncio
import os
import time

from actors.policy import PolicyActor, PolicyClient
from actors.replicas import ReplicaPool
from app.contracts import GenerationRequest

REQUEST = [GenerationRequest(prompt="Q: 2+3\n", n=2, max_tokens=8, temperature=0.0, seed=0)]


def _claim(marker: str) -> bool:
    """True for the first caller across all processes (atomic create)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def engine_dead_error():
    try:
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:  # the check is by name, so the same class name stands in without vLLM
        class EngineDeadError(Exception):
            pass
    return EngineDeadError("EngineCore encountered an issue")


def test_engine_dead_actor_is_restarted_and_the_call_succeeds_on_retry(ray_cluster, tmp_path):
    marker = str(tmp_path / "died")

    class DyingPolicy(PolicyActor):
        async def generate(self, requests):
            if _claim(marker):
                async def dead():
                    raise engine_dead_error()
                await self._serve(dead)  # the engine call fails as vLLM's does
            return await super().generate(requests)

    pool = ReplicaPool(DyingPolicy, init_kwargs=dict(engine="hf", model="toy:policy", gather_ms=1),
                       replicas=1, max_retries=4, name="dying")
    try:
        pid_before = pool.wait_ready("info", timeout=300)[0]["pid"]
        out = pool.call("generate", REQUEST)
        assert os.path.exists(marker)                      # the fault did happen
        assert len(out) == 1 and len(out[0]) == 2 and out[0][0].text
        pid_after = pool.wait_ready("info", timeout=300)[0]["pid"]
        assert pid_after != pid_before                     # Ray restarted the replica: a new process, a new engine
        assert pool.calls_per_replica == [2]               # the failed call, then its retry
    finally:
        pool.shutdown()


def test_a_call_that_hangs_past_its_timeout_is_retried_on_another_replica(ray_cluster, tmp_path):
    marker = str(tmp_path / "hung")

    class HangingPolicy(PolicyActor):
        async def generate(self, requests):
            if _claim(marker):
                await asyncio.sleep(3600)                  # a stuck NCCL collective never returns
            return await super().generate(requests)

    pool = ReplicaPool(HangingPolicy, init_kwargs=dict(engine="hf", model="toy:policy", gather_ms=1),
                       replicas=2, num_cpus=0.5, max_retries=3, call_timeout_s=5.0, name="hanging")
    try:
        before = [i["pid"] for i in pool.wait_ready("info", timeout=300)]
        client = PolicyClient(pool, num_parameters=1)
        t0 = time.monotonic()
        out = client.generate(REQUEST)
        assert time.monotonic() - t0 < 120                 # not the hour the hung replica would take
        assert os.path.exists(marker)
        assert len(out[0]) == 2 and out[0][0].text
        assert sorted(pool.calls_per_replica) == [1, 1]    # tried on one replica, answered by the other
        # the replica it hung on was restarted and serves again
        after = [i["pid"] for i in pool.wait_ready("info", timeout=300)]
        assert sum(a != b for a, b in zip(after, before)) == 1
        assert all(len(pool.call("generate", REQUEST)[0]) == 2 for _ in range(2))
    finally:
        pool.shutdown()


def test_async_callers_are_retried_too(ray_cluster, tmp_path):
    marker = str(tmp_path / "hung-async")

    class HangingPolicy(PolicyActor):
        async def generate(self, requests):
            if _claim(marker):
                await asyncio.sleep(3600)
            return await super().generate(requests)

    pool = ReplicaPool(HangingPolicy, init_kwargs=dict(engine="hf", model="toy:policy", gather_ms=1),
                       replicas=2, num_cpus=0.5, max_retries=3, call_timeout_s=5.0, name="hanging-async")
    try:
        pool.wait_ready("info", timeout=300)
        out = asyncio.run(pool.acall("generate", REQUEST))
        assert os.path.exists(marker) and len(out[0]) == 2
        assert sorted(pool.calls_per_replica) == [1, 1]
    finally:
        pool.shutdown()
