"""LaTRO: the RLOO estimator, the non-stop rule and the loss against hand computations; bad recipes in one line;
end to end on the toy policy through Ray Train (2 workers, ZeRO-2, CPU) with rollouts from a PolicyActor that gets
the weights after every step: the answer's log-likelihood rises, and a run killed after a checkpoint resumes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.contracts import Completion
from tests.train_helpers import CrashAt, crash_then_resume, history
from train.latro import LaTROConfig, LaTROTask, cut_rationale, latro_loss, latro_rewards, rloo_advantages
from train.loop import TrainConfig
from train.rollouts import rollout_share


def test_rloo_advantage_by_hand():
    r = torch.tensor([1.0, 2.0, 6.0, -1.0, -1.0, 5.0])  # two questions, K = 3
    a = rloo_advantages(r, 3)
    # q1: 1 - (2+6)/2 = -3, 2 - (1+6)/2 = -1.5, 6 - (1+2)/2 = 4.5; q2: -1 - 2 = -3, -1 - 2 = -3, 5 - (-1) = 6
    assert a.tolist() == pytest.approx([-3.0, -1.5, 4.5, -3.0, -3.0, 6.0])


def test_rewards_nonstop_rule_and_kl_by_hand():
    R = torch.tensor([-2.0, -4.0, -6.0, -8.0])
    kl = torch.tensor([1.0, 0.0, 2.0, 4.0])
    ns = torch.tensor([False, True, False, False])
    r, R2 = latro_rewards(R, kl, ns, kl_coef=0.05, nonstop_factor=2.0)
    # batch mean of R = -5; the non-stop one gets 2 x -5 = -10
    assert R2.tolist() == pytest.approx([-2.0, -10.0, -6.0, -8.0])
    assert r.tolist() == pytest.approx([-2.05, -10.0, -6.1, -8.2])


def test_loss_by_hand():
    z = torch.tensor([-3.0, -1.0], requires_grad=True)
    y = torch.tensor([-2.0, -4.0], requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    loss = latro_loss(z, y, adv, answer_weight=0.0)
    assert float(loss) == pytest.approx(-(1 * -3 + -1 * -1) / 2)  # = 1
    loss.backward()
    assert z.grad.tolist() == pytest.approx([-0.5, 0.5]) and y.grad is None
    assert float(latro_loss(z, y, adv, answer_weight=1.0)) == pytest.approx(1 + 3)


def test_rationale_is_cut_at_the_first_stop():
    def c(text, reason):
        return Completion(text=text, prompt_tokens=1, generated_tokens=1, finish_reason=reason)

    stop = ["The answer is", "Answer:"]
    assert cut_rationale(c("1 + 2 = 3.\n\nThe answer is", "stop"), stop) == ("1 + 2 = 3.\n\n", True)
    assert cut_rationale(c("1 + 2 = 3.", "eos"), stop) == ("1 + 2 = 3.", True)
    assert cut_rationale(c("1 + 2 = 3. 3 + 3", "length"), stop) == ("1 + 2 = 3. 3 + 3", False)


def test_rollout_share_from_rows():
    rows = [dict(rollout_s=9.0, last_step_s=0.0), dict(rollout_s=1.0, last_step_s=20.0),
            dict(rollout_s=2.0, last_step_s=4.0), dict(rollout_s=1.0, last_step_s=4.0)]
    assert rollout_share(rows) == pytest.approx((1.0 + 2.0) / (4.0 + 4.0))  # step 1 (warm-up) left out


def test_config_defaults_and_validation():
    cfg = LaTROConfig()
    assert (cfg.num_rationales, cfg.kl_coef, cfg.answer_weight, cfg.max_rationale_tokens) == (16, 0.05, 0.0, 200)
    assert cfg.train.lr == 5e-7 and cfg.train.epochs == 6
    with pytest.raises(ValueError, match="num_rationales"):
        LaTROConfig(num_rationales=1)
    with pytest.raises(ValueError, match="zero_stage"):
        LaTROConfig(train=dict(zero_stage=4))


def test_bad_recipes_fail_in_one_line_naming_file_and_key(tmp_path, capsys):
    import time

    import yaml

    from jobs.train import main

    def err_of(recipe: dict) -> str:
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(recipe))
        t0 = time.perf_counter()
        assert main(["latro", "--config", str(path)]) != 0
        assert time.perf_counter() - t0 < 1.0
        lines = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
        assert len(lines) == 1, lines
        return lines[0]

    e = err_of({"job": "latro", "train": {"zero_stage": 4}})
    assert "r.yaml" in e and "zero_stage" in e
    e = err_of({"job": "latro", "kl_coef": -1})
    assert "r.yaml" in e and "kl_coef" in e
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n" + json.dumps({"question": "2+2?"}) + "\n")
    e = err_of({"job": "latro", "data": str(data)})
    assert "r.yaml" in e and "q.jsonl line 2: no key 'answer'" in e and "add it" in e
    data.write_text(json.dumps({"answer": "2"}) + "\n")
    e = err_of({"job": "latro", "data": str(data)})
    assert "q.jsonl line 1: no key 'prompt' or 'question'" in e
    data.write_text("\n" + json.dumps({"prompt": 3, "answer": "2"}) + "\n")
    e = err_of({"job": "latro", "data": str(data)})
    assert "q.jsonl line 2: key 'prompt' is an int, not a string" in e
    data.write_text("{oops\n")
    e = err_of({"job": "latro", "data": str(data)})
    assert "q.jsonl line 1: not valid JSON" in e
    e = err_of({"job": "latro", "data": str(tmp_path / "missing.jsonl")})
    assert "r.yaml" in e and "data: file not found" in e and "missing.jsonl" in e


# --- end to end: Ray Train, 2 workers, ZeRO-2 on CPU, rollouts by a PolicyActor ----------------------------------

class CrashingLaTROTask(CrashAt, LaTROTask):
    """Raises in the `crash_at`-th loss call of a worker while the file `flag` exists: a run killed mid-training;
    also records, per loss call, which weights version the rollout actor served."""

    def loss(self, model, batch):
        loss, extra = super().loss(model, batch)
        import ray

        extra["actor_version"] = float(ray.get(self.pool.actors[0].stats.remote())["weights_version"])
        extra["trainer_step"] = float(self.step)
        return loss, extra


def test_latro_two_workers_zero2_reward_rises_and_a_crashed_run_resumes(ray_cluster, tmp_path, pickled_by_value):
    from train.rollouts import start_rollout_pool
    from train.sft import ToyData

    run = TrainConfig(num_workers=2, zero_stage=2, micro_batch_size=2, lr=5e-5, warmup_steps=0, epochs=2,
                      max_steps=6,
                      checkpoint_every_steps=2, name="latro-test", storage_path=str(tmp_path / "ray"),
                      keep_checkpoints=10, progress=False)
    cfg = LaTROConfig(model="toy:policy", data="toy:train", toy=ToyData(n_per_level=8, levels=[2, 3]),
                      answer_template="The answer is \\boxed{{{gold}}}.", num_rationales=4,
                      max_rationale_tokens=200, answer_weight=1.0, train=run)
    pool = start_rollout_pool(cfg, "latro-test-rollout")
    try:
        # resumed: the fresh actor gets the checkpoint's weights before the first rollout
        result, path = crash_then_resume(lambda flag: CrashingLaTROTask(cfg, pool, flag=flag, crash_at=3), run,
                                         "latro", tmp_path / "crash")
    finally:
        pool.shutdown()
    rows = history(result)
    assert result.metrics["start_step"] == 2 and [r["step"] for r in rows] == list(range(1, 7))
    # every rollout was sampled from the trainer's current weights (the version pushed after the last step)
    assert all(r["actor_version"] == r["trainer_step"] == r["step"] - 1 for r in rows), rows
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # pi = pi0 at step 1
    first = sum(r["answer_logp"] for r in rows[:2]) / 2
    last = sum(r["answer_logp"] for r in rows[-2:]) / 2
    assert last > first, [(r["answer_logp"], r["reward"]) for r in rows]
    assert all(r["rollout_s"] > 0 for r in rows) and 0 < rollout_share(rows) < 1
    assert (Path(path) / "model.safetensors").exists()


class CrashOnceLaTROTask(CrashingLaTROTask):
    """Crashes once (the flag goes with the crash), so that Ray Train restarts the worker group (max_failures)."""

    def loss(self, model, batch):
        if self.calls + 1 == self.crash_at and Path(self.flag).exists():
            Path(self.flag).unlink()
            self.calls += 1
            raise RuntimeError("injected crash")
        return super().loss(model, batch)


def test_latro_worker_killed_before_the_first_checkpoint_rolls_out_at_the_trainers_version(
        ray_cluster, tmp_path, pickled_by_value):
    """The crash at step 3 comes before any checkpoint: Ray Train restarts the run from the start, whose weights
    must reach the rollout actor (still at version 2 of the crashed attempt) before its first rollout."""
    from train.loop import fit
    from train.rollouts import start_rollout_pool
    from train.sft import ToyData

    run = TrainConfig(num_workers=1, zero_stage=2, micro_batch_size=2, lr=5e-5, warmup_steps=0, epochs=1,
                      checkpoint_every_steps=None, max_failures=1, name="latro-restart",
                      storage_path=str(tmp_path / "ray"), progress=False)
    cfg = LaTROConfig(model="toy:policy", data="toy:train", toy=ToyData(n_per_level=6, levels=[2]),
                      answer_template="The answer is \\boxed{{{gold}}}.", num_rationales=2,
                      max_rationale_tokens=60, train=run)
    pool = start_rollout_pool(cfg, "latro-restart-rollout")
    flag = tmp_path / "crash"
    flag.touch()
    try:
        result = fit(CrashOnceLaTROTask(cfg, pool, flag=str(flag), crash_at=3), run, desc="latro")
    finally:
        pool.shutdown()
    assert result.error is None and not flag.exists()  # it crashed once, and the restarted run finished
    rows = history(result)
    assert result.metrics["start_step"] == 0 and [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["actor_version"] == r["trainer_step"] == r["step"] - 1 for r in rows), rows


def test_latro_zero3_two_workers(ray_cluster, tmp_path):
    """ZeRO-3: pi0 is its own ZeRO-3 engine (KL 0 at step 1), the weights reach the rollout actor through the
    consolidated state dict (a name that did not fit would fail the push), and the export is whole."""
    from train.latro import train
    from train.sft import ToyData

    run = TrainConfig(num_workers=2, zero_stage=3, micro_batch_size=2, lr=5e-5, warmup_steps=0, max_steps=3,
                      name="z3", storage_path=str(tmp_path / "ray"), progress=False)
    cfg = LaTROConfig(toy=ToyData(n_per_level=8, levels=[2, 3]), answer_template="The answer is \\boxed{{{gold}}}.",
                      num_rationales=2, max_rationale_tokens=150, train=run)
    result, path = train(cfg)
    rows = history(result)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert (Path(path) / "model.safetensors").exists()
