"""A training run's start: a stale DeepSpeed build lock never stalls it, a stalled start fails naming what it waits
on, and a job killed with SIGTERM takes its own local Ray instance down with it (train.startup, jobs.common)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from train.loop import TrainConfig
from train.sft import SFTConfig, SFTTask

REPO = Path(__file__).resolve().parent.parent
PONDER = Path(sys.executable).with_name("ponder")
SHM_OP = "deepspeed_shm_comm"  # the op DeepSpeed JIT-builds on CPU in deepspeed.initialize


def plant_lock(ext: Path) -> Path:
    """What a build killed mid-way leaves in torch's extension cache."""
    lock = ext / SHM_OP / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("")
    return lock


def test_watchdog_stops_a_wait_on_a_stale_lock_and_names_it(tmp_path, monkeypatch):
    from torch.utils.file_baton import FileBaton

    from train.startup import StalledStart, StartWatchdog, _Stall

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = plant_lock(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(StalledStart) as err:
        with StartWatchdog(1.0, rank=1, world=2, hard_exit_s=None) as watchdog:
            try:
                watchdog.phase("in deepspeed.initialize")
                FileBaton(str(lock)).wait()  # what torch's _jit_compile does when the lock exists: forever
            except _Stall:
                raise watchdog.error() from None
    assert time.monotonic() - t0 < 30
    message = str(err.value)
    assert "rank 1 of 2" in message and "in deepspeed.initialize" in message
    assert str(lock) in message and "rm " in message and "train.start_timeout_s" in message


def test_watchdog_disarmed_by_the_first_step(tmp_path, monkeypatch):
    from train.startup import StartWatchdog

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with StartWatchdog(0.5, hard_exit_s=None) as watchdog:
        watchdog.started()
        time.sleep(1.5)  # past the timeout: nothing is thrown into this thread
    assert watchdog.message is None


class LockedBuildTask(SFTTask):
    """An SFT task whose model build waits on a build lock, as any runtime-compiled op would."""

    def __init__(self, cfg, ext: str):
        super().__init__(cfg)
        self.ext = ext

    def build_model(self):
        from torch.utils.file_baton import FileBaton

        os.environ["TORCH_EXTENSIONS_DIR"] = self.ext  # this worker's extension cache
        FileBaton(str(Path(self.ext) / "some_op" / "lock")).wait()
        return super().build_model()


def test_a_stalled_worker_fails_the_run_naming_the_lock(ray_cluster, tmp_path, pickled_by_value):
    from train.loop import fit_and_export
    from train.startup import StalledStart

    ext = tmp_path / "ext"
    (ext / "some_op").mkdir(parents=True)
    (ext / "some_op" / "lock").write_text("")
    cfg = SFTConfig(toy={"n_per_level": 20, "levels": [1]}, train=TrainConfig(
        num_workers=1, micro_batch_size=4, max_steps=2, start_timeout_s=20, progress=False, name="stalled",
        storage_path=str(tmp_path / "runs")))
    t0 = time.monotonic()
    with pytest.raises(StalledStart, match=r"rank 0 of 1 .* building the model .*some_op/lock"):
        fit_and_export(LockedBuildTask(cfg, str(ext)), cfg.train, "stalled")
    assert time.monotonic() - t0 < 120


def test_resource_wait_maps_to_ray_trains_start_attempts():
    from train.resources import controller_failure_limit

    assert controller_failure_limit(None) == -1          # no limit: an autoscaling cluster
    assert controller_failure_limit(30) == 0             # one 60 s attempt
    assert controller_failure_limit(600) == 9            # ten


def test_a_run_whose_workers_never_fit_fails_naming_what_holds_the_cpus(ray_cluster, tmp_path, pickled_by_value,
                                                                        capfd):
    """Ray Train alone retries a worker group that finds no free CPUs forever, silently (and pytest-timeout's alarm
    cannot break into that wait): ponder says at once that it waits, and gives up after train.resource_wait_s."""
    import ray

    from train.loop import fit_and_export
    from train.resources import ClusterBusy

    @ray.remote
    class CpuHog:
        def ready(self):
            return True

    free = ray.available_resources().get("CPU", 0)
    hog = CpuHog.options(name="cpu-hog", num_cpus=free - 1).remote()  # one CPU left: two workers cannot start
    ray.get(hog.ready.remote())
    cfg = SFTConfig(toy={"n_per_level": 20, "levels": [1]}, train=TrainConfig(
        num_workers=2, micro_batch_size=4, max_steps=2, resource_wait_s=30, progress=False, name="busy",
        storage_path=str(tmp_path / "runs")))
    t0 = time.monotonic()
    try:
        with pytest.raises(ClusterBusy, match=r"2 workers x 1 CPU .*free now: 1 of .*CpuHog 'cpu-hog' \(.*"
                           r"train\.resource_wait_s"):
            fit_and_export(SFTTask(cfg), cfg.train, "busy")
    finally:
        ray.kill(hog)
    assert time.monotonic() - t0 < 240
    assert "ponder: waiting up to 30 s (train.resource_wait_s)" in capfd.readouterr().err


def _ray_processes(tmp: str) -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(tmp in part for part in (p.info["cmdline"] or [])):
                pids.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pids


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_cli_trains_past_a_stale_build_lock_and_sigterm_stops_its_ray(tmp_path):
    """The README's training command through `ponder`, starting its own local Ray (no test cluster handed in):
    a first run is killed with SIGTERM while its workers start (its Ray goes with it), a stale DeepSpeed build lock
    sits in the extension cache it uses, and the next run trains: steps, a checkpoint, the exported model."""
    ext = tmp_path / "torch_extensions"
    lock = plant_lock(ext)
    ray_tmp = tempfile.mkdtemp(prefix="ptr", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(TORCH_EXTENSIONS_DIR=str(ext), RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    runs = tmp_path / "runs"

    def command(name: str) -> list[str]:
        return [str(PONDER), "train", "--config", "toy/sft", "toy.n_per_level=40", "toy.levels=[1,2]",
                "eval_toy_per_level=0", "train.num_workers=2", "train.micro_batch_size=4", "train.max_steps=3",
                "train.warmup_steps=1", "train.checkpoint_every_steps=2", f"train.name={name}",
                f"train.storage_path={runs}", f"output={tmp_path / name / 'model'}", "train.progress=false"]

    try:
        # 1. killed while its training workers start
        log = tmp_path / "killed.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(command("killed"), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 240
            while "Started training worker group" not in log.read_text(errors="replace"):
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=90) == 130, log.read_text()
        deadline = time.monotonic() + 60
        while _ray_processes(ray_tmp) and time.monotonic() < deadline:
            time.sleep(1)
        assert not _ray_processes(ray_tmp), "the killed job left its Ray instance running"

        # 2. the next run, on the same machine and extension cache, with the stale lock: it trains
        assert lock.exists()
        done = subprocess.run(command("trains"), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "sft: done" in done.stdout and "global_step=3" in done.stdout
        run = runs / "trains"
        assert sorted(p.name for p in run.iterdir() if p.name.startswith("step_")) == ["step_0000002", "step_0000003"]
        assert (tmp_path / "trains" / "model" / "model.safetensors").exists()
    finally:
        for pid in _ray_processes(ray_tmp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_job_shutdown_handler_turns_sigterm_into_an_interrupt():
    """What the CLI test relies on, in one process: SIGTERM raises KeyboardInterrupt in the main thread."""
    from jobs.common import shutdown_ray_on_signals

    old = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        shutdown_ray_on_signals()
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
            time.sleep(5)
    finally:
        signal.signal(signal.SIGTERM, old)
