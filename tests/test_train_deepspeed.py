"""Ray Train + DeepSpeed on CPU: 2 workers, ZeRO-2, gloo. Loss decreases; a second fit resumes the checkpoint;
the PRM trainer's per-token labels reach the loss."""
from __future__ import annotations

import json
from pathlib import Path

from train.loop import TrainConfig, deepspeed_config, epoch_batches


def test_deepspeed_config_from_recipe():
    cfg = TrainConfig(num_workers=2, zero_stage=3, micro_batch_size=4, grad_accum=2, lr=1e-3)
    ds = deepspeed_config(cfg)
    assert ds["train_batch_size"] == 16
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is False  # CPU trains fp32
    assert deepspeed_config(cfg.model_copy(update={"use_gpu": True}))["bf16"]["enabled"] is True


def test_preemptions_are_bounded_with_the_failures():
    """Ray Train counts preemptions apart from max_failures, unlimited unless set: bounded with the same number."""
    from train.loop import failure_config

    f = failure_config(TrainConfig(max_failures=3))
    assert (f.max_failures, f.max_preemption_failures) == (3, 3)
    f = failure_config(TrainConfig(max_failures=3, max_preemption_failures=-1))
    assert (f.max_failures, f.max_preemption_failures) == (3, -1)


def test_epoch_batches_deterministic_and_even():
    lengths = [5 + (i * 7) % 30 for i in range(203)]
    a = epoch_batches(lengths, micro=4, world=2, accum=3, seed=1, epoch=0)
    assert a == epoch_batches(lengths, micro=4, world=2, accum=3, seed=1, epoch=0)
    assert a != epoch_batches(lengths, micro=4, world=2, accum=3, seed=1, epoch=1)
    assert len(a) % 6 == 0 and all(len(b) == 4 for b in a)
    flat = [i for b in a for i in b]
    assert len(flat) == len(set(flat))


def _sft(tmp_path: Path, epochs: int):
    from train.sft import SFTConfig, ToyData

    return SFTConfig(
        model="new:toy-tiny",
        data="toy:train",
        toy=ToyData(n_per_level=24, levels=[1, 2]),
        train=TrainConfig(num_workers=2, zero_stage=2, micro_batch_size=8, lr=3e-3, warmup_steps=2, epochs=epochs,
                          name="ds-test", storage_path=str(tmp_path / "ray"), keep_checkpoints=10, progress=False),
    )


def _epoch_losses(result) -> dict[int, float]:
    return {m["epoch"]: m["loss"] for _, m in result.best_checkpoints}


def test_two_workers_zero2_loss_decreases_and_resumes(ray_cluster, tmp_path):
    from train.sft import train

    result, path = train(_sft(tmp_path, epochs=3))
    losses = _epoch_losses(result)
    assert sorted(losses) == [0, 1, 2]
    assert losses[2] < losses[0] * 0.8, losses
    first_steps = result.metrics["global_step"]
    steps_per_epoch = first_steps // 3
    assert first_steps == 3 * steps_per_epoch > 0
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    ckpt = Path(result.checkpoint.path)
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["epoch"] == 3 and state["global_step"] == first_steps
    # both ranks' ZeRO-2 optimizer shards were merged into the one checkpoint
    shards = sorted(p.name for p in (ckpt / "ds" / "state").iterdir() if "optim_states" in p.name)
    assert len(shards) == 2, shards

    # Same run name + storage, two more epochs: Train V2 restores the run; training starts at the saved step.
    result2, _ = train(_sft(tmp_path, epochs=5))
    assert result2.metrics["start_step"] == first_steps
    assert result2.metrics["epoch"] == 4
    assert result2.metrics["global_step"] == 5 * steps_per_epoch
    assert sorted(_epoch_losses(result2))[-2:] == [3, 4]

    # A finished run asked for no more epochs returns at once, keeping its last checkpoint.
    run_dir = Path(result2.checkpoint.path).parent
    before = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("step_"))
    result3, path3 = train(_sft(tmp_path, epochs=5))
    assert Path(result3.checkpoint.path) == Path(result2.checkpoint.path)
    assert result3.metrics["global_step"] == result2.metrics["global_step"]
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("step_")) == before  # nothing trained
    assert (path3 / "model.safetensors").exists()


def test_prm_token_labels_train_under_deepspeed(ray_cluster, tmp_path):
    """The per-token labels reach the loss under Ray Train + DeepSpeed: a few epochs from the shipped PRM (whose
    head was only ever trained at step tags) open a gap between its scores of the tokens before and after a slip."""
    import torch

    from actors.engines.qwen2_prm import Qwen2ForProcessRewardModel
    from app.search.tree import split_steps
    from app.toy import resolve_model
    from app.toy.checker import exact_step_labels
    from app.toy.world import toy_problems
    from train.prm import PRMTask, PRMTrainConfig, train

    records = []
    for p in toy_problems("train", n_per_level=16, levels=[2, 3], seed=5):
        steps = split_steps(p.solution)
        head, tail = steps[0].rsplit(" = ", 1)
        first = tail.split(" ")[0]
        slipped = [f"{head} = {tail.replace(first, str(int(first) + 1), 1)}"] + steps[1:]
        for s in (steps, slipped):
            records.append({"question": p.question, "steps": s, "hard": exact_step_labels(p.question, s)})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = TrainConfig(num_workers=2, zero_stage=2, micro_batch_size=8, lr=2e-3, warmup_steps=2, epochs=12,
                      name="tl-test", storage_path=str(tmp_path / "ray"), progress=False)
    cfg = PRMTrainConfig(model="toy:prm", data=str(data), labels="hard", token_labels=1.0,
                         output=str(tmp_path / "prm"), train=run)
    _, path = train(cfg)

    task = PRMTask(cfg)
    tok = task.build_tokenizer()
    examples, _ = task.encode_records(records, tok)
    batch = task.collate(examples, tok)
    labels = batch["token_labels"]
    assert (labels == 0).sum() > 1000 and (labels == 1).sum() > 1000

    def gap(model_path) -> float:
        """Mean P(good) on tokens before a slip minus after it."""
        model = Qwen2ForProcessRewardModel.from_pretrained(str(model_path), dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        good = logits.softmax(-1)[..., 1]
        return (good[labels == 1].mean() - good[labels == 0].mean()).item()

    before, after = gap(resolve_model("toy:prm")), gap(path)
    assert after > before + 0.1, (before, after)  # measured: 0.02 -> 0.16; trained on the tags alone, -0.003
