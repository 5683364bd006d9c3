"""The Qwen-layout PRM on vLLM (pooling runner, STEP pooling at the step tag, token_classify) against the HF engine.

One vLLM engine for the whole module (it starts in about a minute on CPU), inside a real PRMActor on the Ray
cluster, on the same random tiny checkpoint as the HF engine, in float32: step scores agree within 1e-3.
"""
from __future__ import annotations

import pytest

from actors.engines.base import load_tokenizer
from actors.engines.hf_prm import HFPRMEngine
from actors.prm import PRMActor
from actors.prm_formats import QwenPRMFormat
from tests.test_prm import Q, TRAJ, sharpen_prm
from tests.tiny_models import make_tiny_prm

pytestmark = pytest.mark.vllm

# A PRM only prefills. The tiny PRM needs 2 KiB a token; vLLM's floor is max_model_len (1024) tokens: 2 MiB fails,
# 4 MiB starts; 8 MiB holds 4096 tokens, a few concurrent trajectories.
KV_CACHE_BYTES = 8 * 2**20

TRAJECTORIES = [
    TRAJ,
    TRAJ[:1],
    [],
    ["a = 1\n\n", "b = 2\n\n"],  # trailing delimiter: 2 scores, not 3
    ["Check: 42 - 30 = 12, right.\n\n"] * 6 + ["The answer is \\boxed{42}"],
    ["x" * 300 + "\n\n", "y"],
]


@pytest.fixture(scope="module")
def prm_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm_prm")
    return sharpen_prm(make_tiny_prm(d / "raw", seed=4), d / "sharp")


@pytest.fixture(scope="module")
def vllm_actor(ray_cluster, prm_path):
    ray = ray_cluster
    actor = ray.remote(num_cpus=1)(PRMActor).remote(
        str(prm_path), format="qwen", engine="vllm", dtype="float32",
        engine_kwargs={"kv_cache_memory_bytes": KV_CACHE_BYTES, "max_num_seqs": 64},
    )
    try:
        info = ray.get(actor.info.remote(), timeout=400)
        print(f"\nvLLM PRM engine started in {info['load_seconds']:.1f} s")
        yield actor
    finally:
        try:
            ray.get(actor.shutdown.remote(), timeout=60)
        finally:
            ray.kill(actor)


@pytest.fixture(scope="module")
def hf(prm_path):
    fmt = QwenPRMFormat(load_tokenizer(str(prm_path)))
    return fmt, HFPRMEngine(str(prm_path), fmt, dtype="float32")


def test_vllm_step_scores_match_hf(ray_cluster, vllm_actor, hf):
    fmt, eng = hf
    expected = eng.score([fmt.encode(Q, t, i) for i, t in enumerate(TRAJECTORIES)])
    got = ray_cluster.get(vllm_actor.score.remote(Q, TRAJECTORIES))
    assert [len(s) for s in got.scores] == [len(s) for s in expected] == [3, 1, 0, 2, 7, 2]
    diff = max(abs(a - b) for g, e in zip(got.scores, expected) for a, b in zip(g, e))
    print(f"\nmax |vLLM - HF| step score difference: {diff:.2e}")
    assert diff < 1e-3
    assert all(0.0 <= s <= 1.0 for row in got.scores for s in row)
    flat = [s for row in got.scores for s in row]
    assert max(flat) - min(flat) > 1e-2  # the sharpened head spreads the scores: a wrong position would show
    assert got.tokens == sum(len(fmt.encode(Q, t).input_ids) for t in TRAJECTORIES)
    # vLLM runs STEP pooling without prefix caching: every token computed; the head is the classifier's
    assert (got.cached_tokens, got.cached_scores, got.head_parameters) == (0, 0, eng.score_head_parameters)


def test_vllm_concurrent_callers_get_their_own_scores(ray_cluster, vllm_actor, hf):
    fmt, eng = hf
    calls = [[TRAJ[: 1 + i % 3], [f"step {i}\n\n", f"answer {i}"]] for i in range(8)]
    results = ray_cluster.get([vllm_actor.score.remote(Q, c) for c in calls])
    for c, r in zip(calls, results):
        expected = eng.score([fmt.encode(Q, t) for t in c])
        assert [len(s) for s in r.scores] == [len(t) for t in c]
        for g, e in zip(r.scores, expected):
            assert g == pytest.approx(e, abs=1e-3)


def test_vllm_actor_reports_mismatch_and_parameters(ray_cluster, vllm_actor, hf):
    _, eng = hf
    with pytest.raises(Exception, match=r"trajectory 0 .*for 1 steps"):
        ray_cluster.get(vllm_actor.score.remote(Q, [["two <extra_0> tags"]]))
    info = ray_cluster.get(vllm_actor.info.remote())
    assert (info["num_parameters"], info["flop_parameters"]) == (eng.num_parameters, eng.flop_parameters)
    assert eng.flop_parameters < eng.num_parameters  # the untied input embeddings are no matmul
