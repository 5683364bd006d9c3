"""DPO and step-DPO: the loss against a hand computation, no EOS after steps, and end to end on the toy policy
through Ray Train with 2 workers and DeepSpeed ZeRO-2 on CPU (the margin grows, a crashed run resumes)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from app.search.tree import split_steps
from app.toy.world import toy_problems, toy_prompt
from tests.train_helpers import CrashAt, crash_then_resume, history
from train.dpo import DPOConfig, DPOTask, dpo_loss, encode_pair, response_logps
from train.loop import TrainConfig


def slip(solution: str) -> str:
    """The solution with its last computation off by one, and the answer with it."""
    steps = solution.split("\n\n")
    m = re.match(r"(.*= )(\d+)\.$", steps[-2])
    wrong = int(m.group(2)) + 1
    steps[-2] = f"{m.group(1)}{wrong}."
    steps[-1] = f"The answer is \\boxed{{{wrong}}}."
    return "\n\n".join(steps)


def toy_pairs(n_per_level: int, levels=(2, 3), seed: int = 3) -> list[dict]:
    """Outcome pairs (right solution vs the same with a slip) and step pairs (the slipped step vs the right one)."""
    out = []
    for p in toy_problems("train", n_per_level=n_per_level, levels=list(levels), seed=seed):
        right, wrong = p.solution, slip(p.solution)
        out.append(dict(problem_id=p.id, kind="outcome", prompt=toy_prompt(p), prefix="", chosen=right, rejected=wrong))
        rs, ws = split_steps(right), split_steps(wrong)
        k = next(i for i, (a, b) in enumerate(zip(rs, ws)) if a != b)
        out.append(dict(problem_id=p.id, kind="step", prompt=toy_prompt(p), prefix="".join(rs[:k]), chosen=rs[k],
                        rejected=ws[k], eos=False))
    return out


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tok():
    from app.toy.tokenizer import build_tokenizer

    return build_tokenizer()


def test_loss_matches_a_hand_computation():
    c, r = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -9.0])
    rc, rr = torch.tensor([-4.0, -10.0]), torch.tensor([-4.0, -10.0])
    losses, cr, rj = dpo_loss(c, r, rc, rr, beta=0.5)
    # pair 1: beta * ((-3 + 4) - (-5 + 4)) = 0.5 * 2 = 1; pair 2: 0.5 * ((0) - (1)) = -0.5
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(0.5))])
    assert cr.tolist() == pytest.approx([0.5, 0.0]) and rj.tolist() == pytest.approx([-0.5, 0.5])


def test_response_logps_sum_the_response_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    resp = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    got, n = response_logps(logits, ids, resp)
    lp = logits.log_softmax(-1)
    want = [sum(lp[b, t - 1, ids[b, t]] for t in range(1, 5) if resp[b, t]) for b in range(2)]
    assert got.tolist() == pytest.approx([float(w) for w in want], rel=1e-5)
    assert n.tolist() == [3, 2]


def test_steps_get_no_eos_whole_responses_do(tok):
    step, outcome = toy_pairs(1, levels=(3,))[1], toy_pairs(1, levels=(3,))[0]
    s = encode_pair(step, tok)
    for side in ("chosen_ids", "rejected_ids"):
        assert s[side][-1] != tok.eos_token_id
        assert tok.decode(s[side][s["n_prompt"]:]) == step[side[:-4]]  # exactly the step's text, nothing after it
    assert tok.decode(s["chosen_ids"][:s["n_prompt"]], skip_special_tokens=True) == step["prompt"] + step["prefix"]
    o = encode_pair(outcome, tok)
    assert o["chosen_ids"][-1] == tok.eos_token_id and o["rejected_ids"][-1] == tok.eos_token_id
    assert tok.decode(o["chosen_ids"][o["n_prompt"]:-1]) == outcome["chosen"]
    # the record's own eos wins over its kind; a step record without `eos` still gets none
    assert encode_pair(dict(step, eos=True), tok)["chosen_ids"][-1] == tok.eos_token_id
    assert encode_pair({k: v for k, v in step.items() if k != "eos"}, tok)["chosen_ids"][-1] != tok.eos_token_id


def test_task_loss_by_hand_on_a_tiny_model(tok):
    """The task's loss is the sigmoid loss of the summed response log-probs; against itself as reference it is
    log 2 with zero margin."""
    from transformers import AutoModelForCausalLM

    from app.toy.models import policy_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(policy_config(tok, "tiny")).eval()
    pairs = toy_pairs(2, levels=(2,))
    task = DPOTask(DPOConfig(data="unused.jsonl", beta=0.3, kinds=["outcome", "step"]))
    examples, dropped = task.encode(pairs, tok)
    assert dropped == 0 and len(examples) == 4
    batch = task.collate(examples, tok)
    with torch.no_grad():
        logps, _ = task.sequence_logps(model, batch)
    by_hand = []
    for e in examples:
        row = []
        for side in ("chosen_ids", "rejected_ids"):
            ids = torch.tensor([e[side]])
            with torch.no_grad():
                lp = model(input_ids=ids).logits.log_softmax(-1)[0]
            row.append(sum(float(lp[t - 1, e[side][t]]) for t in range(e["n_prompt"], len(e[side]))))
        by_hand.append(row)
    got = torch.stack(logps.chunk(2), -1)
    assert torch.allclose(got, torch.tensor(by_hand), rtol=1e-4), (got, by_hand)
    batch["ref"] = torch.tensor(by_hand)
    with torch.no_grad():
        loss, m = task.loss(model, batch)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-4) and m["reward_margin"] == pytest.approx(0, abs=1e-4)
    batch["ref"] = torch.tensor(by_hand) + torch.tensor([[1.0, -1.0]])  # the reference liked chosen more by 1 nat
    with torch.no_grad():
        loss, m = task.loss(model, batch)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(0.3 * 2)), abs=1e-4)
    assert m["reward_margin"] == pytest.approx(-0.6, abs=1e-4) and m["reward_accuracy"] == 0.0


def test_config_is_validated_on_construction():
    assert DPOConfig(data="x").kinds == ["outcome", "prm"]
    assert DPOConfig(data="x", job="step-dpo").kinds == ["step"]
    with pytest.raises(ValueError, match="step-dpo trains on step pairs only"):
        DPOConfig(data="x", job="step-dpo", kinds=["outcome"])
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(data="x", beta=0)
    with pytest.raises(ValueError, match="zero_stage"):
        DPOConfig(data="x", train=dict(zero_stage=4))


# --- end to end: Ray Train, 2 workers, ZeRO-2 on CPU ------------------------------------------------------------

class CrashingDPOTask(CrashAt, DPOTask):
    """Raises in the `crash_at`-th loss call of a worker while the file `flag` exists: a run killed mid-training."""


def test_dpo_two_workers_zero2_margin_grows_and_a_crashed_run_resumes(ray_cluster, tmp_path, pickled_by_value):
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(32))  # 64 outcome pairs: 4 steps of 2 x 8 per epoch
    run = TrainConfig(num_workers=2, zero_stage=2, micro_batch_size=8, lr=2e-4, warmup_steps=0, epochs=2,
                      checkpoint_every_steps=2, name="dpo-test", storage_path=str(tmp_path / "ray"),
                      keep_checkpoints=10, progress=False)
    cfg = DPOConfig(model="toy:policy", data=str(data), beta=0.1, kinds=["outcome"], train=run)
    # killed in step 3, after the (mid-epoch) checkpoint of step 2, then resumed from it
    result, path = crash_then_resume(lambda flag: CrashingDPOTask(cfg, flag=flag, crash_at=3), run, "dpo",
                                     tmp_path / "crash")
    rows = history(result)
    assert result.metrics["start_step"] == 2 and result.metrics["global_step"] == 8
    assert [r["step"] for r in rows] == list(range(1, 9))  # steps 1-2 from the checkpoint, 3-8 after the resume
    # step 1 against the reference computed from the same weights: log 2, no margin
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3) and abs(rows[0]["reward_margin"]) < 1e-3
    # the reference after the resume is still the starting model, not the checkpoint (against which step 3's
    # margin, computed before step 3's update, would be exactly 0)
    assert rows[1]["reward_margin"] > 0.02 and rows[2]["reward_margin"] > 0.02, rows[:3]
    assert rows[-1]["reward_margin"] > 0.15 and rows[-1]["loss"] < math.log(2) - 0.05, rows
    assert rows[-1]["reward_accuracy"] >= 0.75, rows
    assert {"reward_margin", "chosen_reward", "rejected_reward"} <= set(result.metrics)
    assert (Path(path) / "model.safetensors").exists()


def test_step_dpo_trains_on_steps_under_ray_train(ray_cluster, tmp_path):
    """A short step-DPO run: 2 workers, ZeRO-2; only the step pairs are read, and their margin grows."""
    from train.dpo import train

    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(16))
    # max_failures: a worker lost to the machine (Ray Train's cleaner once removed the group under CI load) restarts
    # the group from the latest checkpoint, as on a cluster; the run's rows are the same either way
    run = TrainConfig(num_workers=2, zero_stage=2, micro_batch_size=8, lr=2e-4, warmup_steps=0, epochs=3,
                      name="sdpo-test", storage_path=str(tmp_path / "ray"), progress=False, max_failures=2)
    result, _ = train(DPOConfig(job="step-dpo", model="toy:policy", data=str(data), beta=0.1, train=run))
    rows = history(result)
    assert len(rows) == 6  # 32 step pairs (the outcome pairs are skipped): 2 steps per epoch
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert rows[-1]["reward_margin"] > 0.05 and rows[-1]["loss"] < rows[0]["loss"], rows


class ZeroInitCheckingTask(DPOTask):
    """Records whether the model came out of build_model already partitioned by ZeRO-3 (zero.Init)."""

    def build_model(self):
        model = super().build_model()
        p = next(model.parameters())
        print(f"zero-init: ds_id={hasattr(p, 'ds_id')} local={p.numel()} full={getattr(p, 'ds_numel', -1)}", flush=True)
        if not hasattr(p, "ds_id") or p.numel() >= p.ds_numel:
            raise AssertionError("the model was built whole: ZeRO-3 must build it under zero.Init")
        return model


def test_zero3_builds_under_zero_init_and_exports_the_full_model(ray_cluster, tmp_path, pickled_by_value):
    """ZeRO-3, 2 workers on CPU: each worker builds only its shard of every parameter (from_pretrained under
    zero.Init), trains, and the export (the consolidated state dict on rank 0's CPU) is the whole model."""
    from safetensors.torch import load_file

    from app.toy import resolve_model
    from train.loop import fit_and_export

    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(8))
    run = TrainConfig(num_workers=2, zero_stage=3, micro_batch_size=4, lr=2e-4, warmup_steps=0, max_steps=2,
                      name="z3-test", storage_path=str(tmp_path / "ray"), progress=False)
    cfg = DPOConfig(model="toy:policy", data=str(data), kinds=["outcome"], train=run)
    result, path = fit_and_export(ZeroInitCheckingTask(cfg), run, "dpo")
    assert result.metrics["global_step"] == 2
    start = load_file(f"{resolve_model('toy:policy')}/model.safetensors")
    out = load_file(str(Path(path) / "model.safetensors"))
    assert set(out) == set(start) and all(out[k].shape == start[k].shape for k in start)
    assert any(not torch.equal(out[k], start[k]) for k in start)  # trained
