"""What the trainer tests share (DPO, LaTRO, PPO): a task that crashes once mid-training, the run that crashes and
resumes from its checkpoint, and a run's per-step rows.

A test module defining a task subclass asks for the `pickled_by_value` fixture (tests/conftest.py): Ray Train
workers then unpickle the test's classes, and this module's, by value."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


class CrashAt:
    """Mixin for a `TrainTask`: raises in the `crash_at`-th loss call of a worker while the file `flag` exists (a
    run killed mid-training). `class CrashingXTask(CrashAt, XTask)`, built with `flag=` and `crash_at=` keywords."""

    def __init__(self, *args, flag: str, crash_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.flag, self.crash_at, self.calls = flag, crash_at, 0

    def loss(self, model, batch):
        self.calls += 1
        if self.calls == self.crash_at and Path(self.flag).exists():
            raise RuntimeError("injected crash")
        return super().loss(model, batch)


def crash_then_resume(make_task, run, desc: str, flag: Path, checkpoints=("step_0000002",)):
    """`make_task(str(flag))` (a `CrashAt` task) under `fit` with `flag` present: the run must fail with the injected
    crash, leaving exactly `checkpoints`; then the flag goes and a second run of the same name resumes from the
    latest checkpoint to the end. Returns that run's (result, exported model path)."""
    from train.loop import fit, fit_and_export

    flag.touch()
    with pytest.raises(Exception, match="injected crash"):
        result = fit(make_task(str(flag)), run, desc=desc)
        if result.error:
            raise result.error
    flag.unlink()
    ckpts = sorted(p.name for p in (Path(run.storage_path) / run.name).iterdir() if p.name.startswith("step_"))
    assert ckpts == list(checkpoints), ckpts
    return fit_and_export(make_task(str(flag)), run, desc)


def history(result) -> list[dict]:
    """The per-step rows (`metrics.jsonl`) of a run's latest checkpoint."""
    return [json.loads(x) for x in (Path(result.checkpoint.path) / "metrics.jsonl").read_text().splitlines()]
