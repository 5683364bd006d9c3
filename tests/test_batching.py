"""MicroBatcher: concurrent callers share one engine batch, and one caller's bad input fails only that caller."""
from __future__ import annotations

import asyncio

import pytest

from actors.batching import MicroBatcher


class BadItem(ValueError):
    pass


def double(items):
    """A sync engine: fails the whole batch when any item is bad (as the HF engine does on an over-long prompt)."""
    for i, x in enumerate(items):
        if x == "bad":
            raise BadItem(f"request {i}: bad item")
    return [2 * x for x in items]


async def adouble(items):
    await asyncio.sleep(0)
    return double(items)


def _gather(batcher: MicroBatcher, calls: list[list]) -> list:
    async def main():
        return await asyncio.gather(*[batcher.submit(c) for c in calls], return_exceptions=True)

    return asyncio.run(main())


@pytest.mark.parametrize("process", [double, adouble], ids=["sync", "async"])
def test_one_bad_caller_fails_alone(process):
    batcher = MicroBatcher(process, max_batch=64, gather_ms=20)
    out = _gather(batcher, [[1, 2], ["bad", 3], [4], [5, 6, 7]])
    assert out[0] == [2, 4] and out[2] == [8] and out[3] == [10, 12, 14]
    assert isinstance(out[1], BadItem) and "request 0" in str(out[1])  # the index is the caller's own
    s = batcher.stats
    # one merged batch of all 8 items failed; then each caller ran alone
    assert s.sizes == [8, 2, 2, 1, 3] and s.batches == 5 and s.isolated == 1


def test_callers_merge_and_a_lone_failure_is_not_retried():
    calls = []

    def process(items):
        calls.append(list(items))
        return double(items)

    batcher = MicroBatcher(process, gather_ms=20)
    assert _gather(batcher, [[1], [2, 3]]) == [[2], [4, 6]]
    assert calls == [[1, 2, 3]]  # one engine call for both callers
    out = _gather(batcher, [["bad"]])
    assert isinstance(out[0], BadItem)
    assert calls[1:] == [["bad"]] and batcher.stats.isolated == 0  # a caller alone is not run twice


def test_every_caller_of_a_failing_engine_gets_its_error():
    def broken(items):
        raise RuntimeError("engine down")

    batcher = MicroBatcher(broken, gather_ms=20)
    out = _gather(batcher, [[1], [2]])
    assert all(isinstance(e, RuntimeError) and "engine down" in str(e) for e in out)


def test_an_engine_that_returns_the_wrong_count_fails_loudly():
    batcher = MicroBatcher(lambda items: [0] * (len(items) - 1), gather_ms=5)
    [err] = _gather(batcher, [[1, 2]])
    assert isinstance(err, RuntimeError) and "1 results for a batch of 2" in str(err)


def test_over_long_prompt_fails_only_its_caller_on_a_real_policy_actor(ray_cluster):
    """The shipped toy policy (1024 positions) behind one HF PolicyActor: four concurrent callers are merged into
    one batch; the one whose prompt does not fit gets the error, the others get what they get alone."""
    from actors.policy import start_policy_pool
    from app.contracts import GenerationRequest
    from app.pool_config import PoolConfig

    def reqs(k: int) -> list[GenerationRequest]:
        return [GenerationRequest(f"Question: What is {i} + {k}?\n\nAnswer:\n\n", max_tokens=6, temperature=0)
                for i in range(2)]

    too_long = [GenerationRequest("Question: What is " + "1 + " * 300 + "1?\n\nAnswer:\n\n", max_tokens=6)]
    pool = start_policy_pool(PoolConfig(model="toy:policy", replicas=1, gather_ms=300, max_batch=64))
    try:
        client = pool.client()
        alone = [client.generate(reqs(k)) for k in range(3)]
        pool.reset_stats()

        async def many():
            calls = [client.agenerate(reqs(0)), client.agenerate(too_long), client.agenerate(reqs(1)),
                     client.agenerate(reqs(2))]
            return await asyncio.gather(*calls, return_exceptions=True)

        out = asyncio.run(many())
        assert isinstance(out[1], Exception) and "max_model_len=1024" in str(out[1])
        for got, want in zip([out[0], out[2], out[3]], alone):
            assert not isinstance(got, Exception), got
            assert [g[0].text for g in got] == [w[0].text for w in want]
        s = pool.stats()[0]
        assert s["batch_sizes"][0] == 7, s["batch_sizes"]  # the four callers were merged into one batch
        assert s["isolated_batches"] == 1 and s["calls"] == 4
    finally:
        pool.shutdown()
