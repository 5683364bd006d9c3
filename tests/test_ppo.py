"""Step-level PPO: GAE and the clipped losses against hand computations; end to end on the toy policy and PRM through
Ray Train (2 workers, ZeRO-2, CPU) with rollouts from a PolicyActor fed the weights after every step and step
rewards from a PRM actor: the value loss falls, and a run killed after a checkpoint resumes from it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

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


def test_config_defaults_and_bad_values():
    c = PPOConfig()
    assert (c.kl_coef, c.reward_clip, c.gamma, c.lam, c.clip, c.value_clip, c.ppo_epochs) == (
        0.1, 5.0, 1.0, 0.95, 0.2, 0.2, 2)
    assert c.train.lr == 1e-6 and c.critic_lr_scale == 0.5
    with pytest.raises(ValueError, match="grad_accum"):
        PPOConfig(train=dict(grad_accum=2))
    with pytest.raises(ValueError, match="zero_stage"):
        PPOConfig(train=dict(zero_stage=4))


class CrashingPPOTask(PPOTask):
    def __init__(self, cfg, pool, prm, flag: str, crash_at: int):
        super().__init__(cfg, pool, prm)
        self.flag, self.crash_at, self.n = flag, crash_at, 0

    def loss(self, model, batch):
        self.n += 1
        if self.n == self.crash_at and Path(self.flag).exists():
            raise RuntimeError("injected crash")
        return super().loss(model, batch)


@pytest.fixture
def pickled_by_value():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_ppo_two_workers_zero2_learns_values_and_a_crashed_run_resumes(ray_cluster, tmp_path, pickled_by_value):
    from train.loop import fit, fit_and_export
    from train.ppo import start_pools
    from train.sft import ToyData

    run = TrainConfig(num_workers=2, zero_stage=2, micro_batch_size=2, lr=2e-5, warmup_steps=0, epochs=2,
                      max_steps=6, checkpoint_every_steps=2, name="ppo-test", storage_path=str(tmp_path / "ray"),
                      keep_checkpoints=10, progress=False)
    cfg = PPOConfig(model="toy:policy", toy=ToyData(n_per_level=8, levels=[2, 3]), samples_per_question=2,
                    max_tokens=200, critic_lr_scale=50.0, train=run)  # a fresh value head: let it learn fast
    flag = tmp_path / "crash"
    flag.touch()
    pool, prm = start_pools(cfg, "ppo-test")
    try:
        with pytest.raises(Exception, match="injected crash"):
            result = fit(CrashingPPOTask(cfg, pool, prm, str(flag), crash_at=3), run, desc="ppo")
            if result.error:
                raise result.error
        flag.unlink()
        ckpts = sorted(p.name for p in (tmp_path / "ray" / "ppo-test").iterdir() if p.name.startswith("step_"))
        assert ckpts == ["step_0000002"], ckpts
        result, path = fit_and_export(CrashingPPOTask(cfg, pool, prm, str(flag), crash_at=3), run, "ppo")
    finally:
        prm.shutdown()
        pool.shutdown()
    rows = [json.loads(x) for x in (Path(result.checkpoint.path) / "metrics.jsonl").read_text().splitlines()]
    assert result.metrics["start_step"] == 2 and [r["step"] for r in rows] == list(range(1, 7))
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4) and rows[0]["clipfrac"] == 0.0  # pi = pi_ref = pi_old
    assert all(r["step_reward"] > 0 for r in rows)  # the PRM's step scores reach the rewards
    assert rows[-1]["vf_loss"] < rows[0]["vf_loss"], [r["vf_loss"] for r in rows]
    assert (Path(path) / "model.safetensors").exists() and (Path(path) / "critic" / "value_head.pt").exists()
