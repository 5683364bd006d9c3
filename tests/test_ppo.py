"""Step-level PPO: GAE and the clipped losses against hand computations; bad recipes in one line; end to end on the
toy policy and PRM through Ray Train (2 workers, ZeRO-2, CPU) with rollouts from a PolicyActor fed the weights
after every step and step rewards from a PRM actor: the value loss falls, and a run killed after a checkpoint
resumes from it; and under ZeRO-3 (the frozen reference its own DeepSpeed engine)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.train_helpers import CrashAt, crash_then_resume, history
from train.loop import TrainConfig
from train.ppo import PPOConfig, PPOTask, gae, policy_loss, value_loss


def test_gae_by_hand():
    # one row: prompt position 0 masked out, response positions 1..3
    r = torch.tensor([[0.0, 0.5, 0.0, 1.0]])
    v = torch.tensor([[9.0, 0.2, 0.4, 0.6]])
    m = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.5)
    d3 = 1.0 - 0.6                  # last token: next value 0
    d2 = 0.0 + 0.6 - 0.4
    d1 = 0.5 + 0.4 - 0.2
    a3 = d3
    a2 = d2 + 0.5 * a3
    a1 = d1 + 0.5 * a2
    assert adv[0].tolist() == pytest.approx([0.0, a1, a2, a3])
    assert ret[0].tolist() == pytest.approx([0.0, a1 + 0.2, a2 + 0.4, a3 + 0.6])
    # gamma 0.9, lambda 1: discounted returns
    adv, ret = gae(r, v, m, gamma=0.9, lam=1.0)
    assert ret[0, 1:].tolist() == pytest.approx([0.5 + 0.9 * 0.0 + 0.81 * 1.0, 0.9 * 1.0, 1.0])


def test_clipped_policy_and_value_losses_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))   # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    m = torch.ones(1, 3)
    loss, clipfrac = policy_loss(logp, old, adv, m, clip=0.2)
    # max(-A r, -A clip(r)): -min(1.5, 1.2) = -1.2; -min(0.5, 0.8) = -0.5; max(2.2, 2.2) = 2.2
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 2.2) / 3)
    assert float(clipfrac) == pytest.approx(2 / 3)
    v, old_v, R = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[2.0, 0.1]])
    # row 0: clipped 0.7 -> max((1-2)^2, (0.7-2)^2) = 1.69; row 1: 0.01
    assert float(value_loss(v, old_v, R, torch.ones(1, 2), clip=0.2)) == pytest.approx(0.5 * (1.69 + 0.01) / 2)


def test_rollout_seeds_are_keyed_by_example():
    """Two ranks' micro batches (different examples, same step) sample with different seeds; the same example at
    the same step always gets the same one (it was the position in the micro batch: every rank drew alike)."""
    from train.sft import ToyData

    task = PPOTask(PPOConfig(toy=ToyData(n_per_level=4, levels=[2])))
    ex = task.load_examples(task.build_tokenizer())
    rank0, rank1 = task.collate(ex[0:2], None), task.collate(ex[2:4], None)
    seeds = [[task.rollout_seed(i) for i in b["idx"]] for b in (rank0, rank1)]
    assert len(set(seeds[0] + seeds[1])) == 4
    assert seeds[1] == [task.rollout_seed(i) for i in task.collate(ex[2:4], None)["idx"]]


def test_config_defaults_and_bad_values():
    c = PPOConfig()
    assert (c.kl_coef, c.reward_clip, c.gamma, c.lam, c.clip, c.value_clip, c.ppo_epochs) == (
        0.1, 5.0, 1.0, 0.95, 0.2, 0.2, 2)
    assert c.train.lr == 1e-6 and c.critic_lr_scale == 0.5
    with pytest.raises(ValueError, match="grad_accum"):
        PPOConfig(train=dict(grad_accum=2))
    with pytest.raises(ValueError, match="zero_stage"):
        PPOConfig(train=dict(zero_stage=4))


def test_bad_recipes_fail_in_one_line_naming_file_and_key(tmp_path, capsys):
    import time

    import yaml

    from jobs.train import main

    def err_of(recipe: dict) -> str:
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(recipe))
        t0 = time.perf_counter()
        assert main(["ppo", "--config", str(path)]) != 0
        assert time.perf_counter() - t0 < 1.0
        lines = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
        assert len(lines) == 1, lines
        return lines[0]

    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n\n" + json.dumps({"answer": "4"}) + "\n")
    e = err_of({"job": "ppo", "data": str(data)})
    assert "r.yaml" in e and "q.jsonl line 3: no key 'question'" in e and "add it" in e
    data.write_text(json.dumps({"question": "1+1?"}) + "\n")
    assert "q.jsonl line 1: no key 'answer'" in err_of({"job": "ppo", "data": str(data)})
    data.write_text("[1, 2]\n")
    assert "q.jsonl line 1: a list, not a JSON object" in err_of({"job": "ppo", "data": str(data)})
    e = err_of({"job": "ppo", "data": str(tmp_path / "missing.jsonl")})
    assert "r.yaml" in e and "data: file not found" in e


class CrashingPPOTask(CrashAt, PPOTask):
    pass


def test_ppo_two_workers_zero2_learns_values_and_a_crashed_run_resumes(ray_cluster, tmp_path, pickled_by_value):
    from train.ppo import start_pools
    from train.sft import ToyData

    run = TrainConfig(num_workers=2, zero_stage=2, micro_batch_size=2, lr=2e-5, warmup_steps=0, epochs=2,
                      max_steps=6, checkpoint_every_steps=2, name="ppo-test", storage_path=str(tmp_path / "ray"),
                      keep_checkpoints=10, progress=False)
    cfg = PPOConfig(model="toy:policy", toy=ToyData(n_per_level=8, levels=[2, 3]), samples_per_question=2,
                    max_tokens=200, critic_lr_scale=50.0, train=run)  # a fresh value head: let it learn fast
    pool, prm = start_pools(cfg, "ppo-test")
    try:
        result, path = crash_then_resume(lambda flag: CrashingPPOTask(cfg, pool, prm, flag=flag, crash_at=3), run,
                                         "ppo", tmp_path / "crash")
    finally:
        prm.shutdown()
        pool.shutdown()
    rows = history(result)
    assert result.metrics["start_step"] == 2 and [r["step"] for r in rows] == list(range(1, 7))
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4) and rows[0]["clipfrac"] == 0.0  # pi = pi_ref = pi_old
    assert all(r["step_reward"] > 0 for r in rows)  # the PRM's step scores reach the rewards
    assert rows[-1]["vf_loss"] < rows[0]["vf_loss"], [r["vf_loss"] for r in rows]
    assert (Path(path) / "model.safetensors").exists() and (Path(path) / "critic" / "value_head.pt").exists()


class RefCheckingPPOTask(PPOTask):
    """Also reports, per loss call, how far the frozen reference's log-probs are from the policy's on the same
    rollouts (0 before the first update) and whether the reference is a partitioned ZeRO-3 engine."""

    def make_batch(self, model, batch):
        out = super().make_batch(model, batch)
        with torch.no_grad():
            from train.ppo import token_logps

            ref = token_logps(self._ref(input_ids=out["ids"], attention_mask=out["att"], use_cache=False).logits,
                              out["ids"])
        gap = ((ref - out["old_logp"]).abs() * out["mask"]).max()
        p = next(self._ref.module.parameters()) if hasattr(self._ref, "module") else next(self._ref.parameters())
        out["metrics"] = dict(out["metrics"], ref_gap=float(gap),
                              ref_sharded=float(hasattr(p, "ds_id") and p.ds_tensor.numel() < p.ds_numel))
        return out


def test_ppo_zero3_two_workers(ray_cluster, tmp_path, pickled_by_value):
    """ZeRO-3, 2 workers on CPU: the frozen reference is its own partitioned DeepSpeed engine whose log-probs equal
    the starting policy's at step 1; the run completes with finite losses and rewards, the weights reach the rollout
    actor through the consolidated state dict, and the export (actor + critic) is whole."""
    from safetensors.torch import load_file

    from app.toy import resolve_model
    from train.ppo import train
    from train.sft import ToyData

    run = TrainConfig(num_workers=2, zero_stage=3, micro_batch_size=2, lr=2e-5, warmup_steps=0, max_steps=3,
                      name="ppo-z3", storage_path=str(tmp_path / "ray"), progress=False)
    cfg = PPOConfig(model="toy:policy", toy=ToyData(n_per_level=8, levels=[2, 3]), samples_per_question=2,
                    max_tokens=150, critic_lr_scale=50.0, train=run)
    result, path = train(cfg, task_class=RefCheckingPPOTask)
    rows = history(result)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["ref_gap"] < 1e-4 and rows[0]["kl"] == pytest.approx(0.0, abs=1e-4), rows[0]
    assert all(r["ref_sharded"] == 1.0 for r in rows), rows
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss", "pg_loss", "vf_loss", "step_reward", "kl")), r
    assert all(r["step_reward"] > 0 for r in rows)
    start = load_file(f"{resolve_model('toy:policy')}/model.safetensors")
    out = load_file(str(Path(path) / "model.safetensors"))
    assert set(out) == set(start) and all(out[k].shape == start[k].shape for k in start)
    assert (Path(path) / "critic" / "value_head.pt").exists()
