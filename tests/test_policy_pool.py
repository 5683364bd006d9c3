"""Policy pools on a real local Ray cluster with a real (random) tiny causal LM on the HF engine."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.contracts import GenerationRequest
from app.pool_config import PoolConfig
from app.config import ConfigError


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    from tests.tiny_models import make_tiny_policy

    return str(make_tiny_policy(tmp_path_factory.mktemp("policy") / "tiny"))


def _reqs(k: int, max_tokens: int = 8) -> list[GenerationRequest]:
    return [GenerationRequest(f"{i}+{i}=", max_tokens=max_tokens, temperature=0) for i in range(k)]


def test_two_replicas_placed_and_both_used(ray_cluster, tiny_policy):
    from ray.util.placement_group import placement_group_table

    from actors.policy import start_policy_pool

    pool = start_policy_pool(PoolConfig(model=tiny_policy, replicas=2, gather_ms=50))
    try:
        assert len(pool.actors) == 2 and len(pool.pool.placement_groups) == 2
        assert len({i["pid"] for i in pool.info}) == 2
        for pg in pool.pool.placement_groups:
            assert placement_group_table(pg)["state"] == "CREATED"
        client = pool.client()

        async def many():
            return await asyncio.gather(*[client.agenerate(_reqs(2)) for _ in range(8)])

        outs = asyncio.run(many())
        assert all(len(o) == 2 and o[0][0].generated_tokens == 8 for o in outs)
        stats = pool.stats()
        assert [s["calls"] > 0 for s in stats] == [True, True]
        assert sum(s["calls"] for s in stats) == 8
        assert pool.pool.calls_per_replica == [4, 4]
    finally:
        pool.shutdown()


def test_concurrent_calls_merge_into_one_batch(ray_cluster, tiny_policy):
    from actors.policy import start_policy_pool

    pool = start_policy_pool(PoolConfig(model=tiny_policy, replicas=1, gather_ms=300, max_batch=64))
    try:
        client = pool.client()
        alone = client.generate(_reqs(3))

        async def many():
            return await asyncio.gather(*[client.agenerate(_reqs(3)) for _ in range(8)])

        outs = asyncio.run(many())
        # every caller gets its own slice back, equal to what it gets alone (greedy)
        assert all([c[0].text for c in o] == [c[0].text for c in alone] for o in outs)
        s = pool.stats()[0]
        assert s["calls"] == 9 and s["requests"] == 27
        assert s["largest_batch"] == 24, s["batch_sizes"]  # 8 concurrent calls x 3 requests in one batch
        assert s["batches"] == 2
    finally:
        pool.shutdown()


def test_usage_accounting(ray_cluster, tiny_policy):
    from actors.engines.hf import HFEngine
    from actors.policy import start_policy_pool

    eng = HFEngine(tiny_policy)
    params = eng.flop_parameters  # FLOPs count the matmul parameters (the tiny policy's head is tied: all of them)
    pool = start_policy_pool(PoolConfig(model=tiny_policy, replicas=1, gather_ms=1))
    try:
        client = pool.client()
        assert client.num_parameters == params == pool.num_parameters == pool.info[0]["flop_parameters"]
        assert pool.info[0]["num_parameters"] == eng.num_parameters
        out = client.generate([GenerationRequest("12+3=", n=3, max_tokens=5, temperature=1.0, seed=1),
                               GenerationRequest("7*8=", max_tokens=4, temperature=0)])
        out2 = client.generate([GenerationRequest("1+1=", max_tokens=6, temperature=0)])
        groups = out + out2
        prompt = sum(g[0].prompt_tokens for g in groups)
        gen = sum(c.generated_tokens for g in groups for c in g)
        u = client.usage
        assert (u.prompt_tokens, u.generated_tokens, u.policy_calls) == (prompt, gen, 2)
        assert prompt == len("12+3=") + len("7*8=") + len("1+1=")  # char-level tokenizer, no BOS
        assert gen == 3 * 5 + 4 + 6
        assert u.policy_flops == pytest.approx(2.0 * params * (prompt + gen))
        # no call continues an earlier one's stopped text: nothing cached, everything computed
        assert (u.computed_prompt_tokens, u.computed_generated_tokens, u.computed_policy_flops) == (
            prompt, gen, u.policy_flops)
        s = pool.stats()[0]
        assert (s["prompt_tokens"], s["generated_tokens"], s["cached_tokens"]) == (prompt, gen, 0)
    finally:
        pool.shutdown()


def test_killed_replica_mid_call_caller_gets_result(ray_cluster, tiny_policy):
    import ray

    from actors.policy import start_policy_pool

    # A long gather window keeps the call inside the actor long enough to kill it mid-call.
    pool = start_policy_pool(PoolConfig(model=tiny_policy, replicas=1, gather_ms=1500, max_retries=5))
    try:
        client = pool.client()
        expected = client.generate(_reqs(4))
        pid_before = pool.info[0]["pid"]
        box: dict = {}

        def call():
            try:
                box["out"] = client.generate(_reqs(4))
            except BaseException as e:  # pragma: no cover - reported below
                box["err"] = e

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.7)
        ray.kill(pool.actors[0], no_restart=False)
        t.join(120)
        assert "err" not in box, box.get("err")
        assert [c[0].text for c in box["out"]] == [c[0].text for c in expected]
        assert pool.pool.calls_per_replica[0] >= 3  # the first call, the killed one, its retries
        assert ray.get(pool.actors[0].info.remote())["pid"] != pid_before
        assert client.usage.policy_calls == 2  # the retry is not double-counted
    finally:
        pool.shutdown()


def test_pool_and_client_work_inside_ray_tasks(ray_cluster, tiny_policy):
    import ray

    from actors.policy import start_policy_pool

    pool = start_policy_pool(PoolConfig(model=tiny_policy, replicas=1))
    try:
        @ray.remote(num_cpus=0)
        def task(p, prompt):
            c = p.client()
            out = c.generate([GenerationRequest(prompt, max_tokens=4, temperature=0)])
            return out[0][0].text, c.usage.generated_tokens

        local = pool.client().generate([GenerationRequest("3+4=", max_tokens=4, temperature=0)])[0][0].text
        assert ray.get(task.remote(pool, "3+4=")) == (local, 4)
    finally:
        pool.shutdown()


@pytest.mark.parametrize("kwargs, match", [
    (dict(replicas=0), "replicas"),
    (dict(tp=0), "tp"),
    (dict(engine="tgi"), "engine"),
    (dict(dtype="float8"), "dtype"),
    (dict(nonsense=1), "unknown key"),
])
def test_bad_config_is_one_line(kwargs, match):
    with pytest.raises(ConfigError, match=match) as e:
        PoolConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_bad_pool_requests_are_one_line(ray_cluster, tiny_policy, tmp_path):
    from actors.policy import start_policy_pool

    cases = [
        (PoolConfig(model=str(tmp_path / "missing")), "no config.json"),
        (PoolConfig(model="toy:does-not-exist"), "not found"),
        (PoolConfig(model=tiny_policy, tp=2), "tp must be 1"),
        (PoolConfig(model=tiny_policy, engine="vllm", tp=2), "GPU"),
        (PoolConfig(model=tiny_policy, replicas=64), "CPUs"),
    ]
    for cfg, match in cases:
        with pytest.raises(ConfigError, match=match) as e:
            start_policy_pool(cfg)
        assert "\n" not in str(e.value)


@pytest.mark.vllm
def test_vllm_policy_actor_batches_concurrent_callers(ray_cluster, tiny_policy):
    from actors.engines.hf import HFEngine
    from actors.policy import start_policy_pool

    reqs = [GenerationRequest(f"{i}*{i}=", max_tokens=12, temperature=0) for i in range(6)]
    expected = [g[0].text for g in HFEngine(tiny_policy).generate(reqs)]
    pool = start_policy_pool(PoolConfig(engine="vllm", model=tiny_policy, replicas=1))
    try:
        # dtype auto = the checkpoint's own (float32), as the HF engine reads it, not vLLM's bf16 downcast
        assert pool.info[0]["engine"] == "vllm" and pool.info[0]["dtype"] == "float32"
        client = pool.client()

        async def many():
            return await asyncio.gather(*[client.agenerate([r]) for r in reqs])

        outs = asyncio.run(many())
        assert [o[0][0].text for o in outs] == expected
        s = pool.stats()[0]
        assert s["calls"] == 6 and s["max_inflight"] > 1  # the calls were in vLLM's engine together
        assert client.usage.generated_tokens == sum(o[0][0].generated_tokens for o in outs)
        assert client.usage.policy_calls == 6
    finally:
        pool.shutdown()
